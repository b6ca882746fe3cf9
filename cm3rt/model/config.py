"""ChameleonConfig: the decoder's hyper-parameters, read from an HF ``config.json``.

Field names follow HF transformers' ``ChameleonConfig`` so a directory HF wrote loads as is.
Things this runtime does not implement (biases in attention/MLP, activations other than
SiLU, RoPE scaling) are rejected here, at load time, with the offending field named,
rather than silently computing something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cm3rt.tokenizer.image_vocab import ImageVocabulary

# Head dims the attention kernels are compiled for (csrc/common/dispatch.h,
# CM3RT_DISPATCH_HEAD_DIM); checked at load so a model fails early, not mid-forward.
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)

# HF architecture names whose checkpoints share the weight names this loader reads.
KNOWN_ARCHITECTURES = ("ChameleonForConditionalGeneration", "ChameleonModel")

# Vocabulary names of Chameleon's special tokens (the CM3Leon "break" opens an image span).
BOI_TOKEN = "<racm3:break>"
EOI_TOKEN = "<eoss>"
IMAGE_PLACEHOLDER_TOKEN = "<image>"


@dataclass
class ChameleonConfig:
    """Hyper-parameters of a Chameleon decoder (HF ``ChameleonConfig`` field names).

    ``image_token_ids[c]`` is the vocabulary id of VQ code ``c`` (empty when the config has
    no ``vocabulary_map``); ``boi_token_id`` / ``eoi_token_id`` open and close an image span.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    swin_norm: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    # Chameleon's qk LayerNorm uses a fixed epsilon (HF hard-codes 1e-5 too).
    qk_norm_eps: float = 1e-5
    boi_token_id: int | None = None
    eoi_token_id: int | None = None
    image_token_id: int | None = None  # HF's "<image>" placeholder, not an image code
    image_token_ids: tuple[int, ...] = ()
    vocabulary_map: dict[str, int] | None = field(default=None, repr=False)
    vq_config: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config: '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                "config: 'num_attention_heads' must be a multiple of 'num_key_value_heads', "
                f"got {self.num_attention_heads} and {self.num_key_value_heads}"
            )
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"config: 'hidden_size' ({self.hidden_size}) must equal num_attention_heads "
                f"({self.num_attention_heads}) x head_dim ({self.head_dim})"
            )
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"config: head_dim {self.head_dim} is not supported by the attention kernels "
                f"(supported: {SUPPORTED_HEAD_DIMS})"
            )
        if self.image_token_ids and max(self.image_token_ids) >= self.vocab_size:
            raise ValueError(
                f"config: image token ids reach {max(self.image_token_ids)}, beyond "
                f"vocab_size {self.vocab_size}"
            )

    @property
    def num_image_codes(self) -> int:
        """Codebook size the vocabulary spells (0 without a vocabulary map)."""
        return len(self.image_token_ids)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ChameleonConfig:
        """Build from the dict of an HF Chameleon ``config.json``.

        Raises ValueError naming the field for an unknown architecture or an unsupported
        option (attention/MLP bias, activation other than SiLU, RoPE scaling).
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        arch = d.get("architectures") or []
        model_type = d.get("model_type")
        if model_type != "chameleon" and not any(a in KNOWN_ARCHITECTURES for a in arch):
            raise ValueError(
                f"config: unknown architecture (model_type={model_type!r}, "
                f"architectures={arch!r}); expected model_type 'chameleon' or one of "
                f"{KNOWN_ARCHITECTURES}"
            )
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config: 'hidden_act' must be 'silu', got {d['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config: '{flag}' = true is not supported (Chameleon has none)")

        hidden = _req_int(d, "hidden_size")
        heads = _req_int(d, "num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = hidden // heads if heads else 0
        if d.get("head_dim") not in (None, head_dim):
            raise ValueError(
                f"config: 'head_dim' {d['head_dim']} differs from hidden_size / "
                f"num_attention_heads = {head_dim}; Chameleon ties them"
            )
        rope_theta = _rope_theta(d)

        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        vocab_size = _req_int(d, "vocab_size")
        vmap = d.get("vocabulary_map")
        image_ids: tuple[int, ...] = ()
        boi = eoi = placeholder = None
        if vmap:
            if not isinstance(vmap, dict):
                raise ValueError(f"config: 'vocabulary_map' must be a dict, got {type(vmap)}")
            image_ids = tuple(
                ImageVocabulary.from_vocab(vmap, vocab_size).code_to_id_table.tolist()
            )
            boi, eoi = vmap.get(BOI_TOKEN), vmap.get(EOI_TOKEN)
            placeholder = vmap.get(IMAGE_PLACEHOLDER_TOKEN)
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=_req_int(d, "intermediate_size"),
            num_hidden_layers=_req_int(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=head_dim,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            rope_theta=rope_theta,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            swin_norm=bool(d.get("swin_norm", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
            boi_token_id=boi,
            eoi_token_id=eoi,
            image_token_id=placeholder,
            image_token_ids=image_ids,
            vocabulary_map=dict(vmap) if vmap else None,
            vq_config=d.get("vq_config"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ChameleonConfig:
        """Read ``config.json`` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {path} is not valid JSON: {exc}") from exc
        return cls.from_hf_dict(d)

    def image_token_id_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``image_token_ids`` as an int64 tensor (index = VQ code)."""
        return torch.tensor(self.image_token_ids, dtype=torch.int64, device=device)


def _req_int(d: dict[str, Any], key: str) -> int:
    if key not in d:
        raise ValueError(f"config: required field '{key}' is missing")
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"config: '{key}' must be an integer, got {value!r}")
    return value


def _rope_theta(d: dict[str, Any]) -> float:
    """RoPE base from either HF 5.x ``rope_parameters`` or the older ``rope_theta`` field."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config: rope_type {rope_type!r} is not supported (only 'default')")
        return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    if scaling:
        raise ValueError(f"config: 'rope_scaling' {scaling!r} is not supported")
    return float(d.get("rope_theta", 10000.0))
