#!/usr/bin/env python3
"""Step 4: the tiny CLIP (open_clip's ``CLIP`` class, custom config) used for retrieval.

    python tools/train/train_clip.py --data data/shapes --tokenizer data/runs/tokenizer \\
        --out data/runs/clip                                    # train (resumable)
    python tools/train/train_clip.py --data data/shapes --out data/runs/clip --eval   # gate

Model: vision tower ``--vision resnet`` (default: open_clip's ModifiedResNet, layers
1-1-1-1, width 16, attention pooling; 1.3 M parameters) or ``vit`` (the plan's ViT: 64 px,
patch 8, width 96, 3 layers; at 45% of its schedule it had learnt colours, 95% right, but
not shapes, 27%, so the convolutional tower is the default), text transformer
(context 32: captions reach 27 BPE tokens + ``</s>``; the project's BPE vocabulary from
step 1; width 96, 3 layers, pooled at ``</s>``), embed dim 96. Contrastive (InfoNCE both
ways, learnt temperature), batch 256, captions drawn from each scene's templates, images
as rendered (no augmentation: it would falsify "left" or "top").

Output: ``<out>/clip/`` in open_clip's ``local-dir`` layout (``open_clip_config.json`` with
``model_cfg`` + ``preprocess_cfg``, ``open_clip_model.safetensors``, and the tokenizer files
open_clip's ``HFTokenizer`` reads from the same folder), loadable with
``cm3rt.retrieval.ClipEncoder("local-dir:<out>/clip")`` (also what ``arch="embedded"``
points at once shipped). Written at every checkpoint; resumable from
``<out>/checkpoint.*``.

Gate (``--eval``): caption -> image top-1 retrieval over the bank split finds an image with
the same objects (colour and shape) >= 90% of the time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from train_common import (
    Timer,
    cosine_lr,
    load_checkpoint,
    load_rgb,
    progress,
    save_checkpoint,
    setup_torch,
    split_records,
    step_rng,
    to_pixels,
)

from cm3rt.demo.shapes.vocab import IMAGE_SIZE

EXPORT = "clip"
GATE = 0.90
VISION_TOWERS = ("resnet", "vit")
CLIP_SPLITS = ("train", "bank", "novel")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Pixels scaled to [-1, 1], as for the VQGAN; the world's renders (IMAGE_SIZE px) pass
# resize / crop unchanged.
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
              "resize_mode": "shortest"}


@dataclass(frozen=True)
class ClipOptions:
    """A training run.

    Attributes:
        data: folder written by make_dataset.py.  tokenizer: folder of step 1.
        out: run folder.  seed, threads: as usual.
        pairs: (image, caption) pairs seen in all.  batch: pairs per step.
        lr, weight_decay: AdamW.  ckpt_every: steps between checkpoints.
        vision: "resnet" or "vit" (the image tower).
        width, layers, embed_dim, context: model sizes (``width``/``layers`` of the text
            tower and the ViT).
        limit: use only the first ``limit`` records of each split (None: all).
        splits: the make_dataset.py splits to train on. ``("train", "bank")`` by default:
            the retriever learns the memory bank it will search, held-out pairs included
            (only the decoder must never see them); ``("train",)`` was the recipe up to
            session 10, whose CLIP had never seen a held-out look and, queried with the
            image of one, retrieved a document showing it for half of them.
    """

    data: Path
    tokenizer: Path
    out: Path
    seed: int = 0
    threads: int = 1
    pairs: int = 400_000
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    ckpt_every: int = 100
    width: int = 96
    layers: int = 3
    embed_dim: int = 96
    context: int = 32
    vision: str = "resnet"
    limit: int | None = None
    splits: tuple[str, ...] = ("train", "bank")

    def __post_init__(self) -> None:
        for name in ("pairs", "batch", "ckpt_every", "width", "layers", "embed_dim", "context",
                     "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.vision not in VISION_TOWERS:
            raise ValueError(f"vision must be one of {VISION_TOWERS}, got {self.vision!r}")
        if not self.splits or any(s not in CLIP_SPLITS for s in self.splits):
            raise ValueError(f"splits must be a non-empty subset of {CLIP_SPLITS}, "
                             f"got {self.splits!r}")
        if self.width % 32:
            raise ValueError(f"width must be a multiple of 32 (heads of 32), got {self.width}")

    @property
    def total_steps(self) -> int:
        return max(1, self.pairs // self.batch)


def model_config(opts: ClipOptions, vocab_size: int, eos_id: int, pad_id: int) -> dict:
    """The open_clip ``model_cfg`` of the tiny CLIP."""
    heads = opts.width // 32
    if opts.vision == "vit":
        vision = {"image_size": IMAGE_SIZE, "patch_size": 8, "width": opts.width,
                  "layers": opts.layers, "head_width": 32, "mlp_ratio": 4.0}
    else:  # open_clip builds a ModifiedResNet when 'layers' is a list
        vision = {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16}
    return {
        "embed_dim": opts.embed_dim,
        "vision_cfg": vision,
        "text_cfg": {"context_length": opts.context, "vocab_size": vocab_size,
                     "width": opts.width, "heads": heads, "layers": opts.layers,
                     "hf_tokenizer_name": "cm3rt-shapes-bpe",  # any non-empty name: the
                     # local-dir loader then reads the tokenizer files of the folder
                     "tokenizer_kwargs": {"clean": "whitespace"},
                     "pool_type": "eos", "eos_id": eos_id, "pad_id": pad_id},
    }


def prepare_export(opts: ClipOptions) -> tuple[dict, Path]:
    """Write config + tokenizer files into ``<out>/clip``; -> (model_cfg, folder)."""
    from tokenizers import Tokenizer

    files = [opts.tokenizer / f for f in TOKENIZER_FILES]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"--tokenizer: expected {f} (run train_tokenizer.py)")
    tok = Tokenizer.from_file(str(files[0]))
    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    if eos is None or pad is None:
        raise ValueError(f"--tokenizer: {files[0]} lacks '</s>' or '<pad>'")
    cfg = model_config(opts, tok.get_vocab_size(with_added_tokens=True), eos, pad)
    folder = opts.out / EXPORT
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS}, indent=2) + "\n")
    return cfg, folder


def export_weights(model: torch.nn.Module, folder: Path) -> Path:
    """Write the state dict as ``open_clip_model.safetensors`` (atomically)."""
    from safetensors.torch import save_file

    out = folder / "open_clip_model.safetensors"
    tmp = folder / "open_clip_model.tmp"  # not *.safetensors: open_clip globs for weights
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(tmp))
    tmp.replace(out)
    return out


class PairSource:
    """Training images (uint8, in memory) and their captions, from ``splits``."""

    def __init__(self, data: Path, limit: int | None,
                 splits: tuple[str, ...] = ("train",)) -> None:
        recs = []
        for split in splits:
            got = split_records(data, split, limit)
            if not got:
                raise ValueError(f"no records in {data}/{split}.jsonl")
            recs += got
        self.images = np.stack([load_rgb(data, r) for r in recs])
        self.captions = [r.get("captions") or [r["text"]] for r in recs]

    def batch(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
        # Distinct scenes in a batch (an identical twin would be a false negative).
        idx = rng.choice(len(self.images), size=min(n, len(self.images)), replace=False)
        texts = [self.captions[i][int(rng.integers(len(self.captions[i])))] for i in idx]
        return to_pixels(self.images[idx]), texts


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor
              ) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE of normalised embeddings; -> (loss, in-batch image->text top-1)."""
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()
    labels = torch.arange(img.shape[0])
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    return loss, float((logits.argmax(1) == labels).float().mean())


def train(opts: ClipOptions, quiet: bool = False, max_steps: int | None = None) -> dict:
    """Run (or resume) training to ``opts.total_steps`` (at most ``max_steps`` more steps in
    this call); returns the last statistics."""
    import open_clip

    setup_torch(opts.seed, opts.threads)
    timer = Timer("train_clip")
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "options.json").write_text(json.dumps(
        {**asdict(opts), "data": str(opts.data), "tokenizer": str(opts.tokenizer),
         "out": str(opts.out), "splits": list(opts.splits)}, indent=1))
    cfg, folder = prepare_export(opts)
    model = open_clip.model.CLIP(**cfg)
    n_params = sum(p.numel() for p in model.parameters())
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")  # exactly what inference runs
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2
                                                               and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=opts.lr, betas=(0.9, 0.98), eps=1e-6)
    resumed = load_checkpoint(opts.out, model, opt)
    start = 0 if resumed is None else resumed[0]
    if resumed is not None:
        print(f"resumed from {opts.out} at step {start}/{opts.total_steps}", flush=True)
    print(f"tiny CLIP: {n_params / 1e6:.2f} M parameters, {opts.total_steps} steps of "
          f"{opts.batch}", flush=True)
    source = PairSource(opts.data, opts.limit, opts.splits)
    log = (opts.out / "log.jsonl").open("a", encoding="utf-8")
    stats: dict = {}
    t_last, s_last = timer.seconds(), start
    model.train()
    end = opts.total_steps if max_steps is None else min(opts.total_steps, start + max_steps)
    for step in progress(start, end, "clip", quiet):
        images, texts = source.batch(step_rng(opts.seed, 4, step), opts.batch)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, opts.total_steps, opts.lr, warmup=50, floor=0.02)
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokenizer(texts), normalize=True)
        loss, acc = clip_loss(img, txt, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 10 == 0:
            stats = {"step": step + 1, "loss": loss.item(), "batch_top1": acc,
                     "logit_scale": model.logit_scale.exp().item(),
                     "elapsed_s": round(timer.seconds(), 1)}
            log.write(json.dumps(stats) + "\n")
            log.flush()
        if (step + 1) % opts.ckpt_every == 0 or step + 1 == end:
            save_checkpoint(opts.out, step + 1, model, opt)
            export_weights(model, folder)
            now = timer.seconds()
            rate = (step + 1 - s_last) / max(1e-9, now - t_last)
            t_last, s_last = now, step + 1
            print(f"step {step + 1}/{opts.total_steps} loss {loss.item():.4f} batch top-1 "
                  f"{acc:.3f} ({rate:.3f} steps/s, "
                  f"~{(opts.total_steps - step - 1) / max(rate, 1e-9) / 3600:.2f} h left)",
                  flush=True)
    log.close()
    if start >= opts.total_steps or not (folder / "open_clip_model.safetensors").is_file():
        export_weights(model, folder)
    timer.report()
    return stats


# ---------------------------------------------------------------------- gate
def object_key(record: dict) -> tuple:
    """The objects of a record's scene as a sorted (colour, shape) multiset."""
    return tuple(sorted(Counter((o["colour"], o["shape"])
                                for o in record["scene"]["objects"]).items()))


def evaluate(clip_dir: Path, data: Path, limit: int | None = None) -> dict:
    """Caption -> image top-1 over the bank split, through cm3rt's ClipEncoder."""
    from cm3rt.retrieval.clip import ClipEncoder

    enc = ClipEncoder(f"local-dir:{clip_dir}", batch_size=256)
    recs = split_records(data, "bank", limit)
    if not recs:
        raise ValueError(f"no bank records in {data}/bank.jsonl")
    from PIL import Image

    images = []
    for r in recs:
        with Image.open(data / r["image"]) as im:
            images.append(im.convert("RGB"))
    img = enc.encode_image(images)
    txt = enc.encode_text([r["text"] for r in recs])
    top1 = (txt @ img.t()).argmax(1).tolist()
    keys = [object_key(r) for r in recs]
    same_objects = sum(keys[i] == keys[j] for i, j in enumerate(top1)) / len(recs)
    same_image = sum(i == j for i, j in enumerate(top1)) / len(recs)
    return {"n": len(recs), "top1_same_objects": same_objects, "top1_same_image": same_image,
            "gate": GATE, "passed": same_objects >= GATE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/shapes"))
    p.add_argument("--tokenizer", type=Path, default=Path("data/runs/tokenizer"))
    p.add_argument("--out", type=Path, default=Path("data/runs/clip"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=ClipOptions.pairs)
    p.add_argument("--batch", type=int, default=ClipOptions.batch)
    p.add_argument("--lr", type=float, default=ClipOptions.lr)
    p.add_argument("--ckpt-every", type=int, default=ClipOptions.ckpt_every)
    p.add_argument("--vision", choices=VISION_TOWERS, default=ClipOptions.vision)
    p.add_argument("--splits", nargs="+", default=list(ClipOptions.splits),
                   help="splits to train on (default: train bank; the memory bank is what "
                        "the retriever searches)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this call")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 64 records, 3 steps of 16 pairs (eval: 40 bank records)")
    p.add_argument("--eval", action="store_true", help="run the gate on <out>/clip")
    a = p.parse_args(argv)
    if a.eval:
        timer = Timer("train_clip --eval")
        torch.set_num_threads(max(1, a.threads))
        folder = a.out / EXPORT
        if not (folder / "open_clip_model.safetensors").is_file():
            p.error(f"--out: no exported CLIP at {folder} (train first)")
        r = evaluate(folder, a.data, 40 if a.quick else None)
        print(json.dumps(r))
        print(f"caption -> image top-1 same objects {r['top1_same_objects']:.3f} "
              f"(same image {r['top1_same_image']:.3f}) over {r['n']} bank scenes: "
              f"{'PASS' if r['passed'] else 'FAIL'} (gate {GATE})")
        timer.report()
        return 0
    try:
        if a.quick:
            opts = ClipOptions(a.data, a.tokenizer, a.out, a.seed, a.threads, pairs=48,
                               batch=16, ckpt_every=2, lr=a.lr, vision=a.vision, limit=64,
                               splits=tuple(a.splits))
        else:
            opts = ClipOptions(a.data, a.tokenizer, a.out, a.seed, a.threads, pairs=a.pairs,
                               batch=a.batch, lr=a.lr, ckpt_every=a.ckpt_every,
                               vision=a.vision, splits=tuple(a.splits))
    except ValueError as exc:
        p.error(str(exc))
    train(opts, quiet=a.quick, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
