#!/usr/bin/env python3
"""Measure training-step throughput of the planned model sizes on this machine's CPUs.

    python tools/train/measure_budget.py [--threads 2] [--steps 3]

Times a few optimizer steps (forward, backward, AdamW) of each component of the default
model at the sizes planned in tools/train/README.md, on random data of the right shapes,
and prints items per second and the hours a given number of training items would take.
Used to size the training runs so that all of them fit the 3-hour budget on 2 cores.
The models here are stand-ins of the right size and layout (taming-transformers' VQGAN
encoder/decoder, open_clip's CLIP, a Chameleon-style decoder block), not the trained ones.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Budget:
    """One measurement: component, items per optimizer step, seconds per step."""

    name: str
    items_per_step: int
    wall_s: float
    cpu_s: float

    def items_per_s(self) -> float:
        return self.items_per_step / self.wall_s


def _time_steps(name: str, step, items: int, steps: int) -> Budget:
    step()  # warm-up (allocations, autotuning)
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return Budget(name, items, (time.perf_counter() - w0) / steps, (time.process_time() - c0) / steps)


def vqgan_step(batch: int = 32, ch: int = 32, ch_mult: tuple[int, ...] = (1, 1, 2, 4),
               n_embed: int = 512, res: int = 64):
    """taming Encoder/Decoder, f = 8 (3 downsamplings: 64 px -> 8 x 8 codes), L1 + codebook
    loss, on ``res`` px inputs (32 = the random crops most of the training runs on)."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    cfg = {"ch": ch, "out_ch": 3, "ch_mult": ch_mult, "num_res_blocks": 1,
           "attn_resolutions": [], "in_channels": 3, "resolution": res, "z_channels": 64,
           "double_z": False}
    enc, dec = Encoder(**cfg), Decoder(**cfg)
    codebook = nn.Embedding(n_embed, 64)
    params = [*enc.parameters(), *dec.parameters(), *codebook.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.rand(batch, 3, res, res) * 2 - 1
    side = res // 8

    def step():
        z = enc(x)  # [B, 64, res / 8, res / 8]
        flat = z.permute(0, 2, 3, 1).reshape(-1, 64)
        idx = torch.cdist(flat, codebook.weight).argmin(1)
        q = codebook(idx).view(z.shape[0], side, side, 64).permute(0, 3, 1, 2)
        loss_cb = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        y = dec(z + (q - z).detach())
        loss = F.l1_loss(y, x) + loss_cb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    n_params = sum(p.numel() for p in params)
    return step, batch, n_params


def clip_step(batch: int = 256, vocab: int = 1024, width: int = 128, layers: int = 4,
              context: int = 32):
    """open_clip CLIP: ViT 64 px / patch 8; text transformer over ``context`` tokens."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(
        embed_dim=width,
        vision_cfg=CLIPVisionCfg(layers=layers, width=width, head_width=32, patch_size=8,
                                 image_size=64),
        text_cfg=CLIPTextCfg(context_length=context, vocab_size=vocab, width=width,
                             heads=width // 32, layers=layers),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    images = torch.randn(batch, 3, 64, 64)
    texts = torch.randint(1, vocab, (batch, context))

    def step():
        img, txt, scale = model(images, texts)
        logits = scale * img @ txt.t()
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch, sum(p.numel() for p in model.parameters())


class _Block(nn.Module):
    """Chameleon-style decoder layer: RMSNorm, QKV, per-head qk LayerNorm, SDPA, SwiGLU."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.qn, self.kn = nn.LayerNorm(d // heads), nn.LayerNorm(d // heads)
        self.gate_up = nn.Linear(d, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, -1).unbind(2)
        q, k = self.qn(q), self.kn(k)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        g, u = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


def decoder_step(batch: int = 16, seq: int = 192, d: int = 256, layers: int = 8,
                 heads: int = 4, vocab: int = 1600):
    """Chameleon-layout decoder of hidden d, untied lm_head, next-token loss."""
    ffn = int(math.ceil(8 * d / 3 / 64) * 64)
    model = nn.Sequential(nn.Embedding(vocab, d), *[_Block(d, heads, ffn) for _ in range(layers)],
                          nn.RMSNorm(d), nn.Linear(d, vocab, bias=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    tokens = torch.randint(0, vocab, (batch, seq + 1))

    def step():
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch * seq, sum(p.numel() for p in model.parameters())


PARALLEL_SPEEDUP = 1.8
"""Assumed speed-up of 2 idle cores over one (convolutions and GEMMs split well)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 gives clean CPU-time figures on a busy machine)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vq-ch", type=int, default=32, help="VQGAN base channels (x32: GroupNorm)")
    p.add_argument("--vq-ch-mult", default="1,1,2,4", help="VQGAN channel multipliers")
    p.add_argument("--vq-res", type=int, default=32, help="VQGAN training crop side")
    p.add_argument("--clip-width", type=int, default=96)
    p.add_argument("--clip-layers", type=int, default=3)
    p.add_argument("--clip-context", type=int, default=24)
    p.add_argument("--dec-d", type=int, default=192, help="decoder hidden size")
    p.add_argument("--dec-layers", type=int, default=6)
    p.add_argument("--vq-images", type=int, default=200_000, help="planned VQGAN crops")
    p.add_argument("--clip-pairs", type=int, default=400_000, help="planned CLIP pairs")
    p.add_argument("--dec-tokens", type=int, default=16_000_000, help="planned decoder tokens")
    a = p.parse_args(argv)
    mult = tuple(int(v) for v in a.vq_ch_mult.split(","))
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"torch {torch.__version__}, {a.threads} thread(s), load average {load}; "
          f"projection: 2 idle cores = "
          f"{PARALLEL_SPEEDUP}x one core's CPU-time rate")
    for name, factory, unit, plan in (
        ("vqgan", lambda: vqgan_step(ch=a.vq_ch, ch_mult=mult, res=a.vq_res), "crops",
         a.vq_images),
        ("clip", lambda: clip_step(width=a.clip_width, layers=a.clip_layers,
                                   context=a.clip_context), "pairs", a.clip_pairs),
        ("decoder", lambda: decoder_step(d=a.dec_d, layers=a.dec_layers), "tokens",
         a.dec_tokens),
    ):
        step, items, n_params = factory()
        b = _time_steps(name, step, items, a.steps)
        per_cpu_s = b.items_per_step / b.cpu_s
        hours = plan / (per_cpu_s * PARALLEL_SPEEDUP) / 3600
        print(f"{name:8s} {n_params / 1e6:6.2f} M params  {per_cpu_s:8.1f} {unit}/cpu-s "
              f"({b.items_per_s():8.1f}/s wall here)  {plan:>10,d} {unit} -> {hours:5.2f} h "
              f"on 2 idle cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
