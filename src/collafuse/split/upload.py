"""What a client does to its images before the upload leaves it: clipping each image to an L2 norm bound
(``split.upload_clip_norm``), which bounds the sensitivity that the privacy accounting of the upload assumes
(``collafuse.evaluation.accounting``)."""

from __future__ import annotations

import torch


def clip_images(x: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Each image scaled down to L2 norm at most ``clip_norm``: x * min(1, C / ||x||_2). Two clipped images lie at
    most 2C apart, the sensitivity that `collafuse.evaluation.accounting.image_sensitivity` reports.

    Args:
        x (`torch.Tensor`): [N, ...] images.
        clip_norm (`float`): C > 0.
    """
    norms = x.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (clip_norm / norms).clamp(max=1.0)
    return x * scale.view(-1, *([1] * (x.dim() - 1)))
