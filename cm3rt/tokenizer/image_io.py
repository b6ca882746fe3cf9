"""Chameleon's image pre- and post-processing around the VQGAN.

In (as Chameleon's reference image tokenizer does it):
  1. transparency whitened: an image with alpha is composited over white;
  2. the short side resized to the target size with LANCZOS (long side ``round``-ed);
  3. centre crop to a square;
  4. bytes ``/ 255 * 2 - 1`` -> float ``[3, R, R]`` in [-1, 1].
Out: clamp to [-1, 1], ``(x + 1) / 2 * 255`` truncated to uint8, RGB.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch


def check_image(image: object, name: str = "image") -> PIL.Image.Image:
    """Return ``image`` if it is a PIL image, else raise TypeError naming ``name``."""
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"argument '{name}' must be a PIL.Image.Image, got "
                        f"{type(image).__module__}.{type(image).__name__}")
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"argument '{name}' is empty ({image.width} x {image.height} pixels)")
    return image


def whiten_transparency(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB version of ``image``; pixels with alpha < 255 are blended over white."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    alpha = rgba[:, :, 3]
    if (alpha == 255).all():
        return image.convert("RGB")
    a = alpha[:, :, None].astype(np.float64) / 255.0
    rgb = (1.0 - a) * 255.0 + a * rgba[:, :, :3]
    return PIL.Image.fromarray(rgb.astype(np.uint8), "RGB")


# Beyond this aspect ratio the long side is centre-cropped *before* resizing, so that a
# 1 x 100000 strip cannot make a 512 x 51200000 intermediate; the pixels kept are the same up
# to LANCZOS's few-pixel support at the cut.
MAX_ASPECT = 8


def resize_and_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Scale the short side to ``size`` (LANCZOS), then crop the centre ``size x size``."""
    w, h = image.size
    short = min(w, h)
    if max(w, h) > MAX_ASPECT * short:
        keep_w, keep_h = min(w, MAX_ASPECT * short), min(h, MAX_ASPECT * short)
        x0, y0 = (w - keep_w) // 2, (h - keep_h) // 2
        image = image.crop((x0, y0, x0 + keep_w, y0 + keep_h))
    scale = size / min(image.size)
    new_w = max(size, round(scale * image.width))
    new_h = max(size, round(scale * image.height))
    image = image.resize((new_w, new_h), PIL.Image.Resampling.LANCZOS)
    x0, y0 = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((x0, y0, x0 + size, y0 + size))


def image_to_tensor(image: PIL.Image.Image, size: int, name: str = "image") -> torch.Tensor:
    """A PIL image -> float32 ``[3, size, size]`` in [-1, 1] (the VQGAN encoder's input).

    Raises TypeError for a non-image and ValueError naming ``name`` for an image PIL cannot
    decode (e.g. a truncated file opened lazily).
    """
    check_image(image, name)
    try:
        image = resize_and_crop(whiten_transparency(image), size)
        arr = np.asarray(image, dtype=np.float64)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's decode errors
        raise ValueError(f"argument '{name}' could not be decoded as an image: {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"argument '{name}' did not convert to RGB (mode {image.mode}, "
                         f"array shape {arr.shape})")
    arr = arr / 255.0 * 2.0 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).float().contiguous()


def tensor_to_image(pixels: torch.Tensor) -> PIL.Image.Image:
    """Float ``[3, H, W]`` in [-1, 1] -> RGB PIL image."""
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ValueError(f"argument 'pixels' must be [3, H, W], got {tuple(pixels.shape)}")
    x = (pixels.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) / 2.0
    arr = (x.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
    return PIL.Image.fromarray(arr, "RGB")
