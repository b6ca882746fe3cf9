#!/usr/bin/env python3
"""Step 9: does the decoder copy from its retrieved documents? (issue 12's diagnostic)

    python tools/train/copy_diagnostic.py --model cm3rt/assets/default --data data/shapes \\
        --out data/runs/copy --prompts 200

For each of ``cm3rt eval``'s held-out prompts (a colour x shape pair the decoder never saw
under its name), the same prompt, sampler and seed run four ways:

    none    no retrieval;
    bank    retrieval from the whole shipped bank (what ``cm3rt eval``'s retrieval rows do);
    right   retrieval from a bank holding only the bank split's documents that show the
            prompt's held-out pair (so every document placed shows it);
    wrong   retrieval from a bank holding only the documents of another held-out pair (the
            next one in a fixed order, ``WRONG_OF``), none of which also shows the prompt's
            pair (a two-object document may show both; a CLIP that knows the looks retrieves
            exactly those, which session 11 found as a "wrong" column of 28.5%).

If the decoder copies, ``right`` is far above ``none`` and ``wrong`` is at or below
``none`` (it draws the wrong pair); a decoder that ignores its context scores the same in
every column. The per-pair banks are built here from the bank split (same CLIP document
embeddings as ``build_banks.py``) under ``--out``. Writes ``<out>/copy_diagnostic.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from train_common import REPO, Timer, split_records  # noqa: F401  (REPO: sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from build_banks import embed_documents

from cm3rt.demo.shapes.vocab import HELD_OUT_PAIRS
from cm3rt.retrieval.select import DEFAULT_MAX_SCORE

_ORDER = sorted(HELD_OUT_PAIRS)
# The "wrong" pair of each held-out pair: the next one in a fixed order.
WRONG_OF = {p: _ORDER[(i + 1) % len(_ORDER)] for i, p in enumerate(_ORDER)}


def _shows(record: dict, pair: tuple[str, str]) -> bool:
    return any((o["colour"], o["shape"]) == pair for o in record["scene"]["objects"])


def pair_banks(data: Path, model_dir: Path, clip: Path, out: Path, batch: int = 256
               ) -> dict[str, dict[tuple[str, str], Path]]:
    """Two MemoryBanks per held-out pair P, of the bank split's documents:
    ``["right"][P]`` those showing P, ``["wrong"][P]`` those showing ``WRONG_OF[P]`` and not
    P."""
    from cm3rt.retrieval.bank import DocInput, MemoryBank
    from cm3rt.retrieval.clip import ClipEncoder
    from cm3rt.tokenizer.vqgan import ImageTokenizer

    clip_dir = clip
    encoder = ClipEncoder(f"local-dir:{clip_dir}", batch_size=batch)
    tok = ImageTokenizer.from_pretrained(model_dir)
    recs = split_records(data, "bank")
    emb = embed_documents(encoder, data, recs, batch, "embed bank", True)
    from PIL import Image

    paths: dict[str, dict[tuple[str, str], Path]] = {"right": {}, "wrong": {}}
    for column, pair in [(c, p) for c in paths for p in _ORDER]:
        if column == "right":
            rows = [j for j, r in enumerate(recs) if _shows(r, pair)]
        else:
            rows = [j for j, r in enumerate(recs)
                    if _shows(r, WRONG_OF[pair]) and not _shows(r, pair)]
        images = []
        for j in rows:
            with Image.open(data / recs[j]["image"]) as im:
                images.append(im.convert("RGB"))
        codes = tok.encode(images, batch_size=64)
        path = out / f"{column}_{pair[0]}_{pair[1]}"
        if path.exists():
            shutil.rmtree(path)
        bank = MemoryBank.create(path, encoder, tok, index="flat")
        try:
            bank.add_documents([DocInput(source=recs[j]["image"], caption=recs[j]["text"],
                                         codes=codes[k]) for k, j in enumerate(rows)],
                               emb[rows])
            bank.flush()
        finally:
            bank.close()
        paths[column][pair] = path
    return paths


def run(model_dir: Path, data: Path, bank_dir: Path, clip: Path, out: Path, n: int,
        seed: int, guidance: str, cfg_scale: float, k_docs: int, uncond_docs: bool = False,
        max_doc_score: float | None = DEFAULT_MAX_SCORE) -> dict:
    from cm3rt.api import load_engine
    from cm3rt.demo.evaluation import adheres, held_out_prompts
    from cm3rt.demo.evaluation.metrics import wilson_interval
    from cm3rt.demo.shapes.captions import parse_caption
    from cm3rt.engine import Request, SamplingParams
    from cm3rt.retrieval.bank import open_cached

    out.mkdir(parents=True, exist_ok=True)
    banks = pair_banks(data, model_dir, clip, out)
    engine = load_engine(str(model_dir))
    prompts = held_out_prompts(n, seed)
    full = open_cached(bank_dir)
    result: dict = {"n": n, "seed": seed, "guidance": guidance, "cfg_scale": cfg_scale,
                    "k_docs": k_docs, "uncond_docs": uncond_docs, "max_doc_score": max_doc_score}
    for column in ("none", "bank", "right", "wrong"):
        reqs = []
        for k, p in enumerate(prompts):
            held = next((o.colour, o.shape) for o in parse_caption(p.text).objects
                        if (o.colour, o.shape) in HELD_OUT_PAIRS)
            bank = full if column == "bank" else (
                None if column == "none" else open_cached(banks[column][held]))
            reqs.append(Request(prompt=p.text, task="text_to_image",
                                params=SamplingParams(guidance=guidance, cfg_scale=cfg_scale,
                                                      uncond_docs=uncond_docs, seed=k),
                                bank=bank, k_docs=k_docs if bank is not None else 0,
                                max_doc_score=max_doc_score))
        outs = engine.generate(reqs)
        ok = sum(bool(r.images) and adheres(p.text, r.images[0]) for p, r in zip(prompts, outs))
        lo, hi = wilson_interval(ok, n)
        result[column] = {"passed": ok, "rate": ok / n, "ci95": [lo, hi]}
        print(f"{column:6s} {ok}/{n} = {100 * ok / n:.1f}% (95% {100 * lo:.0f}-{100 * hi:.0f})",
              flush=True)
    (out / "copy_diagnostic.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("cm3rt/assets/default"))
    p.add_argument("--bank", type=Path, default=None, help="default <model>/bank")
    p.add_argument("--clip", type=Path, default=None, help="default <model>/clip")
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--out", type=Path, default=Path("data/runs/copy"))
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", default="cdk", choices=("none", "cfg", "cdk"),
                   help="sampler (default cdk, what the default model ships with)")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="for --guidance cfg")
    p.add_argument("-k", "--k-docs", type=int, default=None,
                   help="documents per prompt (default: the model's defaults.json k_docs, "
                        "as cm3rt eval uses; 2 for a model without one)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.k_docs is not None and a.k_docs < 1:
        p.error(f"--k-docs must be >= 1 (the diagnostic compares documents), got {a.k_docs}")
    torch.set_num_threads(max(1, a.threads))
    timer = Timer("copy_diagnostic")
    from cm3rt.api.defaults import DEFAULTS_FILE, load_defaults

    # what cm3rt eval uses for this model: its defaults.json's k_docs, uncond_docs and
    # max_doc_score
    assets = load_defaults(a.model) if (a.model / DEFAULTS_FILE).is_file() else None
    k_docs = a.k_docs
    if k_docs is None:  # a model that retrieves nothing by default: the old default, 2
        k_docs = (assets.k_docs if assets is not None else 0) or 2
    uncond_docs = bool(assets.sampling.get("uncond_docs", False)) if assets else False
    max_doc_score = assets.max_doc_score if assets else DEFAULT_MAX_SCORE
    run(a.model, a.data, a.bank or a.model / "bank", a.clip or a.model / "clip", a.out,
        a.prompts, a.seed, a.guidance, a.cfg_scale, k_docs, uncond_docs, max_doc_score)
    timer.report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
