#!/usr/bin/env python3
"""Is bf16 autocast faster than fp32 for the default model's training steps on this CPU?

    python tools/train/measure_autocast.py [--threads 1] [--reps 5] [--steps 3]

Times optimizer steps (forward + loss under ``torch.autocast("cpu", torch.bfloat16)`` or
in fp32, then backward and AdamW) of the real decoder (``decoder_model.TrainableChameleon``
at the default size) at two batch shapes, and of the real VQGAN (``train_vqgan``) in both of
its phases on its own training batches. bf16 and fp32 steps alternate in one process, so a
noisy machine slows both alike; each row is the median over ``--reps`` rounds. The result
decides tools/train/README.md's "fp32" (decoder section): autocast is used only where it
pays. Random token ids stand in for the decoder's sequences (the cost does not depend on
their values).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_vqgan
from decoder_model import DecoderConfig, TrainableChameleon

VOCAB = 704  # the default decoder's vocabulary (tools/train/README.md, step 6)


def cpu_bf16_flags() -> str:
    """The CPU's bf16-related flags from /proc/cpuinfo ('' where none or not Linux)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile"))


def alternate(step, reps: int, steps: int) -> dict[bool, float]:
    """{bf16: median seconds a step}, bf16 and fp32 rounds alternating after a warm-up."""
    for bf16 in (False, True):
        step(bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for bf16 in (False, True):
            t = time.perf_counter()
            for _ in range(steps):
                step(bf16)
            times[bf16].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def decoder_rows(shapes: list[tuple[int, int]], reps: int, steps: int):
    torch.manual_seed(0)
    model = TrainableChameleon(DecoderConfig(vocab_size=VOCAB, num_hidden_layers=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch, length in shapes:
        ids = torch.randint(0, VOCAB, (batch, length + 1))

        def step(bf16: bool, ids: torch.Tensor = ids) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(ids[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        yield f"decoder, {batch} x {length} tokens", alternate(step, reps, steps)


def vqgan_rows(batch: int, reps: int, steps: int):
    torch.manual_seed(0)
    cfg = train_vqgan.default_config()
    model = train_vqgan.TrainableVQGAN(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, codes = train_vqgan.training_batch(np.random.default_rng(0), batch, 0.5, cfg.resolution)
    for joint, name in ((True, "VQGAN phase 1 (joint)"), (False, "VQGAN phase 2 (decoder)")):

        def step(bf16: bool, joint: bool = joint) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                rec = model.draw(codes, cfg.latent_size, train_codebook=joint)
                err = rec.float() - x
                loss = err.abs().mean() + err.pow(2).mean()
                if joint:
                    loss = loss + F.cross_entropy(model.code_logits(x).float(),
                                                  codes.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        yield f"{name}, batch {batch}", alternate(step, reps, steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="alternating rounds (median)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps a round")
    p.add_argument("--decoder-shapes", default="64x64,16x256",
                   help="comma-separated BATCHxTOKENS (default: the training shape and a "
                        "long one)")
    p.add_argument("--vqgan-batch", type=int, default=train_vqgan.VQGANOptions.batch)
    a = p.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in a.decoder_shapes.split(",")]
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        p.error(f"--decoder-shapes: expected e.g. 64x64,16x256, got {a.decoder_shapes!r}")
    for name in ("threads", "reps", "steps", "vqgan_batch"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(a.threads)
    print(f"CPU bf16 flags: {cpu_bf16_flags() or 'none'}; {a.threads} thread(s), torch "
          f"{torch.__version__}")
    print("| step | bf16 s | fp32 s | bf16 / fp32 |\n| --- | --- | --- | --- |")
    rows = itertools.chain(decoder_rows(shapes, a.reps, a.steps),
                           vqgan_rows(a.vqgan_batch, a.reps, a.steps))
    for name, t in rows:  # printed as each finishes
        print(f"| {name} | {t[True]:.4g} | {t[False]:.4g} | {t[True] / t[False]:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
