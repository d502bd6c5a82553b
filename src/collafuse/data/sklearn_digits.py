"""scikit-learn's bundled handwritten digits (``data.dataset = "sklearn-digits"``; a quick offline demo set)."""

from __future__ import annotations

import numpy as np

from .common import DataError, ImageSet, Splits, _check_shape, _fit_array, holdout
from .images import to_uint8


def sklearn_digits(image_size: int, channels: int, test_fraction: float = 0.2, seed: int = 0) -> Splits:
    """scikit-learn's bundled handwritten digits (1,797 images of 8x8, values 0..16; read from the wheel, offline).

    Values are scaled to 0..255 and the images upscaled (BICUBIC) to ``image_size``. Classes "0" .. "9". There is no
    official test split, so ``holdout`` makes one.

    Args:
        image_size (int): side of the square output images.
        channels (int): 1, or 3 (gray replicated).
        test_fraction (float): held-out share per class, in [0, 1); default 0.2.
        seed (int): seed of the holdout split; default 0.

    Returns:
        Splits: the stratified holdout split.

    Raises:
        DataError: scikit-learn is not installed or its bundled data cannot be read.
    """
    _check_shape(image_size, channels)
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.dataset = 'sklearn-digits' needs scikit-learn, which is not installed "
                        "(pip install scikit-learn)") from None
    try:
        digits = load_digits()
    except Exception as e:  # the data ship inside the wheel; failing to read them means a broken install
        raise DataError(f"scikit-learn's bundled digits could not be read: {type(e).__name__}: {e}") from None
    x = to_uint8(digits.images, 0.0, 16.0)[:, :, :, None]
    images = ImageSet(_fit_array(x, image_size, channels), np.asarray(digits.target, dtype=np.int64),
                      [str(c) for c in range(10)])
    return holdout(images, test_fraction, seed)
