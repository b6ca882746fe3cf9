#!/usr/bin/env python3
"""Step 2b (optional): fine-tune the VQGAN's pixel decoder with the codes frozen.

    python tools/train/finetune_vqgan_decoder.py --data data/shapes \\
        --vqgan data/runs/vqgan/vqgan --out data/runs/vqgan_dec
    python tools/train/finetune_vqgan_decoder.py --out data/runs/vqgan_dec --eval   # gate

Encoder, ``quant_conv`` and codebook stay exactly as they are, so every image keeps its
codes: the image codes of step 3, the memory bank and the decoder LM of step 6 stay valid
(``ImageTokenizer.identity()`` hashes only the encoder side, and this script checks it is
unchanged). Only ``post_quant_conv`` and the decoder train, on the same foreground-weighted
L1 + MSE loss as ``train_vqgan.py``. That makes better pictures out of the same tokens
without retraining anything downstream, which is what makes it cheap.

Resumable like the other scripts; each checkpoint exports ``<out>/vqgan/``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from train_common import (
    Timer,
    cosine_lr,
    load_checkpoint,
    progress,
    save_checkpoint,
    setup_torch,
    step_rng,
)
from train_vqgan import EXPORT, ImageSource, evaluate, foreground_weights

from cm3rt.tokenizer.vqgan import ImageTokenizer


@dataclass(frozen=True)
class FinetuneOptions:
    """A fine-tuning run: ``vqgan`` is the export whose codes are kept."""

    data: Path
    vqgan: Path
    out: Path
    seed: int = 0
    threads: int = 2
    images: int = 9_600
    batch: int = 16
    lr: float = 5e-4
    fg_weight: float = 9.0
    ckpt_every: int = 100
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("images", "batch", "ckpt_every", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")

    @property
    def total_steps(self) -> int:
        return max(1, self.images // self.batch)


def _load(src: Path) -> ImageTokenizer:
    tok = ImageTokenizer.from_pretrained(src)
    if tok.decoder is None:
        raise ValueError(f"--vqgan {src}: the VQGAN has no decoder to fine-tune")
    return tok


def finetune(opts: FinetuneOptions, quiet: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) the fine-tuning; returns the last statistics."""
    setup_torch(opts.seed, opts.threads)
    timer = Timer("finetune_vqgan_decoder")
    tok = _load(opts.vqgan)
    identity = tok.identity()
    trainable = nn.ModuleDict({"post_quant_conv": tok.post_quant_conv, "decoder": tok.decoder})
    trainable.requires_grad_(True).train()
    opt = torch.optim.AdamW(trainable.parameters(), lr=opts.lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "options.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}, indent=1))
    resumed = load_checkpoint(opts.out, trainable, opt)
    start = 0 if resumed is None else resumed[0]
    if resumed is not None:
        print(f"resumed from {opts.out} at step {start}/{opts.total_steps}", flush=True)
    source = ImageSource(opts.data, opts.limit)
    cb = tok.codebook
    log = (opts.out / "log.jsonl").open("a", encoding="utf-8")
    end = opts.total_steps if max_steps is None else min(opts.total_steps, start + max_steps)
    stats: dict = {}
    for step in progress(start, end, "vqgan decoder", quiet):
        x = source.batch(step_rng(opts.seed, 9, step), opts.batch, None)
        # The frozen encoder side: codes from ImageTokenizer itself (encoder + vq_nearest),
        # exactly the codes of step 3; cloned out of inference mode to feed autograd.
        codes = tok.encode_pixels(x, batch_size=x.shape[0]).clone()
        side = tok.latent_size
        zq = cb[codes].view(-1, side, side, cb.shape[1]).permute(0, 3, 1, 2).contiguous()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, opts.total_steps, opts.lr, warmup=20)
        rec = tok.decoder(tok.post_quant_conv(zq))
        wts = foreground_weights(x, opts.fg_weight)
        err = rec - x
        l1, l2 = (wts * err.abs()).mean(), (wts * err.pow(2)).mean()
        loss = l1 + l2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == end:
            stats = {"step": step + 1, "loss": loss.item(), "l1": l1.item(), "mse": l2.item(),
                     "elapsed_s": round(timer.seconds(), 1)}
            log.write(json.dumps(stats) + "\n")
            log.flush()
        if (step + 1) % opts.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(opts.out, step + 1, trainable, opt)
            export(tok, opts.out, identity)
    log.close()
    if start >= end:
        export(tok, opts.out, identity)
    timer.report()
    return stats


def export(tok: ImageTokenizer, out: Path, identity: str) -> Path:
    """Save ``<out>/vqgan`` and check the codes side is unchanged."""
    saved = ImageTokenizer(tok.config, tok.encoder, tok.quant_conv, tok.codebook,
                           tok.post_quant_conv, tok.decoder).save_pretrained(out / EXPORT)
    if ImageTokenizer.from_pretrained(saved).identity() != identity:
        raise RuntimeError("the fine-tuned VQGAN's encoder side changed: its codes would differ")
    return saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--vqgan", type=Path, default=Path("data/runs/vqgan/vqgan"))
    p.add_argument("--out", type=Path, default=Path("data/runs/vqgan_dec"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=FinetuneOptions.threads)
    p.add_argument("--images", type=int, default=FinetuneOptions.images)
    p.add_argument("--lr", type=float, default=FinetuneOptions.lr)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 40 records, 4 steps")
    p.add_argument("--eval", action="store_true", help="run the gate on <out>/vqgan")
    p.add_argument("--eval-n", type=int, default=500)
    a = p.parse_args(argv)
    if a.eval:
        torch.set_num_threads(max(1, a.threads))
        r = evaluate(a.out / EXPORT, n=(40 if a.quick else a.eval_n))
        print(json.dumps(r))
        return 0
    opts = FinetuneOptions(data=a.data, vqgan=a.vqgan, out=a.out, seed=a.seed,
                           threads=a.threads, images=a.images, lr=a.lr)
    if a.quick:
        opts = FinetuneOptions(**{**asdict(opts), "images": 32, "batch": 8, "ckpt_every": 2,
                                  "limit": 40})
    finetune(opts, quiet=a.quick, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
