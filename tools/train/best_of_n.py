#!/usr/bin/env python3
"""Best-of-n reranked by the shipped CLIP vs n = 1 (the paper draws 8 and keeps 1).

    python tools/train/best_of_n.py --prompts 200 --n 8

For each of ``cm3rt eval``'s train-concept prompts, ``n`` images with the default model's
defaults (``cm3rt.generate``: CD-K, retrieval from the shipped bank), seeds 0..n-1; the
best-of-k score keeps, of the first k, the image whose shipped-CLIP image embedding is
closest to the prompt's text embedding, and checks it with the same ``adheres`` rule.
"""

from __future__ import annotations

import argparse
import json

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", action="store_true", help="held-out prompts instead")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    from cm3rt.api import generate
    from cm3rt.api.defaults import default_model_dir
    from cm3rt.demo.evaluation import adheres, held_out_prompts, train_prompts
    from cm3rt.demo.evaluation.metrics import wilson_interval
    from cm3rt.retrieval.clip import ClipEncoder

    clip = ClipEncoder(f"local-dir:{default_model_dir() / 'clip'}")
    prompts = (held_out_prompts if a.held_out else train_prompts)(a.prompts, a.seed)
    ks = sorted({1, 4, a.n} & set(range(1, a.n + 1)))
    hits = {k: 0 for k in ks}
    for pr in prompts:
        images = [generate(pr.text, seed=s).image.convert("RGB") for s in range(a.n)]
        sims = (clip.encode_image(images) @ clip.encode_text([pr.text]).t()).squeeze(1)
        ok = [bool(adheres(pr.text, im)) for im in images]
        for k in ks:
            best = int(torch.argmax(sims[:k]))
            hits[k] += ok[best]
    out = {}
    for k in ks:
        lo, hi = wilson_interval(hits[k], len(prompts))
        out[f"best_of_{k}"] = {"passed": hits[k], "n": len(prompts), "ci95": [lo, hi]}
        print(f"best of {k}: {hits[k]}/{len(prompts)} = {100 * hits[k] / len(prompts):.1f}% "
              f"(95% {100 * lo:.0f}-{100 * hi:.0f})", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
