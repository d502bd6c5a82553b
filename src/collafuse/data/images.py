"""Image conversions and grids: uint8 <-> the model's [-1, 1] range, and image grids as PNG (PIL; torchvision is not
available beside the pinned CPU torch)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def as_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape) -> float32 in [-1, 1], the same values as ``to_model_range`` (``x / 127.5 - 1`` in
    float32). A floating-point tensor is taken to be in the model's range already and returned as it is."""
    return x if x.is_floating_point() else x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor | np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """Floats in [low, high] -> uint8 in [0, 255], same shape: clipped to [low, high], scaled by 255 / (high - low)
    and rounded half to even. The package's one float -> uint8 conversion.

    The default range is the model's [-1, 1] (images, samples, noisy hand-offs: values outside are clipped); there it
    inverts ``to_model_range`` exactly. A torch tensor is converted in float32 on the CPU (what every saved grid used),
    a numpy array in float64 (the bundled demo sets: [0, 16] digits, [0, 1] faces).

    Args:
        x (`torch.Tensor | np.ndarray`): the values, any shape.
        low (`float`, defaults to -1.0): the value that becomes 0.
        high (`float`, defaults to 1.0): the value that becomes 255.
    """
    t = x.detach().float().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    return ((t.clamp(low, high) - low) * (255.0 / (high - low))).round().to(torch.uint8).numpy()


def grid(x: torch.Tensor, ncol: int | None = None, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile a batch of [-1, 1] images [N, C, H, W] into one image (white padding), upscaled ``scale`` times with
    nearest-neighbour."""
    imgs = to_uint8(x).transpose(0, 2, 3, 1)
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
