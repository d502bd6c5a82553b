"""What every image source shares: the ``ImageSet`` / ``Splits`` containers, ``DataError``, argument checks, reading
one image (decode, convert to grayscale or RGB, center-crop, resize), reading many files while skipping and counting
the broken ones, and the stratified ``holdout`` split for sources without an official test split.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

_BAD_NAMES_SHOWN = 5  # how many unreadable files a warning or error names before "..."
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNGs open in one of these


class DataError(ValueError):
    """Data missing or unreadable; the message says where it was expected and how to get it."""


@dataclass
class ImageSet:
    """Images of one split with their labels.

    Attributes:
        images: uint8 ``[N, H, W, C]`` at the target size (C = 1 or 3).
        labels: int64 ``[N]``; all 0 when the source has no labels.
        class_names: one name per class (``["all"]`` when unlabelled).
        attributes: bool ``[N, A]`` per-image binary attributes (CelebA), else None.
        attribute_names: the A attribute names, else None.
        skipped: unreadable or corrupt files skipped while reading this set.
        paths: the source file of each image, where there is one (image folders, CelebA), else None.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    attributes: np.ndarray | None = None
    attribute_names: list[str] | None = None
    skipped: int = 0
    paths: list[str] | None = None


@dataclass
class Splits:
    """A source's train and test ``ImageSet``."""

    train: ImageSet
    test: ImageSet


# --------------------------------------------------------------------------------------------------------------
# Checks of the size / share arguments (the config validates them too; these protect direct library use).


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_shape(image_size: int, channels: int) -> None:
    if not _is_int(image_size) or image_size < 1:
        raise DataError(f"data.image_size = {image_size!r} is invalid (allowed: a positive integer)")
    if not _is_int(channels) or channels not in (1, 3):
        raise DataError(f"data.channels = {channels!r} is invalid (allowed: 1 (grayscale) or 3 (RGB))")


def _check_fraction(key: str, value: float, allowed: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):
        raise DataError(f"{key} = {value!r} is invalid (allowed: {allowed})")


def _check_bad_fraction(max_bad_fraction: float) -> None:
    _check_fraction("data.max_bad_fraction", max_bad_fraction, "a number in [0, 1]", lambda v: 0 <= v <= 1)


# --------------------------------------------------------------------------------------------------------------
# One image: decode, convert, crop, resize.


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """``im`` as PIL mode "L" (channels 1) or "RGB" (channels 3). An alpha channel is dropped."""
    if im.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert("L") clips 16-bit values at 255 (a 16-bit PNG would come out almost white); scale instead.
        a = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _fit(im: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """Center-crop ``im`` (already in mode L or RGB) to a square and resize it to ``image_size``: uint8 [H, W, C].

    Cropping first (at whole pixels; an odd excess leaves the extra pixel on the right / bottom) and then resizing
    gives the same framing as "resize so the shorter side is ``image_size``, then center-crop", except that the
    resampling filter never reaches into the cropped-away borders, so they cannot bleed into the edge pixels.
    """
    w, h = im.size
    side = min(w, h)
    if side == 0:
        raise DataError(f"image of size {w}x{h} has no pixels")
    left, top = (w - side) // 2, (h - side) // 2
    if side != w or side != h:
        im = im.crop((left, top, left + side, top + side))
    if side != image_size:
        # LANCZOS when shrinking (sharp, antialiased); BICUBIC when enlarging (LANCZOS rings around edges there).
        resample = Image.Resampling.LANCZOS if side > image_size else Image.Resampling.BICUBIC
        im = im.resize((image_size, image_size), resample)
    a = np.asarray(im, dtype=np.uint8)
    return a[:, :, None] if channels == 1 else a


def load_image(path: str | Path, image_size: int, channels: int) -> np.ndarray:
    """Read one image file as uint8 ``[image_size, image_size, channels]``.

    The image is turned upright by its EXIF orientation (camera photos), converted to grayscale (PIL "L",
    ITU-R 601-2 luma) or RGB (alpha dropped; 16-bit grayscale scaled to 8 bits), center-cropped to a square and
    resized so its side is ``image_size`` (LANCZOS when shrinking, BICUBIC when enlarging).

    Args:
        path (str | Path): the image file (any format Pillow reads).
        image_size (int): side of the square output, >= 1.
        channels (int): 1 (grayscale) or 3 (RGB).

    Returns:
        np.ndarray: uint8 ``[image_size, image_size, channels]``.

    Raises:
        DataError: the file is missing, not an image, truncated or otherwise undecodable (the message names it),
            or ``image_size`` / ``channels`` is invalid.
    """
    _check_shape(image_size, channels)
    path = Path(path)
    try:
        with Image.open(path) as im:
            # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale while still >= image_size, which makes
            # large camera photos several times faster to read. The final resize below sets the exact size.
            im.draft(None, (image_size, image_size))
            im.load()
            im = _to_mode(ImageOps.exif_transpose(im), channels)
        return _fit(im, image_size, channels)
    except DataError as e:
        raise DataError(f"cannot read image '{path}': {e}") from None
    # Corrupt files raise many exception types inside Pillow's decoders (OSError, SyntaxError, struct.error,
    # DecompressionBombError, ...); each one means "this file is unusable", which callers count and skip.
    except Exception as e:
        raise DataError(f"cannot read image '{path}': {type(e).__name__}: {e}") from None


def _fit_array(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` (C = 1 or 3) -> uint8 ``[N, image_size, image_size, channels]``.

    Each image goes through the same conversion, crop and resize as ``load_image``, so a dataset reads the same
    whether it comes as arrays (IDX, CIFAR-10) or as image files.
    """
    n, h, w, c = images.shape
    if h == w == image_size and c == channels:
        return np.ascontiguousarray(images)
    if h == w == image_size and c == 1 and channels == 3:
        return np.repeat(images, 3, axis=3)  # exact: what PIL's L -> RGB does
    out = np.empty((n, image_size, image_size, channels), dtype=np.uint8)
    for i in range(n):
        im = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i])
        out[i] = _fit(_to_mode(im, channels), image_size, channels)
    return out


# --------------------------------------------------------------------------------------------------------------
# Many image files: read, skip and count the bad ones.


def _read_files(paths: Sequence[Path], names: Sequence[str], image_size: int, channels: int,
                max_bad_fraction: float, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Read ``paths``; unreadable ones are skipped. Returns (images, indices of the files read, skipped count).

    Warns once when files were skipped; raises ``DataError`` when their share exceeds ``max_bad_fraction`` or
    nothing at all could be read. ``names`` are the files as the messages show them (paths relative to the root).
    """
    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.uint8)
    kept: list[int] = []
    bad: list[str] = []
    for i, p in enumerate(paths):
        try:
            out[len(kept)] = load_image(p, image_size, channels)
        except DataError:
            bad.append(names[i])
            continue
        kept.append(i)
    total = len(paths)
    if bad:
        shown = ", ".join(bad[:_BAD_NAMES_SHOWN]) + (", ..." if len(bad) > _BAD_NAMES_SHOWN else "")
        share = len(bad) / total
        if not kept:
            raise DataError(f"{where}: none of the {total} image files could be read (first: {shown})")
        if share > max_bad_fraction:
            raise DataError(f"{where}: {len(bad)} of {total} image files are unreadable or missing ({share:.1%}; "
                            f"first: {shown}), more than data.max_bad_fraction = {max_bad_fraction} (allowed: at most "
                            f"that share; repair or remove the files, or raise data.max_bad_fraction)")
        warnings.warn(f"{where}: skipped {len(bad)} of {total} unreadable or missing image files ({share:.1%}, "
                      f"within data.max_bad_fraction = {max_bad_fraction}): {shown}", stacklevel=3)
    # Slicing keeps the whole buffer alive; copy only when something was dropped.
    images = out if len(kept) == total else out[: len(kept)].copy()
    return images, np.asarray(kept, dtype=np.int64), len(bad)


# --------------------------------------------------------------------------------------------------------------
# Holdout split (sources without an official test split).


def _take(s: ImageSet, idx: np.ndarray, skipped: int) -> ImageSet:
    return ImageSet(
        images=s.images[idx],
        labels=s.labels[idx],
        class_names=list(s.class_names),
        attributes=None if s.attributes is None else s.attributes[idx],
        attribute_names=None if s.attribute_names is None else list(s.attribute_names),
        skipped=skipped,
        paths=None if s.paths is None else [s.paths[i] for i in idx],
    )


def holdout(images: ImageSet, test_fraction: float, seed: int) -> Splits:
    """Split a set without an official test split into train and test: deterministic and stratified by class.

    Within each class, ``round(test_fraction * n)`` images (at least 1 and at most n - 1 when the class has two or
    more images and ``test_fraction > 0``; a single image stays in train) are drawn with
    ``np.random.default_rng(seed)``, visiting classes in label order. Both parts keep the original order. The
    same set, fraction and seed always give the same split. The ``skipped`` count of the read is carried by train.

    Args:
        images (ImageSet): the whole set.
        test_fraction (float): held-out share per class, in [0, 1).
        seed (int): seed of the draw.

    Returns:
        Splits: disjoint train and test sets that together hold every image.

    Raises:
        DataError: ``test_fraction`` is outside [0, 1) (``data.test_fraction``), or labels and images disagree.
    """
    _check_fraction("data.test_fraction", test_fraction, "a number in [0, 1)", lambda v: 0 <= v < 1)
    labels = np.asarray(images.labels)
    if labels.shape != (len(images.images),):
        raise DataError(f"{labels.size} labels for {len(images.images)} images (expected one label per image)")
    rng = np.random.default_rng(seed)
    test_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        k = int(np.floor(test_fraction * n + 0.5))  # round half up (Python's round() is half-to-even)
        if test_fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)  # every class with two or more images appears in both parts
        elif n < 2:
            k = 0
        test_parts.append(rng.permutation(idx)[:k])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.zeros(0, dtype=np.int64)
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    return Splits(_take(images, np.flatnonzero(~is_test), images.skipped), _take(images, np.flatnonzero(is_test), 0))
