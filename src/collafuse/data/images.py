"""Image grids as PNG (PIL; torchvision is not available beside the pinned CPU torch)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [N, C, H, W] -> uint8 [N, H, W, C]; values outside [-1, 1] (noisy hand-offs) are clipped."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(x: torch.Tensor, ncol: int | None = None, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile a batch into one image (white padding), upscaled ``scale`` times with nearest-neighbour."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    out = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def save_grid(x: torch.Tensor, path: Path, ncol: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(x, ncol).save(path)
    return path
