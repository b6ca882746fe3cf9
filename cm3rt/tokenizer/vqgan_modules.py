"""The VQGAN encoder and decoder networks (taming-transformers architecture, inference only).

Module and parameter names are taming's (``encoder.down.0.block.1.conv2.weight`` ...), which
is also what HF's ``ChameleonVQVAE`` and Chameleon's ``vqgan.ckpt`` use, so their weights load
by name. Blocks:

* ResnetBlock: GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> conv3x3, plus the
  input (through a 1x1 ``nin_shortcut`` when the channel count changes);
* AttnBlock: single-head self-attention over the H*W positions, 1x1 q/k/v/proj convs;
* Downsample: pad right/bottom by one, conv3x3 stride 2 (taming's asymmetric padding);
* Upsample: nearest x2, conv3x3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cm3rt.tokenizer.vqgan_config import GROUPNORM_GROUPS, VQGANConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPNORM_GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (no timestep embedding: taming's VQGAN uses none)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Self-attention across spatial positions (one head of ``channels`` dims)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            return t.reshape(b, c, hh * ww).transpose(1, 2).unsqueeze(1)

        o = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)),
                                           tokens(self.v(h)))  # scale 1/sqrt(C)
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Halve H and W: zero-pad one row/column at the end, conv3x3 stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then conv3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """One resolution level: residual blocks, their optional attention, a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image ``[B, in_channels, R, R]`` in [-1, 1] -> latent ``[B, latent_channels, r, r]``."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multiplier
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        res, block_in = cfg.resolution, ch
        for level, m in enumerate(mult):
            stage = _Stage()
            block_out = ch * m
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions and cfg.attn_type == "vanilla":
                    stage.attn.append(AttnBlock(block_in))
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = _Middle(block_in, cfg.attn_type == "vanilla")
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.latent_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run_blocks(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, latent_channels, r, r]`` -> image ``[B, out_channels, R, R]`` (~[-1, 1])."""

    def __init__(self, cfg: VQGANConfig) -> None:
        super().__init__()
        ch, mult = cfg.base_channels, cfg.channel_multiplier
        block_in = ch * mult[-1]
        res = cfg.latent_size
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, 1, 1)
        self.mid = _Middle(block_in, cfg.attn_type == "vanilla")
        stages: list[_Stage] = []
        for level in reversed(range(len(mult))):
            stage = _Stage()
            block_out = ch * mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions and cfg.attn_type == "vanilla":
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)  # up[0] is the full-resolution level, as in taming
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage.run_blocks(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
