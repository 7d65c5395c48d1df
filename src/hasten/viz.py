"""Pictures a person would rather look at: image grids written as PNG (atomically)."""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np
from torch import Tensor

from ._io import atomic_path

__all__ = ["grid_array", "save_grid"]


def grid_array(images01: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images in [0, 1] into one ``[H', W', C]`` uint8 array (C = 1 or 3)."""
    if images01.ndim != 4 or images01.shape[1] not in (1, 3):
        raise ValueError(f"need images of shape [N, 1 or 3, H, W], got {tuple(images01.shape)}")
    n, c, h, w = images01.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    out = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, dtype=np.float32)
    arr = images01.detach().float().clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        out[y : y + h, x : x + w] = arr[i]
    return np.round(out * 255).astype(np.uint8)


def save_grid(images01: Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 3) -> pathlib.Path:
    """Save a PNG grid of ``[N, C, H, W]`` images in [0, 1], upscaled ``scale`` times (nearest)."""
    from PIL import Image

    arr = grid_array(images01, nrow)
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return pathlib.Path(path)
