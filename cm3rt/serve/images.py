"""Images over HTTP: PNG as base64, uploads and data URIs in, and partial images (the rows
of image codes drawn so far, decoded; the rest plainly filled)."""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cm3rt.serve.protocol import APIError
from cm3rt.tokenizer.processor import Processor

MAX_UPLOAD_PIXELS = 4096 * 4096
FILL = 128  # grey for the rows not drawn yet


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def open_upload(data: bytes, param: str) -> Image.Image:
    """A PIL image (RGB) from uploaded bytes; a 400 naming ``param`` otherwise."""
    if not data:
        raise APIError(400, f"'{param}' is empty: expected a PNG, JPEG or WebP image",
                       param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.size[0] * im.size[1] > MAX_UPLOAD_PIXELS:
                    raise APIError(400, f"'{param}' is {im.size[0]}x{im.size[1]} pixels, more "
                                   f"than {MAX_UPLOAD_PIXELS}", param=param)
                im.load()
                return im.convert("RGB")
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise APIError(400, f"'{param}' is not a readable image (PNG, JPEG or WebP): {exc}",
                       param=param) from None


def open_data_uri(url: str, param: str) -> Image.Image:
    """An image from a ``data:image/...;base64,...`` URI (the server fetches nothing)."""
    head, sep, payload = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise APIError(400, f"'{param}' must be a data:image/...;base64, URI (this server does "
                       "not fetch URLs)", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise APIError(400, f"'{param}' holds broken base64: {exc}", param=param) from None
    return open_upload(data, param)


def partial_image(processor: Processor, token_ids: list[int]) -> Image.Image:
    """The image of the codes drawn so far (``token_ids``: image-token ids in raster order):
    complete rows of codes are decoded, the rows below them are flat grey."""
    n = processor.num_image_tokens
    side = math.isqrt(n)
    rows = min(len(token_ids), n) // side
    codes = torch.zeros(n, dtype=torch.long)
    if token_ids:
        drawn = processor.text.id_to_code(torch.tensor(token_ids[:n], dtype=torch.long))
        codes[:drawn.numel()] = drawn
    image = processor.image.decode(codes[None])[0]
    pixels = np.asarray(image).copy()
    cut = rows * pixels.shape[0] // side
    pixels[cut:] = FILL
    return Image.fromarray(pixels)
