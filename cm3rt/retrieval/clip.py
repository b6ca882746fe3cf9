"""Frozen CLIP bi-encoder on open_clip: any architecture, weights from a local file only.

:meth:`ClipEncoder.for_queries` embeds queries without importing open_clip where
:mod:`~cm3rt.retrieval.text_tower` and :mod:`~cm3rt.retrieval.image_tower` reproduce the model.

Embeddings are L2-normalised float32. A document (or query) made of text and images is
embedded as the average of its L2-normalised text embedding and image embedding,
renormalised (docs/DESIGN.md, "Retrieval"); several images count as one image part (their
normalised mean), so a prompt with three images does not drown its text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from cm3rt.devices import resolve_device

# open_clip's preprocess defaults live with the code that reproduces the preprocessing; the
# identity of a folder computed without open_clip hashes this merged config, and
# _load_open_clip checks it against open_clip's.
from .image_tower import preprocess_cfg_of as _preprocess_cfg_of

_PRECISIONS = ("fp32", "fp16", "bf16")
_LOCAL_DIR = "local-dir:"
# The project's embedded tiny CLIP: the default model's clip/ folder (an open_clip local-dir
# layout: open_clip_config.json + open_clip_model.safetensors + tokenizer files), written by
# tools/train/package_default.py. The default bank's manifest names it as "embedded".
EMBEDDED_CLIP_DIR = Path(__file__).resolve().parent.parent / "assets" / "default" / "clip"
EMBEDDED = "embedded"


@dataclass(frozen=True)
class EncoderIdentity:
    """What a memory bank records about the encoder that embedded its documents."""

    arch: str
    embed_dim: int
    digest: str  # sha256 of the model config, preprocessing and weight bytes
    weights: str | None = None  # where the weights came from (a hint to reload them)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EncoderIdentity:
        return cls(arch=str(d["arch"]), embed_dim=int(d["embed_dim"]), digest=str(d["digest"]),
                   weights=d.get("weights"))

    def same_encoder(self, other: EncoderIdentity) -> bool:
        """True when both have the same dimension and digest (config + weights)."""
        return (self.embed_dim, self.digest) == (other.embed_dim, other.digest)


def _sha256_files(h: hashlib._Hash, paths: Sequence[Path]) -> None:
    for path in paths:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)


def _weight_files(folder: Path) -> list[Path]:
    """Every weights file of a local-dir folder (all hashed into the identity)."""
    return sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in float32 (a zero row stays zero rather than becoming NaN)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def combine_embeddings(text: torch.Tensor | None, image: torch.Tensor | None) -> torch.Tensor:
    """Average of the normalised text and image embeddings, renormalised ([E] or [N, E])."""
    parts = [normalize(p) for p in (text, image) if p is not None]
    if not parts:
        raise ValueError("combine_embeddings: expected a text or an image embedding, got neither")
    return normalize(sum(parts) / len(parts))


class ClipEncoder:
    """CLIP text/image encoder built with open_clip from local files (never the hub).

    Args:
        arch: an open_clip architecture name (``"ViT-B-32"``), a path to an open_clip model
            config JSON (registered under its file stem), ``"local-dir:DIR"`` (open_clip's
            folder layout: open_clip_config.json + weights) or ``"embedded"`` (the project's
            tiny CLIP in cm3rt/assets/default/clip).
        weights: a local checkpoint (.safetensors preferred; .bin/.pt/.pth are read with
            ``torch.load(weights_only=True)``); required for a named or JSON architecture,
            not allowed for a folder.
        device: where the model runs.
        precision: "fp32", "fp16" or "bf16"; default fp32 on CPU, fp16 on CUDA.
        batch_size: texts or images per forward pass.
    """

    def __init__(self, arch: str, weights: str | Path | None = None,
                 device: str | torch.device = "cpu", precision: str | None = None,
                 batch_size: int = 64) -> None:
        self._setup(arch, weights, device, precision, batch_size)
        self._load_open_clip()

    @classmethod
    def for_queries(cls, arch: str, weights: str | Path | None = None,
                    device: str | torch.device = "cpu", precision: str | None = None,
                    batch_size: int = 64) -> ClipEncoder:
        """An encoder that embeds queries without importing open_clip where it can.

        For a local-dir (or the embedded) CLIP in fp32, texts are embedded by
        :class:`~cm3rt.retrieval.text_tower.ClipTextTower` and images by
        :class:`~cm3rt.retrieval.image_tower.ClipImageTower` when each reproduces its side of
        the model; open_clip is loaded only when a side without a tower is encoded (or
        :attr:`model` / :attr:`preprocess` / :attr:`tokenizer` are read). The identity
        (digest) is the one ``ClipEncoder(...)`` records. ``text_tower_refusal`` and
        ``image_tower_refusal`` say why a side has no tower; with neither tower this is
        ``ClipEncoder(...)``.
        """
        from . import image_tower, text_tower

        self = cls.__new__(cls)
        self._setup(arch, weights, device, precision, batch_size)
        folder = self._local_folder(arch, weights)
        refusal = None
        if folder is None:
            refusal = f"arch {arch!r} is not a local-dir CLIP"
        elif self.precision != "fp32":
            refusal = f"precision {self.precision!r} (the towers run fp32)"
        if refusal is not None:
            self.text_tower_refusal = self.image_tower_refusal = refusal
        else:
            try:
                self._tower = text_tower.ClipTextTower.from_dir(folder, device=self.device)
            except text_tower.UnsupportedTower as e:
                self.text_tower_refusal = str(e)
            try:
                self._image_tower = image_tower.ClipImageTower.from_dir(folder,
                                                                        device=self.device)
            except image_tower.UnsupportedTower as e:
                self.image_tower_refusal = str(e)
        if self._tower is None and self._image_tower is None:
            self._load_open_clip()
            return self
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
        self.embed_dim = int(config["model_cfg"]["embed_dim"])
        hashed = [folder / "open_clip_config.json", *_weight_files(folder)]
        self.identity = self._make_identity(
            config["model_cfg"], _preprocess_cfg_of(config), hashed, arch, weights)
        return self

    def _setup(self, arch, weights, device, precision, batch_size) -> None:
        if not isinstance(arch, str) or not arch:
            raise TypeError(f"arch: expected a non-empty str, got {arch!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        # open_clip runs on torch alone: CUDA needs no cm3rt kernels here
        self.device = resolve_device(device, need_kernels=False)
        if precision is None:
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        if precision not in _PRECISIONS:
            raise ValueError(f"precision: expected one of {_PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.batch_size = batch_size
        self._arch, self._weights = arch, weights
        self._tower = None  # ClipTextTower of for_queries(), when it applies
        self._image_tower = None  # ClipImageTower of for_queries(), when it applies
        self._open_clip = None  # (model, preprocess, tokenizer), loaded on first need
        self.text_tower_refusal: str | None = None
        self.image_tower_refusal: str | None = None

    @staticmethod
    def _local_folder(arch: str, weights) -> Path | None:
        """The folder of a local-dir / embedded arch (None for other archs)."""
        if weights is not None:
            return None
        if arch == EMBEDDED:
            return EMBEDDED_CLIP_DIR if (EMBEDDED_CLIP_DIR / "open_clip_config.json").is_file() \
                else None
        if arch.startswith(_LOCAL_DIR):
            folder = Path(arch[len(_LOCAL_DIR):])
            return folder if (folder / "open_clip_config.json").is_file() else None
        return None

    def _make_identity(self, config: dict, preprocess_cfg: dict, hashed: Sequence[Path],
                       arch: str, weights) -> EncoderIdentity:
        h = hashlib.sha256()
        h.update(json.dumps(config, sort_keys=True).encode())
        h.update(json.dumps(preprocess_cfg, sort_keys=True, default=str).encode())
        _sha256_files(h, hashed)
        # Recorded so that a bank can reload its encoder: config paths made absolute.
        if arch.endswith(".json"):
            arch = str(Path(arch).resolve())
        elif arch.startswith(_LOCAL_DIR):
            arch = _LOCAL_DIR + str(Path(arch[len(_LOCAL_DIR):]).resolve())
        return EncoderIdentity(
            arch=arch, embed_dim=int(config["embed_dim"]), digest=h.hexdigest(),
            weights=str(Path(weights).resolve()) if weights is not None else None)

    def _load_open_clip(self) -> tuple:
        """Build the open_clip model (heavy import); -> (model, preprocess, tokenizer)."""
        if self._open_clip is not None:
            return self._open_clip
        import open_clip

        name, pretrained, hashed, config = self._resolve(open_clip, self._arch, self._weights)
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, precision=self.precision, device=self.device,
            pretrained_image=False, pretrained_text=False, load_weights=True,
            require_pretrained=True)
        model = model.eval().requires_grad_(False)
        identity = self._make_identity(
            config, getattr(model.visual, "preprocess_cfg", {}), hashed, self._arch,
            self._weights)
        known = getattr(self, "identity", None)
        if known is not None and known != identity:
            raise ValueError(f"encoder: open_clip's model of {self._arch} has digest "
                             f"{identity.digest}, expected {known.digest} (computed without "
                             "open_clip); the folder changed or open_clip preprocesses "
                             "differently")
        self.embed_dim = int(config["embed_dim"])
        self.identity = identity
        self._open_clip = (model, preprocess, open_clip.get_tokenizer(name))
        return self._open_clip

    @property
    def model(self) -> torch.nn.Module:
        """The open_clip model (loaded on first use by a :meth:`for_queries` encoder)."""
        return self._load_open_clip()[0]

    @property
    def preprocess(self):
        """open_clip's image preprocessing transform."""
        return self._load_open_clip()[1]

    @property
    def tokenizer(self):
        """open_clip's tokenizer."""
        return self._load_open_clip()[2]

    @staticmethod
    def _resolve(open_clip, arch: str, weights) -> tuple[str, str | None, list[Path], dict]:
        """-> (open_clip model name, pretrained file, files to hash, model config)."""
        if arch == EMBEDDED:
            if not (EMBEDDED_CLIP_DIR / "open_clip_config.json").is_file():
                raise FileNotFoundError(
                    f"arch: the embedded CLIP is not installed (expected {EMBEDDED_CLIP_DIR}"
                    "/open_clip_config.json); pass an open_clip architecture and --weights")
            arch = _LOCAL_DIR + str(EMBEDDED_CLIP_DIR)
        if arch.startswith(_LOCAL_DIR):
            if weights is not None:
                raise ValueError(f"weights: expected None with arch {arch!r} (the folder holds "
                                 f"the weights), got {weights!r}")
            folder = Path(arch[len(_LOCAL_DIR):])
            if not (folder / "open_clip_config.json").is_file():
                raise FileNotFoundError(f"arch: expected {folder}/open_clip_config.json")
            files = _weight_files(folder)
            if not files:
                raise FileNotFoundError(f"arch: expected a weights file in {folder}, found none")
            config = open_clip.get_model_config(arch)
            return arch, None, [folder / "open_clip_config.json", *files], config

        if arch.endswith(".json"):
            path = Path(arch)
            if not path.is_file():
                raise FileNotFoundError(f"arch: model config file {path} does not exist")
            try:
                cfg = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"arch: {path} is not a readable JSON model config: {e}") from e
            if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
                raise ValueError(f"arch: {path} is not an open_clip model config (expected "
                                 "keys embed_dim, vision_cfg, text_cfg)")
            open_clip.add_model_config(path)
            arch = path.stem
        elif arch not in open_clip.list_models():
            raise ValueError(f"arch: expected an open_clip architecture (e.g. ViT-B-32), a model "
                             f"config .json, 'local-dir:DIR' or 'embedded', got {arch!r}")
        if weights is None:
            raise ValueError(f"weights: expected a local checkpoint file for arch {arch!r} "
                             "(weights are never downloaded), got None")
        wpath = Path(weights)
        if not wpath.is_file():
            raise FileNotFoundError(f"weights: checkpoint file {wpath} does not exist")
        return arch, str(wpath), [wpath], open_clip.get_model_config(arch)

    # ------------------------------------------------------------------ encoding
    def _input_dtype(self, module: torch.nn.Module) -> torch.dtype:
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                return m.weight.dtype
        return torch.float32

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings: float32 [N, E] on the CPU."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts: expected a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        out = [torch.empty(0, self.embed_dim)]
        for start in range(0, len(texts), self.batch_size):
            if self._tower is not None:
                out.append(self._tower.encode(list(texts[start:start + self.batch_size])))
                continue
            tokens = self.tokenizer(list(texts[start:start + self.batch_size])).to(self.device)
            out.append(normalize(self.model.encode_text(tokens)).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def encode_image(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised image embeddings: float32 [N, E] on the CPU."""
        if not isinstance(images, Sequence):
            raise TypeError(f"images: expected a list of PIL images, got {type(images).__name__}")
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images[{i}]: expected a PIL.Image.Image, got "
                                f"{type(im).__name__}")
        # without the image tower open_clip loads here, as before (even for no images)
        dtype = None if self._image_tower is not None else self._input_dtype(self.model.visual)
        out = [torch.empty(0, self.embed_dim)]
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            if self._image_tower is not None:
                out.append(self._image_tower.encode(chunk))
                continue
            batch = torch.stack([self.preprocess(im) for im in chunk])
            feats = self.model.encode_image(batch.to(self.device, dtype))
            out.append(normalize(feats).cpu())
        return torch.cat(out)

    def encode_documents(self, texts: Sequence[str | None],
                         images: Sequence[Image.Image | None]) -> torch.Tensor:
        """Embeddings of documents with optional text and optional image: float32 [N, E]."""
        if len(texts) != len(images):
            raise ValueError(f"images: expected {len(texts)} entries (one per text), "
                             f"got {len(images)}")
        t_idx = [i for i, t in enumerate(texts) if t is not None]
        i_idx = [i for i, im in enumerate(images) if im is not None]
        missing = sorted(set(range(len(texts))) - set(t_idx) - set(i_idx))
        if missing:
            raise ValueError(f"documents: entry {missing[0]} has neither text nor image")
        total = torch.zeros(len(texts), self.embed_dim)
        if t_idx:
            total[t_idx] += self.encode_text([texts[i] for i in t_idx])
        if i_idx:
            total[i_idx] += self.encode_image([images[i] for i in i_idx])
        return normalize(total)  # the mean of the parts has the direction of their sum

    def encode_query(self, text: str | None = None,
                     images: Sequence[Image.Image] | None = None) -> torch.Tensor:
        """Query embedding [E] from a prompt's text and images (see module docstring)."""
        t = self.encode_text([text])[0] if text else None
        im = normalize(self.encode_image(images).mean(0)) if images else None
        if t is None and im is None:
            raise ValueError("query: expected a non-empty text or at least one image, got neither")
        return combine_embeddings(t, im)

    def score(self, text: str, images: Sequence[Image.Image]) -> list[float]:
        """Cosine similarity of ``text`` with each image (best-of-n reranking)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        if len(images) == 0:
            return []
        t = self.encode_text([text])[0]
        return (self.encode_image(images) @ t).tolist()

    def score_texts(self, image: Image.Image, texts: Sequence[str]) -> list[float]:
        """Cosine similarity of each of ``texts`` with ``image`` (caption reranking)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image: expected a PIL.Image.Image, got {type(image).__name__}")
        if len(texts) == 0:
            return []
        return (self.encode_text(list(texts)) @ self.encode_image([image])[0]).tolist()

    __call__ = score
