#!/usr/bin/env python3
"""Write the shapes-world data the default model is trained and evaluated on.

    python tools/train/make_dataset.py --out data/shapes --seed 0 \\
        --train 60000 --bank 4000 --eval 400

Splits (each its own seed stream, so they never share a scene by construction):
    train  decoder / VQGAN / CLIP training data; no object is a held-out colour x shape
           pair (``WorldConfig(concepts="train")``).
    bank   the retrieval memory bank shipped with the model: any pair, and every fourth
           scene's first object is a held-out pair, so each held-out concept is in the bank.
    eval   prompts about held-out pairs (attribute combinations the decoder never saw).
    novel  looks for the decoder's novel-concept episodes (any pair): train_decoder.py only
           uses them with the colour x shape of one object replaced by a per-sequence nonce
           word (``vocab.NONCE_WORDS``), so a held-out pair's name never reaches the decoder.

For each split: ``<split>.jsonl`` (one line per scene: image path relative to --out, a
caption ``text``, further ``captions`` from other templates, the ``canonical`` caption,
the ``scene`` itself, its index) and PNGs under ``<split>/<index // 1000>/``. A
``manifest.json`` records the arguments, counts, held-out pairs and wall time.
Same arguments -> byte-identical JSONL and PNGs (the manifest adds the wall time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cm3rt.demo.shapes import HELD_OUT_PAIRS, WorldConfig, sample_scene, uses_held_out
from cm3rt.demo.shapes.vocab import IMAGE_SIZE

SPLIT_CODES = {"train": 1, "bank": 2, "eval": 3, "novel": 4}
"""Second word of each split's seed: numpy.random.default_rng([seed, code, index])."""

BANK_HELD_OUT_EVERY = 4
"""Every this many bank scenes (index % 4 == 0) is drawn with a held-out first object."""


@dataclass(frozen=True)
class DatasetOptions:
    """What to write.

    Attributes:
        out: output folder (created; existing files of the same names are overwritten).
        seed: master seed.
        train, bank, eval: number of scenes per split.
        image_size: side of the PNGs in pixels.
        captions: captions per scene (the first is ``text``).
    """

    out: Path
    seed: int = 0
    train: int = 60000
    bank: int = 4000
    eval: int = 400
    image_size: int = IMAGE_SIZE
    captions: int = 4
    novel: int = 12000

    def __post_init__(self) -> None:
        for name in ("seed", "train", "bank", "eval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if not isinstance(self.image_size, int) or self.image_size < 24:
            raise ValueError(f"image_size must be an int >= 24, got {self.image_size!r}")
        if not isinstance(self.captions, int) or self.captions < 1:
            raise ValueError(f"captions must be an int >= 1, got {self.captions!r}")


def split_config(split: str, index: int) -> WorldConfig:
    """The scene distribution of scene ``index`` of ``split``."""
    if split == "train":
        return WorldConfig(concepts="train")
    if split == "bank":
        held = index % BANK_HELD_OUT_EVERY == 0
        return WorldConfig(concepts="held_out" if held else "all")
    if split == "eval":
        return WorldConfig(concepts="held_out")
    if split == "novel":
        return WorldConfig(concepts="all")
    raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, got {split!r}")


def make_record(split: str, index: int, opts: DatasetOptions) -> tuple[dict, object]:
    """(JSONL record, PIL image) of scene ``index`` of ``split``; pure function of its args."""
    rng = np.random.default_rng([opts.seed, SPLIT_CODES[split], index])
    scene = sample_scene(rng, split_config(split, index))
    if split == "train" and uses_held_out(scene):  # guards the split, whatever changes
        raise AssertionError(f"train scene {index} uses a held-out pair: {scene}")
    captions = [scene.caption(rng) for _ in range(opts.captions)]
    rel = f"{split}/{index // 1000:05d}/{index:07d}.png"
    record = {
        "image": rel,
        "text": captions[0],
        "captions": captions,
        "canonical": scene.describe(),
        "scene": scene.to_dict(),
        "split": split,
        "index": index,
    }
    return record, scene.render(opts.image_size)


def write_split(split: str, count: int, opts: DatasetOptions) -> Counter:
    """Write ``count`` scenes of ``split``; returns statistics of what was written."""
    stats: Counter = Counter()
    jsonl = opts.out / f"{split}.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for i in range(count):
            record, image = make_record(split, i, opts)
            path = opts.out / record["image"]
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG")
            f.write(json.dumps(record, sort_keys=True) + "\n")
            objs = record["scene"]["objects"]
            stats["scenes"] += 1
            stats[f"objects_{len(objs)}"] += 1
            for o in objs:
                if (o["colour"], o["shape"]) in HELD_OUT_PAIRS:
                    stats["held_out_objects"] += 1
                    stats[f"held_out:{o['colour']} {o['shape']}"] += 1
    return stats


def make_dataset(opts: DatasetOptions) -> dict:
    """Write every split and the manifest; returns the manifest."""
    opts.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    splits = {}
    for split in SPLIT_CODES:
        count = getattr(opts, split)
        stats = write_split(split, count, opts)
        splits[split] = dict(sorted(stats.items()))
    manifest = {
        "options": {**asdict(opts), "out": str(opts.out)},
        "splits": splits,
        "held_out_pairs": sorted(list(p) for p in HELD_OUT_PAIRS),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (opts.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=DatasetOptions.train)
    p.add_argument("--bank", type=int, default=DatasetOptions.bank)
    p.add_argument("--eval", type=int, default=DatasetOptions.eval)
    p.add_argument("--novel", type=int, default=DatasetOptions.novel)
    p.add_argument("--image-size", type=int, default=DatasetOptions.image_size)
    p.add_argument("--captions", type=int, default=DatasetOptions.captions)
    a = p.parse_args(argv)
    try:
        opts = DatasetOptions(a.out, a.seed, a.train, a.bank, a.eval, a.image_size, a.captions,
                              novel=a.novel)
    except ValueError as exc:
        p.error(str(exc))
    manifest = make_dataset(opts)
    for split, stats in manifest["splits"].items():
        print(f"{split:5s} {stats.get('scenes', 0):7d} scenes, "
              f"{stats.get('held_out_objects', 0):6d} held-out objects")
    print(f"wrote {opts.out} in {manifest['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
