"""Helpers for the retrieval tests: a tiny random open_clip model saved to local files,
a stand-in image tokenizer with the ImageTokenizer interface, and synthetic embeddings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                   "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}


def make_tiny_clip(folder: Path, name: str = "cm3rt-test-tiny-clip", seed: int = 0,
                   embed_dim: int = 32) -> tuple[Path, Path]:
    """Write an open_clip config JSON and random safetensors weights; -> (config, weights)."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    cfg["embed_dim"] = embed_dim
    config = folder / f"{name}.json"
    config.write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    weights = folder / f"{name}-seed{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


class GridTokenizer:
    """Stand-in for cm3rt.tokenizer.ImageTokenizer (same interface, trivial codes).

    An image becomes `side`x`side` tokens; each token is the cell's mean colour quantised to
    4 levels per channel (64 codes). Deterministic, so stored codes can be checked exactly.
    """

    def __init__(self, side: int = 4, tag: str = "v1") -> None:
        self.side = side
        self.num_tokens = side * side
        self.codebook_size = 64
        self.image_size = side
        self.tag = tag
        self.calls = 0

    def identity(self) -> str:
        return hashlib.sha256(f"grid{self.side}-{self.tag}".encode()).hexdigest()

    def encode(self, images: list[Image.Image]) -> torch.Tensor:
        self.calls += 1
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((self.side, self.side), Image.BOX),
                           dtype=np.int64) // 64
            out.append(torch.from_numpy((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).reshape(-1)))
        return torch.stack(out) if out else torch.empty(0, self.num_tokens, dtype=torch.long)


def random_image(rng: np.random.Generator, size: tuple[int, int] = (24, 20)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered_embeddings(rng: np.random.Generator, n: int, dim: int, clusters: int = 2000,
                         noise: float = 0.64) -> np.ndarray:
    """CLIP-like unit vectors: random topic directions plus noise of norm ~``noise``."""
    centres = unit(rng.standard_normal((clusters, dim)))
    sigma = noise / np.sqrt(dim)
    return unit(centres[rng.integers(0, clusters, n)] + sigma * rng.standard_normal((n, dim)))
