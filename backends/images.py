"""Decoded images as bytes: ``[-1, 1]`` floats to uint8, grids of images, PNG encoding. One rule for the PNGs
``sample.py`` writes, the reward heads' inputs and the training scripts' sample grids."""

from __future__ import annotations

import io
import math

import numpy as np
import torch

__all__ = ["to_uint8", "image_grid", "png_bytes"]


def to_uint8(images: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """Float images ``[B, C, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, C]``.

    Default: ``round((clamp(x, -1, 1) + 1) * 127.5)`` in float32, half to even (docs/authors-code.md §9.41: the
    authors truncate). ``truncate=True``: ``trunc(255 * clamp((x + 1) / 2, 0, 1))``, torchvision's
    ``to_pil_image`` as the authors' reward uses it.
    """
    x = images.detach().float()
    if truncate:
        levels = ((x + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8)
    else:
        levels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return levels.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: list[np.ndarray] | np.ndarray, pad: int = 2, rows: int | None = None) -> np.ndarray:
    """uint8 images ``[H, W, C]`` side by side on a white background, ``pad`` pixels apart: ``rows`` rows
    (default: a near-square grid with ``ceil(sqrt(n))`` columns)."""
    n = len(images)
    if n == 0:
        raise ValueError("no images to put in a grid")
    cols = math.ceil(n / rows) if rows else math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w, c = images[0].shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = image
    return grid


def png_bytes(array: np.ndarray, upscale: int = 1) -> bytes:
    """A uint8 image ``[H, W, C]`` (C = 1 or 3) as PNG bytes, enlarged ``upscale`` times (nearest neighbour)."""
    from PIL import Image

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
