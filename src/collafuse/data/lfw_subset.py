"""scikit-image's bundled LFW subset (``data.dataset = "lfw-subset"``; a quick offline demo set)."""

from __future__ import annotations

import numpy as np

from .common import DataError, ImageSet, Splits, _check_shape, _fit_array, holdout
from .images import to_uint8


def lfw_subset(image_size: int, channels: int, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-image's bundled LFW subset: 200 grayscale 25x25 crops (``skimage.data.lfw_subset``; in the wheel).

    scikit-image documents the first 100 as faces and the other 100 as non-faces (background crops of the same
    photos), so there are two classes, "face" (0) and "non-face" (1). No official test split: ``holdout`` makes one.

    Args:
        image_size (int): side of the square output images (upscaled from 25).
        channels (int): 1, or 3 (gray replicated).
        test_fraction (float): held-out share per class, in [0, 1); default 0.2.
        seed (int): seed of the holdout split; default 0.

    Returns:
        Splits: the stratified holdout split.

    Raises:
        DataError: scikit-image is not installed, or its data file is not in the installed wheel (scikit-image
            would then try to download it, which this project never does).
    """
    _check_shape(image_size, channels)
    try:
        import skimage.data
    except ImportError:
        raise DataError("data.dataset = 'lfw-subset' needs scikit-image, which is not installed "
                        "(pip install scikit-image)") from None
    try:
        faces = skimage.data.lfw_subset()
    except Exception as e:  # not in the wheel: scikit-image falls back to pooch and the network
        raise DataError(f"scikit-image's bundled lfw_subset.npy could not be read offline: {type(e).__name__}: "
                        f"{e}") from None
    faces = np.asarray(faces)
    if faces.shape[0] != 200 or faces.ndim != 3:
        raise DataError(f"scikit-image's lfw_subset has shape {list(faces.shape)} (expected [200, 25, 25]: "
                        f"100 faces, then 100 non-faces)")
    # Documented as uint8 but shipped as float64 in [0, 1] (scikit-image 0.26); accept either.
    x = faces if faces.dtype == np.uint8 else to_uint8(faces, 0.0, 1.0)
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [100, len(x) - 100])
    images = ImageSet(_fit_array(x[:, :, :, None], image_size, channels), labels, ["face", "non-face"])
    return holdout(images, test_fraction, seed)
