"""VQGANConfig: sizes of the taming-transformers VQGAN that Chameleon tokenizes images with.

Field names follow HF's ``ChameleonVQVAEConfig`` (the ``vq_config`` of a Chameleon
``config.json``); :meth:`VQGANConfig.from_taming` reads the ``model.params`` of a taming
``vqgan.yaml`` (``ddconfig`` + ``embed_dim`` + ``n_embed``). The defaults are Chameleon's:
512 px, ch 128, ch_mult 1,1,2,2,4, 8192 codes of 256 dims -> 32 x 32 = 1024 tokens.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# taming ddconfig name -> our (HF) name
_TAMING_NAMES = {
    "ch": "base_channels",
    "out_ch": "out_channels",
    "ch_mult": "channel_multiplier",
    "double_z": "double_latent",
    "z_channels": "latent_channels",
    "resolution": "resolution",
    "in_channels": "in_channels",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "attn_type": "attn_type",
}

GROUPNORM_GROUPS = 32  # taming's Normalize(): GroupNorm(32 groups, eps 1e-6)


@dataclass
class VQGANConfig:
    """Encoder/decoder/codebook sizes (HF ``ChameleonVQVAEConfig`` names)."""

    resolution: int = 512
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = field(default_factory=tuple)
    attn_type: str = "vanilla"  # "vanilla": self-attention in the middle block; "none"
    latent_channels: int = 256
    embed_dim: int = 256
    num_embeddings: int = 8192
    double_latent: bool = False
    dropout: float = 0.0  # training only; kept so configs round-trip

    def __post_init__(self) -> None:
        self.channel_multiplier = tuple(int(m) for m in self.channel_multiplier)
        self.attn_resolutions = tuple(int(r) for r in (self.attn_resolutions or ()))
        for name in ("resolution", "in_channels", "out_channels", "base_channels",
                     "num_res_blocks", "latent_channels", "embed_dim", "num_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vq config: '{name}' must be a positive integer, got {value!r}")
        if not self.channel_multiplier or min(self.channel_multiplier) <= 0:
            raise ValueError(f"vq config: 'channel_multiplier' must be positive integers, got "
                             f"{self.channel_multiplier}")
        for m in self.channel_multiplier:
            if (self.base_channels * m) % GROUPNORM_GROUPS:
                raise ValueError(
                    f"vq config: base_channels x channel_multiplier ({self.base_channels} x {m})"
                    f" must be a multiple of {GROUPNORM_GROUPS} (GroupNorm groups)")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"vq config: resolution {self.resolution} must be divisible by the "
                             f"downsampling factor {self.downsample_factor}")
        if self.double_latent:
            raise ValueError("vq config: 'double_latent' (double_z) = true is not a VQGAN "
                             "(it is the KL autoencoder's); not supported")
        if self.attn_type not in ("vanilla", "none"):
            raise ValueError(f"vq config: 'attn_type' must be 'vanilla' or 'none', got "
                             f"{self.attn_type!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along a side (2 ** number of downsamplings)."""
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def latent_size(self) -> int:
        """Latent grid side (32 for Chameleon)."""
        return self.resolution // self.downsample_factor

    @property
    def num_tokens(self) -> int:
        """Tokens per image (latent_size squared; 1024 for Chameleon)."""
        return self.latent_size ** 2

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        """From an HF Chameleon ``vq_config`` dict (unknown keys are ignored)."""
        if not isinstance(d, dict):
            raise TypeError(f"vq config must be a dict, got {type(d).__name__}")
        names = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("attn_type") is None and "attn_type" in kwargs:
            kwargs["attn_type"] = "none"
        return cls(**kwargs)

    @classmethod
    def from_taming(cls, params: dict[str, Any]) -> VQGANConfig:
        """From the ``model.params`` of a taming ``vqgan.yaml``."""
        if not isinstance(params, dict):
            raise TypeError(f"vq config: taming 'model.params' must be a mapping, got "
                            f"{type(params).__name__}")
        dd = params.get("ddconfig")
        if dd is None:
            raise ValueError("vq config: taming 'model.params' lacks a 'ddconfig' mapping "
                             f"(keys: {sorted(params)})")
        if not isinstance(dd, dict):
            raise TypeError(f"vq config: 'ddconfig' must be a mapping, got {type(dd).__name__}")
        kwargs = {_TAMING_NAMES[k]: v for k, v in dd.items() if k in _TAMING_NAMES}
        for key, ours in (("embed_dim", "embed_dim"), ("n_embed", "num_embeddings")):
            if key not in params:
                raise ValueError(f"vq config: taming params lack '{key}'")
            kwargs[ours] = params[key]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (HF ``vq_config`` names)."""
        d = asdict(self)
        d["channel_multiplier"] = list(self.channel_multiplier)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> VQGANConfig:
        """Read a ``vqgan_config.json`` written by :meth:`save_json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vq config: no such file: {path}")
        try:
            return cls.from_hf_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as exc:
            raise ValueError(f"vq config: {path} is not valid JSON: {exc}") from exc

    def save_json(self, path: str | Path) -> None:
        """Write as JSON (what :meth:`from_json` reads)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
