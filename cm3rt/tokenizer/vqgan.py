"""ImageTokenizer: Chameleon's VQGAN, images <-> codebook indices.

    tok = ImageTokenizer.from_pretrained("path/to/model")   # see from_pretrained for layouts
    codes = tok.encode([pil_image])          # int64 [N, 1024] for Chameleon
    images = tok.decode(codes)               # list of PIL images

Quantisation runs through cm3rt's fused ``ops.vq_nearest`` (no [N, K] distance matrix) and
decoding looks codes up with ``ops.vq_embed``. The codebook stays float32 whatever dtype the
convolutions run in, so code choice does not depend on the activation dtype's rounding of the
codebook.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import PIL.Image
import torch
from torch import nn

from cm3rt.checkpoint import SafetensorsCheckpoint, TensorSpec
from cm3rt.devices import resolve_device, resolve_dtype
from cm3rt.tokenizer.image_io import image_to_tensor, tensor_to_image
from cm3rt.tokenizer.vqgan_config import VQGANConfig
from cm3rt.tokenizer.vqgan_modules import Decoder, Encoder

VQGAN_WEIGHTS = "vqgan.safetensors"
VQGAN_CONFIG = "vqgan_config.json"
HF_VQ_PREFIX = "model.vqmodel."
CODEBOOK = "quantize.embedding.weight"


def _meta_module(factory, cfg: VQGANConfig) -> nn.Module:
    with torch.device("meta"):
        return factory(cfg)


def _materialise(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    # Like module.to_empty(device).to(dtype), but through the plain torch.empty factory:
    # empty_like on a meta tensor runs torch's Python reference, whose first use imports
    # torch.fx's symbolic shapes and sympy (~0.8 s at process start).
    module = module._apply(lambda t: torch.empty(t.shape, dtype=dtype if t.is_floating_point()
                                                 else t.dtype, device=device))
    module.requires_grad_(False)
    return module.eval()


def _specs(module: nn.Module, prefix: str) -> list[TensorSpec]:
    return [TensorSpec(prefix + name, tuple(t.shape), t)
            for name, t in module.state_dict(keep_vars=True).items()]


def taming_tensor_shapes(cfg: VQGANConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a full taming-layout VQGAN with this config."""
    shapes = {}
    for root, factory in (
        ("encoder.", Encoder),
        ("decoder.", Decoder),
        ("quant_conv.", lambda c: nn.Conv2d(c.latent_channels, c.embed_dim, 1)),
        ("post_quant_conv.", lambda c: nn.Conv2d(c.embed_dim, c.latent_channels, 1)),
    ):
        for name, t in _meta_module(factory, cfg).state_dict().items():
            shapes[root + name] = tuple(t.shape)
    shapes[CODEBOOK] = (cfg.num_embeddings, cfg.embed_dim)
    return shapes


def _vq_op(name: str):
    from cm3rt import ops

    fn = getattr(ops, name, None)
    if fn is None:
        raise RuntimeError(f"cm3rt.ops.{name} is missing from this build of cm3rt; the image "
                           "tokenizer needs the VQ kernels (csrc/vq)")
    return fn


class ImageTokenizer:
    """The VQGAN image tokenizer (encoder half always, decoder half when its weights exist).

    Attributes:
        config: the :class:`VQGANConfig`.
        num_tokens: tokens per image (``latent_size ** 2``).
        codebook_size: number of codes ``K``.
        image_size: side in pixels of the square the encoder sees / the decoder draws.
        has_decoder: whether :meth:`decode` is available.
    """

    def __init__(
        self,
        config: VQGANConfig,
        encoder: nn.Module,
        quant_conv: nn.Module,
        codebook: torch.Tensor,
        post_quant_conv: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        """Wrap loaded modules; use :meth:`from_pretrained` to build from files."""
        if codebook.shape != (config.num_embeddings, config.embed_dim):
            raise ValueError(f"argument 'codebook' must be [{config.num_embeddings}, "
                             f"{config.embed_dim}], got {tuple(codebook.shape)}")
        if (decoder is None) != (post_quant_conv is None):
            raise ValueError("arguments 'decoder' and 'post_quant_conv' come together")
        self.config = config
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.codebook = codebook.float().contiguous()  # [K, E], fp32 for the VQ kernels
        self.codebook_sqnorm = self.codebook.pow(2).sum(-1).contiguous()  # [K]
        self.post_quant_conv = post_quant_conv
        self.decoder = decoder
        self._identity: str | None = None

    # ------------------------------------------------------------------ attributes
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.num_embeddings

    @property
    def image_size(self) -> int:
        return self.config.resolution

    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        decoder_path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ImageTokenizer:
        """Load from one of these layouts:

        * a directory with ``vqgan.safetensors`` (taming names: ``encoder.*``,
          ``quant_conv.*``, ``quantize.embedding.weight``, ``post_quant_conv.*``,
          ``decoder.*``) and ``vqgan_config.json`` (what ``cm3rt convert vqgan`` writes),
          or that file itself;
        * an HF Chameleon directory (``config.json`` with ``vq_config``, the model's
          safetensors with ``model.vqmodel.*``): the encoder half; HF stores no decoder,
          so pass ``decoder_path`` (a taming-layout ``vqgan.safetensors`` or its
          directory) for :meth:`decode`. A model directory holding both uses
          ``vqgan.safetensors``.

        Every tensor is checked (presence, shape, dtype) before anything is copied.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"ImageTokenizer: argument 'path' does not exist: {path}")
        taming_file = path if path.is_file() else path / VQGAN_WEIGHTS
        if taming_file.is_file():
            cfg = cls._config_near(taming_file)
            return cls._load(cfg, SafetensorsCheckpoint.open_file(taming_file), "",
                             decoder_ckpt=None, device=device, dtype=dtype, what=str(taming_file))
        hf_config = path / "config.json"
        if not hf_config.is_file():
            raise FileNotFoundError(
                f"ImageTokenizer: {path} holds neither {VQGAN_WEIGHTS} nor an HF config.json")
        try:
            vq = json.loads(hf_config.read_text(encoding="utf-8")).get("vq_config") or {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"ImageTokenizer: {hf_config} is not valid JSON: {exc}") from exc
        cfg = VQGANConfig.from_hf_dict(vq)
        decoder_ckpt = None
        if decoder_path is not None:
            decoder_path = Path(decoder_path)
            if decoder_path.is_dir():
                decoder_path = decoder_path / VQGAN_WEIGHTS
            decoder_ckpt = SafetensorsCheckpoint.open_file(decoder_path)
        ckpt = SafetensorsCheckpoint.open_dir(path)
        prefix = HF_VQ_PREFIX if f"{HF_VQ_PREFIX}{CODEBOOK}" in ckpt else "vqmodel."
        return cls._load(cfg, ckpt, prefix, decoder_ckpt=decoder_ckpt, device=device,
                         dtype=dtype, what=str(path))

    @staticmethod
    def _config_near(weights: Path) -> VQGANConfig:
        own = weights.parent / VQGAN_CONFIG
        if own.is_file():
            return VQGANConfig.from_json(own)
        hf = weights.parent / "config.json"
        if hf.is_file():
            try:
                vq = json.loads(hf.read_text(encoding="utf-8")).get("vq_config")
            except json.JSONDecodeError as exc:
                raise ValueError(f"ImageTokenizer: {hf} is not valid JSON: {exc}") from exc
            if vq:
                return VQGANConfig.from_hf_dict(vq)
        raise FileNotFoundError(f"ImageTokenizer: no {VQGAN_CONFIG} (nor a config.json with "
                                f"vq_config) next to {weights}")

    @classmethod
    def _load(cls, cfg: VQGANConfig, ckpt: SafetensorsCheckpoint, prefix: str, *,
              decoder_ckpt: SafetensorsCheckpoint | None, device: torch.device,
              dtype: torch.dtype, what: str) -> ImageTokenizer:
        encoder = _meta_module(Encoder, cfg)
        quant_conv = _meta_module(
            lambda c: nn.Conv2d(c.latent_channels, c.embed_dim, 1), cfg)
        enc_specs = (_specs(encoder, prefix + "encoder.")
                     + _specs(quant_conv, prefix + "quant_conv.")
                     + [TensorSpec(prefix + CODEBOOK, (cfg.num_embeddings, cfg.embed_dim))])
        # The decoder half: from the same file (taming layout) or a separate one.
        dec_ckpt, dec_prefix = (ckpt, prefix) if decoder_ckpt is None else (decoder_ckpt, "")
        has_decoder = f"{dec_prefix}decoder.conv_in.weight" in dec_ckpt
        if decoder_ckpt is not None and not has_decoder:
            raise ValueError(f"ImageTokenizer: argument 'decoder_path' "
                             f"({[str(f) for f in decoder_ckpt.files()]}) holds no "
                             "'decoder.*' tensors")
        decoder = post_quant = None
        dec_specs: list[TensorSpec] = []
        if has_decoder:
            decoder = _meta_module(Decoder, cfg)
            post_quant = _meta_module(lambda c: nn.Conv2d(c.embed_dim, c.latent_channels, 1), cfg)
            dec_specs = (_specs(decoder, dec_prefix + "decoder.")
                         + _specs(post_quant, dec_prefix + "post_quant_conv."))
        ckpt.check(enc_specs, what=f"ImageTokenizer({what!r})")
        if has_decoder:
            dec_ckpt.check(dec_specs, what=f"ImageTokenizer decoder ({what!r})")
        # copy=True: an owned tensor, not a view of the memory-mapped file
        codebook = ckpt.get(prefix + CODEBOOK).to(device=device, dtype=torch.float32, copy=True)
        if decoder_ckpt is not None and CODEBOOK in decoder_ckpt:
            other = decoder_ckpt.get(CODEBOOK).to(device=device, dtype=torch.float32)
            if other.shape != codebook.shape or not torch.equal(other, codebook):
                raise ValueError("ImageTokenizer: the decoder file's codebook "
                                 f"'{CODEBOOK}' differs from the encoder checkpoint's")
        # All checks passed: allocate for real and copy.
        encoder = _materialise(encoder, device, dtype)
        quant_conv = _materialise(quant_conv, device, dtype)
        ckpt.copy_into(_specs(encoder, prefix + "encoder.")
                       + _specs(quant_conv, prefix + "quant_conv."))
        if has_decoder:
            decoder = _materialise(decoder, device, dtype)
            post_quant = _materialise(post_quant, device, dtype)
            dec_ckpt.copy_into(_specs(decoder, dec_prefix + "decoder.")
                               + _specs(post_quant, dec_prefix + "post_quant_conv."))
        ckpt.close()
        if decoder_ckpt is not None:
            decoder_ckpt.close()
        return cls(cfg, encoder, quant_conv, codebook, post_quant, decoder)

    # ------------------------------------------------------------------ encode
    def preprocess(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """Chameleon preprocessing of PIL images -> float32 ``[N, 3, R, R]`` in [-1, 1]."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if not isinstance(images, Sequence) or isinstance(images, str):
            raise TypeError(f"argument 'images' must be a list of PIL images, got "
                            f"{type(images).__name__}")
        return torch.stack([image_to_tensor(im, self.image_size, f"images[{i}]")
                            for i, im in enumerate(images)]) if len(images) else \
            torch.empty((0, 3, self.image_size, self.image_size))

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
        """Codes of preprocessed images ``[N, 3, R, R]`` -> int64 ``[N, num_tokens]`` (CPU)."""
        r = self.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or \
                tuple(pixels.shape[1:]) != (self.config.in_channels, r, r):
            raise ValueError(f"argument 'pixels' must be [N, {self.config.in_channels}, {r}, {r}]"
                             f", got {tuple(getattr(pixels, 'shape', ()))}")
        if not pixels.is_floating_point():
            raise TypeError(f"argument 'pixels' must be a float tensor, got {pixels.dtype}")
        vq_nearest = _vq_op("vq_nearest")
        out = []
        for start in range(0, pixels.shape[0], batch_size):
            x = pixels[start:start + batch_size].to(self.device, self.dtype)
            z = self.quant_conv(self.encoder(x))  # [n, E, h, w]
            n = z.shape[0]
            flat = z.permute(0, 2, 3, 1).reshape(-1, self.config.embed_dim).float().contiguous()
            idx = vq_nearest(flat, self.codebook, self.codebook_sqnorm)  # [n*h*w], row-major
            if bool((idx < 0).any()):  # the kernel's mark for a row with no finite distance
                raise ValueError(f"ImageTokenizer.encode: the encoder produced non-finite "
                                 f"latents for images {start}..{start + n - 1} (NaN/inf "
                                 "weights or inputs)")
            out.append(idx.view(n, -1).to("cpu", torch.int64))
        if not out:
            return torch.empty((0, self.num_tokens), dtype=torch.int64)
        return torch.cat(out)

    def encode(self, images: Sequence[PIL.Image.Image], batch_size: int = 4) -> torch.Tensor:
        """PIL images -> int64 codes ``[N, num_tokens]`` (CPU), raster order of the grid."""
        return self.encode_pixels(self.preprocess(images), batch_size)

    # ------------------------------------------------------------------ decode
    def check_codes(self, codes: torch.Tensor, name: str = "codes") -> torch.Tensor:
        """Validate ``codes [N, num_tokens]`` (or one image ``[num_tokens]``) -> int64 2-D."""
        codes = torch.as_tensor(codes)
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"argument '{name}' must be an integer tensor, got {codes.dtype}")
        if codes.dim() == 1:
            codes = codes[None]
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"argument '{name}' must be [N, {self.num_tokens}], got "
                             f"{tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"argument '{name}' must hold codes in [0, {self.codebook_size}), "
                             f"got values in [{int(codes.min())}, {int(codes.max())}]")
        return codes.long()

    @torch.inference_mode()
    def decode_pixels(self, codes: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
        """Codes ``[N, num_tokens]`` -> float32 ``[N, 3, R, R]`` (roughly [-1, 1], unclamped)."""
        if self.decoder is None:
            raise ValueError("ImageTokenizer: no decoder weights were loaded (HF Chameleon "
                             "checkpoints hold only the encoder; pass decoder_path= a taming "
                             f"{VQGAN_WEIGHTS})")
        codes = self.check_codes(codes)
        vq_embed = _vq_op("vq_embed")
        s, out = self.latent_size, []
        for start in range(0, codes.shape[0], batch_size):
            c = codes[start:start + batch_size].to(self.device)
            z = vq_embed(c, self.codebook)  # [n, s*s, E]
            z = z.view(c.shape[0], s, s, -1).permute(0, 3, 1, 2).to(self.dtype)
            out.append(self.decoder(self.post_quant_conv(z)).float().cpu())
        if not out:
            return torch.empty((0, 3, self.image_size, self.image_size))
        return torch.cat(out)

    def decode(self, codes: torch.Tensor, batch_size: int = 4) -> list[PIL.Image.Image]:
        """Codes ``[N, num_tokens]`` -> N RGB PIL images of ``image_size`` pixels."""
        return [tensor_to_image(p) for p in self.decode_pixels(codes, batch_size)]

    # ------------------------------------------------------------------ identity
    def identity(self) -> str:
        """Stable hex digest of what determines the codes: config, encoder-side weights
        (encoder, quant_conv, codebook) and the dtype they run in. Memory banks store it to
        know whether their codes still match this tokenizer."""
        if self._identity is None:
            h = hashlib.sha256()
            h.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            h.update(str(self.dtype).encode())
            tensors = {**{f"encoder.{k}": v for k, v in self.encoder.state_dict().items()},
                       **{f"quant_conv.{k}": v for k, v in self.quant_conv.state_dict().items()},
                       CODEBOOK: self.codebook}
            for name in sorted(tensors):
                t = tensors[name].detach().to("cpu", torch.float32).contiguous()
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.numpy().tobytes())
            self._identity = h.hexdigest()
        return self._identity

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``vqgan.safetensors`` (taming names) + ``vqgan_config.json``; returns the
        weights path."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        tensors.update({f"quant_conv.{k}": v for k, v in self.quant_conv.state_dict().items()})
        tensors[CODEBOOK] = self.codebook
        if self.decoder is not None:
            tensors.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
            tensors.update({f"post_quant_conv.{k}": v
                            for k, v in self.post_quant_conv.state_dict().items()})
        out = directory / VQGAN_WEIGHTS
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out))
        self.config.save_json(directory / VQGAN_CONFIG)
        return out
