"""The default model's decoder as a trainable torch module, with HF Chameleon's weight names.

HF's ``ChameleonForConditionalGeneration`` masks image-token logits in its forward (it
generates text only), so it cannot be trained on text -> image sequences. This module
computes what cm3rt's ``ChameleonModel`` computes (pre-norm blocks, per-head qk LayerNorm,
rotate-half RoPE, SwiGLU, RMSNorm, untied lm_head; ``swin_norm`` off), on padded batches
with ``scaled_dot_product_attention``. Its ``state_dict()`` keys are HF's
(``model.layers.{i}.self_attn.q_proj.weight`` ...), so ``save_hf`` writes a directory that
``cm3rt.model.load_model`` reads through its normal loader; ``tests/test_train_decoder.py``
checks that the two give the same logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder size (HF ``ChameleonConfig`` field names)."""

    vocab_size: int
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class HeadLayerNorm(nn.Module):
    """LayerNorm over the head dim with a per-head affine ``[H, D]`` (Chameleon's qk norm)."""

    def __init__(self, heads: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dim))
        self.bias = nn.Parameter(torch.zeros(heads, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H, D]
        return F.layer_norm(x, (x.shape[-1],), None, None, 1e-5) * self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.nq, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.nq * d, bias=False)
        self.k_proj = nn.Linear(h, self.nkv * d, bias=False)
        self.v_proj = nn.Linear(h, self.nkv * d, bias=False)
        self.o_proj = nn.Linear(self.nq * d, h, bias=False)
        self.q_norm = HeadLayerNorm(self.nq, d)
        self.k_norm = HeadLayerNorm(self.nkv, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = rope(self.q_norm(self.q_proj(x).view(b, t, self.nq, self.d)), cos, sin)
        k = rope(self.k_norm(self.k_proj(x).view(b, t, self.nkv, self.d)), cos, sin)
        v = self.v_proj(x).view(b, t, self.nkv, self.d)
        # Query head i reads kv head i // (nq / nkv), as cm3rt's paged kernel and HF do.
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.nq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of ``x [B, T, H, D]`` (HF Chameleon's rotate-half RoPE)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class TrainableChameleon(nn.Module):
    """Decoder + lm_head; ``state_dict()`` names are HF Chameleon's."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 L)."""
        out_std = 0.02 / math.sqrt(2 * self.cfg.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                nn.init.normal_(p, 0.0, out_std if name.endswith(("o_proj.weight",
                                                                  "down_proj.weight")) else 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, T]`` (positions 0..T-1 each row) -> float32 logits ``[B, T, V]``."""
        t = ids.shape[1]
        angles = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def hf_config(self, vocabulary_map: dict[str, int], vq_config: dict[str, Any],
                  special: dict[str, int]) -> dict[str, Any]:
        """An HF ``config.json`` dict for these weights."""
        c = asdict(self.cfg)
        theta = c.pop("rope_theta")
        return {
            "architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
            **c, "head_dim": self.cfg.head_dim, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "swin_norm": False, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "bos_token_id": special["bos"], "eos_token_id": special["eos"],
            "pad_token_id": special["pad"], "vocabulary_map": vocabulary_map,
            "vq_config": vq_config,
        }

    def save_hf(self, out: Path, config: dict[str, Any], dtype: torch.dtype = torch.float32
                ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (HF names) into ``out``."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        tmp = out / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
        return out
