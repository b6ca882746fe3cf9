"""CLIP text tower without open_clip: torch + safetensors + HF ``tokenizers`` only.

A text -> image prompt needs only the CLIP *text* embedding of its query (bank documents are
pre-embedded), and importing open_clip costs seconds (it pulls in torchvision and
transformers). :class:`ClipTextTower` reproduces, for the configurations it accepts,
exactly what open_clip computes for ``CLIP.encode_text`` of a local-dir model (open_clip
3.x ``TextTransformer`` under ``CLIP``): the HFTokenizer's cleaning, ids, truncation and
padding; token + positional embedding; pre-LN residual blocks with causal multi-head
attention; ``ln_final``; eos/argmax/first/last pooling; the projection. Anything else
(custom or HF text towers, attention pooling, SimpleTokenizer, cls tokens, ...) is refused
by :func:`unsupported_reason`, and the caller uses open_clip instead.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIG_FILE = "open_clip_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Files transformers' AutoTokenizer would also read: with them the ids may differ, so refuse.
_EXTRA_TOKENIZER_FILES = ("special_tokens_map.json", "added_tokens.json")

# open_clip CLIPTextCfg keys and the values this module implements (anything else: refuse).
_TEXT_DEFAULTS = {"embed_cls": False, "final_ln_after_pool": False, "act_kwargs": None,
                  "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                  "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
                  "scale_fc": False, "hf_model_name": None, "tokenizer_mode": None}
_TEXT_HANDLED = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio",
                 "ls_init_value", "pad_id", "eos_id", "no_causal_mask", "pool_type",
                 "proj_bias", "proj_type", "norm_kwargs", "hf_tokenizer_name",
                 "tokenizer_kwargs", "output_tokens", "hf_model_pretrained", "hf_proj_type",
                 "hf_pooler_type"}
_MODEL_HANDLED = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale",
                  "init_logit_bias", "nonscalar_logit_scale", "custom_text"}
_POOLS = ("first", "last", "argmax", "eos")
_CLEANS = ("whitespace", "lower")
_TOKENIZER_CONFIG_KEYS = {"tokenizer_class", "bos_token", "eos_token", "pad_token",
                          "unk_token", "mask_token", "sep_token", "cls_token",
                          "model_max_length", "clean_up_tokenization_spaces", "padding_side",
                          "truncation_side"}
# Printable ASCII, space, tab and newline: text that ftfy.fix_text provably leaves alone
# (no mojibake, HTML entity, terminal escape, control char, curly quote or line-break
# variant), so ftfy - slow to import - is only loaded for other text.
_FTFY_NOOP = re.compile(r"[ -%'-~\t\n]*")


class UnsupportedTower(ValueError):
    """The model's text tower or tokenizer is not one :class:`ClipTextTower` reproduces."""


@dataclass(frozen=True)
class TextTowerConfig:
    """What the forward pass needs from ``model_cfg`` (open_clip's names)."""

    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int
    mlp_width: int
    embed_dim: int
    layer_scale: bool
    causal: bool
    pool_type: str
    eos_id: int
    proj: str  # "matrix" (x @ P), "linear" (nn.Linear with bias) or "none"
    quick_gelu: bool
    ln_eps: float
    clean: str  # HFTokenizer cleaning: "whitespace" or "lower"


def find_checkpoint(folder: Path) -> Path | None:
    """The weights file open_clip's local-dir loader picks (same preference order)."""
    found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext))
    found.sort(key=lambda p: p.suffix == ".safetensors", reverse=True)  # stable, like open_clip
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                 "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"]
    named = sorted((p for p in found if p.name in preferred), key=lambda p: preferred.index(p.name))
    return named[0] if named else (found[0] if found else None)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UnsupportedTower(f"{path} is not readable JSON: {e}") from e
    if not isinstance(d, dict):
        raise UnsupportedTower(f"{path}: expected a JSON object")
    return d


def tower_config(model_cfg: dict) -> TextTowerConfig:
    """Check ``model_cfg`` (open_clip_config.json's ``model_cfg``) and extract the text tower.

    Raises UnsupportedTower naming the first setting this module does not reproduce.
    """
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("text_cfg"), dict):
        raise UnsupportedTower("model_cfg: expected an object with a text_cfg object")
    extra = sorted(set(model_cfg) - _MODEL_HANDLED)
    if extra:
        raise UnsupportedTower(f"model_cfg: keys {extra} are not implemented here")
    if model_cfg.get("custom_text"):
        raise UnsupportedTower("model_cfg: custom_text (CustomTextCLIP) is not implemented here")
    t = model_cfg["text_cfg"]
    extra = sorted(set(t) - _TEXT_HANDLED - set(_TEXT_DEFAULTS))
    if extra:
        raise UnsupportedTower(f"text_cfg: keys {extra} are not implemented here")
    for key, default in _TEXT_DEFAULTS.items():
        allowed = (None, "default") if key == "block_type" else (default,)
        if t.get(key, default) not in allowed:
            raise UnsupportedTower(f"text_cfg: {key}={t[key]!r} is not implemented here")
    if not t.get("hf_tokenizer_name"):
        raise UnsupportedTower("text_cfg: no hf_tokenizer_name (open_clip's SimpleTokenizer) "
                               "is not implemented here")
    kwargs = t.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"clean"}:
        raise UnsupportedTower(f"text_cfg: tokenizer_kwargs {kwargs!r} are not implemented "
                               "here (only 'clean')")
    clean = kwargs.get("clean", "whitespace")
    if clean not in _CLEANS:
        raise UnsupportedTower(f"text_cfg: tokenizer clean={clean!r} is not implemented here")
    pool = t.get("pool_type", "argmax")
    if pool not in _POOLS:
        raise UnsupportedTower(f"text_cfg: pool_type={pool!r} is not implemented here")
    norm = t.get("norm_kwargs") or {}
    if not isinstance(norm, dict) or set(norm) - {"eps"}:
        raise UnsupportedTower(f"text_cfg: norm_kwargs {norm!r} are not implemented here")
    embed_dim = model_cfg.get("embed_dim")
    proj_type = t.get("proj_type", "linear")
    if proj_type == "none" or not embed_dim:
        proj = "none"
    elif proj_type == "linear":
        proj = "linear" if t.get("proj_bias", False) else "matrix"
    else:
        raise UnsupportedTower(f"text_cfg: proj_type={proj_type!r} is not implemented here")
    try:
        width = int(t.get("width", 512))
        cfg = TextTowerConfig(
            context_length=int(t.get("context_length", 77)),
            vocab_size=int(t.get("vocab_size", 49408)), width=width,
            heads=int(t.get("heads", 8)), layers=int(t.get("layers", 12)),
            mlp_width=int(width * float(t.get("mlp_ratio", 4.0))),
            embed_dim=int(embed_dim) if proj != "none" else width,
            layer_scale=t.get("ls_init_value") is not None,
            causal=not t.get("no_causal_mask", False), pool_type=pool,
            eos_id=int(t.get("eos_id", 2)), proj=proj,
            quick_gelu=bool(model_cfg.get("quick_gelu", False)),
            ln_eps=float(norm.get("eps", 1e-5)), clean=clean)
    except (TypeError, ValueError) as e:
        raise UnsupportedTower(f"text_cfg: malformed value ({e})") from e
    if cfg.width % cfg.heads:
        raise UnsupportedTower(f"text_cfg: width {cfg.width} is not a multiple of heads "
                               f"{cfg.heads}")
    return cfg


def _check_tokenizer_files(folder: Path) -> dict:
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            raise UnsupportedTower(f"tokenizer: {folder / name} is missing")
    for name in _EXTRA_TOKENIZER_FILES:
        if (folder / name).exists():
            raise UnsupportedTower(f"tokenizer: {folder / name} is not implemented here")
    tc = _read_json(folder / "tokenizer_config.json")
    if tc.get("tokenizer_class") != "PreTrainedTokenizerFast":
        raise UnsupportedTower(f"tokenizer: class {tc.get('tokenizer_class')!r} is not "
                               "implemented here (only PreTrainedTokenizerFast)")
    extra = sorted(set(tc) - _TOKENIZER_CONFIG_KEYS)
    if extra:
        raise UnsupportedTower(f"tokenizer: tokenizer_config.json keys {extra} are not "
                               "implemented here")
    for key in sorted(_TOKENIZER_CONFIG_KEYS):
        if key.endswith("_token") and not isinstance(tc.get(key), (str, type(None))):
            raise UnsupportedTower(f"tokenizer: {key}={tc[key]!r} is not implemented here "
                                   "(expected a token string)")
    for side in ("padding_side", "truncation_side"):
        if tc.get(side, "right") != "right":
            raise UnsupportedTower(f"tokenizer: {side}={tc[side]!r} is not implemented here")
    if not isinstance(tc.get("pad_token"), str):
        raise UnsupportedTower("tokenizer: no pad_token (padding to the context needs one)")
    return tc


def unsupported_reason(folder: str | Path) -> str | None:
    """Why :class:`ClipTextTower` cannot reproduce the local-dir CLIP in ``folder``, or None.

    Checks the config, the tokenizer files and the weights file open_clip would load (it
    must be .safetensors); the weight shapes are checked when loading.
    """
    folder = Path(folder)
    try:
        raw = _read_json(folder / CONFIG_FILE)
        if "model_cfg" not in raw:
            raise UnsupportedTower(f"{folder / CONFIG_FILE} has no model_cfg")
        tower_config(raw["model_cfg"])
        _check_tokenizer_files(folder)
        check_safetensors_checkpoint(folder)
    except UnsupportedTower as e:
        return str(e)
    return None


def check_safetensors_checkpoint(folder: Path) -> Path:
    """The weights file open_clip would load from ``folder``; UnsupportedTower unless it is a
    .safetensors file (the towers never unpickle)."""
    ckpt = find_checkpoint(folder)
    if ckpt is None or ckpt.suffix != ".safetensors":
        raise UnsupportedTower(f"weights: expected open_clip to load a .safetensors file "
                               f"from {folder}, got {ckpt}")
    return ckpt


def supports(folder: str | Path) -> bool:
    """True when :class:`ClipTextTower` reproduces the CLIP in ``folder`` exactly."""
    return unsupported_reason(folder) is None


def clean_text(text: str, mode: str) -> str:
    """open_clip's HFTokenizer cleaning (``basic_clean`` + whitespace, maybe lower-cased)."""
    if not _FTFY_NOOP.fullmatch(text):
        import ftfy  # what open_clip's basic_clean runs; not needed for plain ASCII

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split()).strip()
    return text.lower() if mode == "lower" else text


class ClipTextTower:
    """open_clip ``CLIP.encode_text`` (fp32) for a local-dir model, without open_clip.

    Build with :meth:`from_dir`; :meth:`encode` returns L2-normalised float32 [N, E].
    """

    def __init__(self, cfg: TextTowerConfig, weights: dict[str, torch.Tensor], tokenizer,
                 pad_id: int, device: torch.device) -> None:
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        self.device = device
        self.w = weights
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        n = cfg.context_length
        self.mask = (torch.full((n, n), float("-inf"), device=device).triu_(1)
                     if cfg.causal else None)

    @classmethod
    def from_dir(cls, folder: str | Path, device: str | torch.device = "cpu") -> ClipTextTower:
        """Load config, tokenizer and text weights; UnsupportedTower when not reproducible."""
        from safetensors import safe_open
        from tokenizers import Tokenizer

        folder = Path(folder)
        reason = unsupported_reason(folder)
        if reason is not None:
            raise UnsupportedTower(reason)
        cfg = tower_config(_read_json(folder / CONFIG_FILE)["model_cfg"])
        tc = _check_tokenizer_files(folder)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # transformers would add a named special token that tokenizer.json lacks (or holds
        # as an ordinary token) as a new special token, changing the ids: refuse those.
        specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        for key in sorted(_TOKENIZER_CONFIG_KEYS):
            if key.endswith("_token") and tc.get(key) is not None and tc[key] not in specials:
                raise UnsupportedTower(f"tokenizer: {key} {tc[key]!r} is not a special token "
                                       "of tokenizer.json")
        pad_id = tok.token_to_id(tc["pad_token"])
        # What transformers' fast tokenizer does for padding="max_length", truncation=True.
        tok.enable_truncation(max_length=cfg.context_length, strategy="longest_first",
                              direction="right")
        tok.enable_padding(direction="right", pad_id=pad_id, pad_token=tc["pad_token"],
                           length=cfg.context_length)
        device = torch.device(device)
        expected = cls._expected_shapes(cfg)
        weights = {}
        with safe_open(str(find_checkpoint(folder)), framework="pt") as f:
            present = set(f.keys())
            missing = sorted(set(expected) - present)
            if missing:
                raise UnsupportedTower(f"weights: text tower tensors {missing[:4]} missing")
            for key, shape in expected.items():
                t = f.get_tensor(key)
                if tuple(t.shape) != shape:
                    raise UnsupportedTower(f"weights: {key} has shape {list(t.shape)}, "
                                           f"expected {list(shape)}")
                weights[key] = t.to(device=device, dtype=torch.float32)
        return cls(cfg, weights, tok, pad_id, device)

    @staticmethod
    def _expected_shapes(cfg: TextTowerConfig) -> dict[str, tuple[int, ...]]:
        w, m = cfg.width, cfg.mlp_width
        s = {"token_embedding.weight": (cfg.vocab_size, w),
             "positional_embedding": (cfg.context_length, w),
             "ln_final.weight": (w,), "ln_final.bias": (w,)}
        for i in range(cfg.layers):
            p = f"transformer.resblocks.{i}."
            s.update({p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                      p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
                      p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
                      p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                      p + "mlp.c_fc.weight": (m, w), p + "mlp.c_fc.bias": (m,),
                      p + "mlp.c_proj.weight": (w, m), p + "mlp.c_proj.bias": (w,)})
            if cfg.layer_scale:
                s.update({p + "ls_1.gamma": (w,), p + "ls_2.gamma": (w,)})
        if cfg.proj == "matrix":
            s["text_projection"] = (w, cfg.embed_dim)
        elif cfg.proj == "linear":
            s["text_projection.weight"] = (cfg.embed_dim, w)
            s["text_projection.bias"] = (cfg.embed_dim,)
        return s

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, context_length] (int64), as open_clip's HFTokenizer gives them."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts: expected a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
        if not texts:
            return torch.empty(0, self.cfg.context_length, dtype=torch.long)
        enc = self.tokenizer.encode_batch([clean_text(t, self.cfg.clean) for t in texts])
        return torch.tensor([e.ids for e in enc], dtype=torch.long)

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.cfg.width,), self.w[name + ".weight"],
                            self.w[name + ".bias"], self.cfg.ln_eps)

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x) if self.cfg.quick_gelu else F.gelu(x)

    @torch.inference_mode()
    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features [N, E] of token ids [N, context_length]."""
        cfg, w = self.cfg, self.w
        tokens = tokens.to(self.device)
        n, length = tokens.shape
        if length != cfg.context_length:
            raise ValueError(f"tokens: expected {cfg.context_length} per row, got {length}")
        if n and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"tokens: expected ids in [0, {cfg.vocab_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        h, d = cfg.heads, cfg.width // cfg.heads
        x = w["token_embedding.weight"][tokens] + w["positional_embedding"]
        for i in range(cfg.layers):
            p = f"transformer.resblocks.{i}."
            qkv = F.linear(self._ln(x, p + "ln_1"), w[p + "attn.in_proj_weight"],
                           w[p + "attn.in_proj_bias"])
            q, k, v = (t.reshape(n, length, h, d).transpose(1, 2) for t in qkv.chunk(3, -1))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d)
                                + (self.mask if self.mask is not None else 0.0), dim=-1) @ v
            a = F.linear(att.transpose(1, 2).reshape(n, length, cfg.width),
                         w[p + "attn.out_proj.weight"], w[p + "attn.out_proj.bias"])
            x = x + (a * w[p + "ls_1.gamma"] if cfg.layer_scale else a)
            m = F.linear(self._act(F.linear(self._ln(x, p + "ln_2"), w[p + "mlp.c_fc.weight"],
                                            w[p + "mlp.c_fc.bias"])),
                         w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"])
            x = x + (m * w[p + "ls_2.gamma"] if cfg.layer_scale else m)
        x = self._ln(x, "ln_final")
        rows = torch.arange(n, device=x.device)
        if cfg.pool_type == "first":
            x = x[:, 0]
        elif cfg.pool_type == "last":
            x = x[:, -1]
        elif cfg.pool_type == "argmax":  # the eot id is the largest in CLIP's vocabulary
            x = x[rows, tokens.argmax(dim=-1)]
        else:  # "eos": the first eos token (position 0 when there is none, as open_clip)
            x = x[rows, (tokens == cfg.eos_id).int().argmax(dim=-1)]
        if cfg.proj == "matrix":
            x = x @ w["text_projection"]
        elif cfg.proj == "linear":
            x = F.linear(x, w["text_projection.weight"], w["text_projection.bias"])
        return x

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings: float32 [N, E] on the CPU."""
        x = self.forward_tokens(self.tokenize(texts)).float()
        return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu()
