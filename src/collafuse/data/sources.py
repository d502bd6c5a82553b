"""Image sources: datasets in their official on-disk layouts, read as uint8 images at one configured size.
``load_source`` dispatches to the module of each format: ``idx``, ``image_folder``, ``cifar10``, ``celeba``,
``sklearn_digits``, ``lfw_subset`` (what they share is in ``common``).

Nothing here downloads anything. Every source reads files that are already on the local disk, or (for the two
small demo sets) data files bundled inside the installed scikit-learn / scikit-image wheels. Every image comes out
the same way: converted to grayscale (``channels = 1``) or RGB (``channels = 3``), center-cropped to a square and
resized to ``image_size`` x ``image_size``, as uint8 ``[N, H, W, C]``.

Sources with an official test split (IDX, CIFAR-10, CelebA) keep it; the others (image folders, the bundled sets)
are split by ``holdout``, deterministically and stratified by class.

Real users' folders contain broken files, so the file-based readers skip unreadable images, count them, warn once,
and stop with a ``DataError`` only when the share of bad files exceeds ``max_bad_fraction`` (``data.max_bad_fraction``).
"""

from __future__ import annotations

from pathlib import Path

from .celeba import read_celeba
from .cifar10 import read_cifar10
from .common import DataError, Splits, _check_bad_fraction, _check_fraction, _check_shape, holdout
from .emoji import emoji
from .idx import read_idx_folder
from .image_folder import read_image_folder
from .lfw_subset import lfw_subset
from .sklearn_digits import sklearn_digits

SOURCES = ("idx", "image-folder", "cifar10", "celeba", "sklearn-digits", "lfw-subset", "emoji")


def load_source(kind: str, root: str | Path, image_size: int, channels: int, *, test_fraction: float = 0.2,
                seed: int = 0, max_bad_fraction: float = 0.05, limit: int = 0) -> Splits:
    """Load one image source as train and test sets at ``image_size`` x ``image_size`` with ``channels`` channels.

    Args:
        kind (str): ``data.dataset``: "idx", "image-folder", "cifar10", "celeba", "sklearn-digits", "lfw-subset"
            or "emoji".
        root (str | Path): the folder holding the files (ignored by the bundled sets and emoji).
        image_size (int): side of the square output images, >= 1.
        channels (int): 1 (grayscale) or 3 (RGB).
        test_fraction (float): held-out share for sources without an official test split (image-folder,
            sklearn-digits, lfw-subset, emoji), in [0, 1); default 0.2.
        seed (int): seed of that holdout split; default 0.
        max_bad_fraction (float): largest tolerated share of unreadable image files (image-folder, celeba);
            default 0.05.
        limit (int): celeba only: read at most this many images per split; 0 (default) reads all.

    Returns:
        Splits: train and test ``ImageSet``.

    Raises:
        DataError: unknown ``kind`` or invalid argument (one line naming the key, the value and what is allowed),
            or the source's files are missing or unreadable.
    """
    if kind not in SOURCES:
        raise DataError(f"data.dataset = {kind!r} is invalid (allowed: {', '.join(repr(k) for k in SOURCES)})")
    _check_shape(image_size, channels)
    _check_bad_fraction(max_bad_fraction)
    _check_fraction("data.test_fraction", test_fraction, "a number in [0, 1)", lambda v: 0 <= v < 1)
    if kind == "idx":
        return read_idx_folder(root, image_size, channels)
    if kind == "image-folder":
        return holdout(read_image_folder(root, image_size, channels, max_bad_fraction), test_fraction, seed)
    if kind == "cifar10":
        return read_cifar10(root, image_size, channels)
    if kind == "celeba":
        return read_celeba(root, image_size, channels, max_bad_fraction, limit)
    if kind == "sklearn-digits":
        return sklearn_digits(image_size, channels, test_fraction, seed)
    if kind == "emoji":
        return emoji(image_size, channels, test_fraction, seed)
    return lfw_subset(image_size, channels, test_fraction, seed)
