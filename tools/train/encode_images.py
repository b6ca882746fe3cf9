#!/usr/bin/env python3
"""Step 3: VQ codes of the train and bank images, with the trained VQGAN.

    python tools/train/encode_images.py --data data/shapes --vqgan data/runs/vqgan/vqgan \\
        --out data/runs/codes

Runs cm3rt's own ``ImageTokenizer`` (encoder + ``ops.vq_nearest``) and writes
``<out>/<split>_codes.npy`` (uint16 [N, num_tokens], row i = record i of
``<split>.jsonl``, raster order of the latent grid) and ``<out>/codes.json`` (the
tokenizer's ``identity()`` and counts: a later step refuses codes of another VQGAN).
Resumable: chunks of ``--chunk`` images go to ``<out>/<split>_chunks/`` and finished chunks
are skipped when the command is rerun (checked against the identity).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from train_common import Timer, load_rgb, progress, split_records

from cm3rt.tokenizer.vqgan import ImageTokenizer


def encode_split(tok: ImageTokenizer, data: Path, split: str, out: Path, chunk: int,
                 limit: int | None, quiet: bool) -> np.ndarray:
    """Codes of one split (uint16 [N, num_tokens]), chunk by chunk, resumable."""
    if tok.codebook_size > 65536:
        raise ValueError(f"codebook of {tok.codebook_size} codes does not fit uint16")
    recs = split_records(data, split, limit)
    chunks = out / f"{split}_chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(recs) + chunk - 1) // chunk
    parts = []
    for c in progress(0, n_chunks, f"encode {split}", quiet):
        f = chunks / f"{c:05d}.npy"
        lo, hi = c * chunk, min(len(recs), (c + 1) * chunk)
        if f.is_file():
            part = np.load(f, allow_pickle=False)
            if part.shape == (hi - lo, tok.num_tokens):
                parts.append(part)
                continue
        pixels = torch.stack([torch.from_numpy(load_rgb(data, r)) for r in recs[lo:hi]])
        pixels = (pixels.float() / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()
        codes = tok.encode_pixels(pixels, batch_size=64).numpy().astype(np.uint16)
        tmp = chunks / f"{c:05d}.tmp.npy"
        np.save(tmp, codes)
        tmp.replace(f)
        parts.append(codes)
    codes = np.concatenate(parts) if parts else np.zeros((0, tok.num_tokens), np.uint16)
    np.save(out / f"{split}_codes.npy", codes)
    return codes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--vqgan", type=Path, default=Path("data/runs/vqgan/vqgan"))
    p.add_argument("--out", type=Path, default=Path("data/runs/codes"))
    p.add_argument("--splits", nargs="+", default=["train", "bank", "novel"])
    p.add_argument("--chunk", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="first 40 records of each split")
    a = p.parse_args(argv)
    if a.chunk < 1:
        p.error(f"--chunk must be >= 1, got {a.chunk}")
    timer = Timer("encode_images")
    torch.set_num_threads(max(1, a.threads))
    tok = ImageTokenizer.from_pretrained(a.vqgan)
    a.out.mkdir(parents=True, exist_ok=True)
    meta_file = a.out / "codes.json"
    identity = tok.identity()
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("identity") != identity:
        # Chunks of another VQGAN must not be mixed in: start over.
        for f in a.out.glob("*_chunks/*.npy"):
            f.unlink()
    meta = {"identity": identity, "vqgan": str(a.vqgan), "num_tokens": tok.num_tokens,
            "codebook_size": tok.codebook_size, "splits": {}}
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    limit = 40 if a.quick else None
    for split in a.splits:
        codes = encode_split(tok, a.data, split, a.out, 20 if a.quick else a.chunk, limit,
                             a.quick)
        used = int(np.unique(codes).size)
        meta["splits"][split] = {"count": int(codes.shape[0]), "codes_used": used}
        print(f"{split}: {codes.shape[0]} images -> {a.out / f'{split}_codes.npy'} "
              f"({used} distinct codes)", flush=True)
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    timer.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
