"""Helpers shared by the training scripts: data records, seeding, checkpoints, progress.

Checkpoints are written without pickle: tensors (model, optimizer moments, counters) in a
safetensors file and everything else (step, optimizer hyper-parameters, options) in a JSON
file next to it, both replaced atomically, so a run killed at any moment resumes from the
last complete checkpoint. Batches are drawn from ``numpy.random.default_rng([seed, tag,
step])``, a pure function of the step, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
# Runnable from a checkout without installing the package.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def read_jsonl(path: Path) -> list[dict]:
    """Records of a ``make_dataset.py`` split file (FileNotFoundError naming it if absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such split file: {path} (run tools/train/make_dataset.py)")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_records(data: Path, split: str, limit: int | None = None) -> list[dict]:
    """The first ``limit`` records of ``data/<split>.jsonl`` (all when None)."""
    recs = read_jsonl(Path(data) / f"{split}.jsonl")
    return recs if limit is None else recs[:limit]


def load_rgb(data: Path, record: dict) -> np.ndarray:
    """uint8 [H, W, 3] pixels of a record's PNG."""
    with Image.open(Path(data) / record["image"]) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def to_pixels(batch_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (the VQGAN's input scaling,
    the same as ``cm3rt.tokenizer.image_io.image_to_tensor``)."""
    x = torch.from_numpy(np.ascontiguousarray(batch_u8)).float()
    return (x / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()


def step_rng(seed: int, tag: int, step: int) -> np.random.Generator:
    """The generator of one training step (pure function of its arguments)."""
    return np.random.default_rng([seed, tag, step])


def setup_torch(seed: int, threads: int) -> None:
    """Seed torch and pin its intra-op threads (the machine is shared)."""
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, threads))


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up then cosine decay to ``floor * peak`` at ``total`` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * t)))


# ---------------------------------------------------------------------- checkpoints
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"opt.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if not name.startswith("opt."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module,
                    opt: torch.optim.Optimizer,
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    meta: dict | None = None) -> Path:
    """Write ``checkpoint.safetensors`` + ``checkpoint.json`` into ``directory`` atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    tmp = directory / "checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp))
    info = {"step": step, "optimizer": opt_meta, "meta": meta or {}, "time": time.time()}
    tmp_json = directory / "checkpoint.json.tmp"
    tmp_json.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, directory / "checkpoint.safetensors")
    os.replace(tmp_json, directory / "checkpoint.json")
    return directory / "checkpoint.safetensors"


def load_checkpoint(directory: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
                    ) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """Restore model and optimizer from ``directory``; -> (step, extra tensors, meta), or None
    when there is no checkpoint."""
    from safetensors.torch import load_file

    directory = Path(directory)
    f, j = directory / "checkpoint.safetensors", directory / "checkpoint.json"
    if not (f.is_file() and j.is_file()):
        return None
    info = json.loads(j.read_text(encoding="utf-8"))
    tensors = load_file(str(f))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict(_optimizer_state(tensors, info["optimizer"]))
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return int(info["step"]), extra, info.get("meta", {})


# ---------------------------------------------------------------------- progress
def progress(start: int, total: int, desc: str, quiet: bool = False) -> Iterator[int]:
    """Steps ``start..total-1`` with a tqdm bar (to stderr; plain range when quiet)."""
    if quiet:
        return iter(range(start, total))
    from tqdm import tqdm

    return iter(tqdm(range(start, total), initial=start, total=total, desc=desc,
                     mininterval=10.0, file=sys.stderr, dynamic_ncols=False))


class Timer:
    """Wall time of a script, printed at the end (the README records these)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def report(self, extra: str = "") -> None:
        print(f"{self.name}: wall time {self.seconds():.1f} s{extra}", flush=True)
