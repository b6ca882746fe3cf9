"""The per-token math of a Chameleon layer on packed ``[T, ...]`` activations, as torch ops:
the CUDA forward, and the reference of the fused CPU ops (``cm3rt.ops.rms_norm`` /
``qk_norm_rope`` / ``swiglu``, tested against these).

Each function mirrors the rounding points of HF transformers' Chameleon, so float32 matches
it to a few ulps and half precision stays within that dtype's tolerance:

* RMSNorm: statistics in float32, cast back to the input dtype, then times the weight.
* qk LayerNorm: per head over ``head_dim`` with a per-head ``[H, D]`` affine (Chameleon
  keeps one gamma/beta per model-parallel shard, HF expands them to every head).
* RoPE: half-split rotation (``rotate_half``), angles ``position * theta^(-2i/D)`` in
  float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dim; statistics in float32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def qk_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm of ``x [T, H, D]`` over D, then the per-head affine ``[H, D]``.

    Statistics are float32 (HF's ``F.layer_norm`` upcasts half inputs internally too).
    """
    y = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps).to(x.dtype)
    return y * weight + bias


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/D)``, float32 ``[D/2]`` (computed as HF does)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos, sin [T, D/2]`` of the angles ``positions[t] * inv_freq``."""
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]``: pairs ``(i, i + D/2)`` by the angle of position t, freq i.

    The rotation runs in float32 and rounds once to ``x``'s dtype.
    """
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of the fused ``[T, 2I]`` gate/up projection (gate first)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
