"""A folder of PNG / JPEG files (``data.dataset = "image-folder"``): one subfolder per class, or unlabelled."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .common import DataError, ImageSet, _check_bad_fraction, _check_shape, _read_files

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE_FOLDER_LAYOUT = "root/<class>/**/*.png|jpg|jpeg (one subfolder per class) or root/**/*.png|jpg|jpeg (unlabelled)"


def _list_image_files(root: Path) -> list[Path]:
    """Image files below ``root`` (recursive, extension case-insensitive), sorted by their path parts.

    Hidden files and folders (names starting with ".") are left out: they are tool litter such as macOS "._x.jpg"
    resource forks or ".ipynb_checkpoints", not images of the dataset. Symlinked folders are not followed (no loops).
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    # Sorting by parts (not by the string) orders folder by folder, the same on every OS and file system.
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def read_image_folder(root: str | Path, image_size: int, channels: int, max_bad_fraction: float = 0.05) -> ImageSet:
    """Every PNG / JPEG below ``root`` (recursively), as one ``ImageSet`` in sorted-path order.

    Labels: when EVERY image lies below a first-level subfolder (``root/<class>/...``), the sorted subfolder names
    are the classes; otherwise (any image directly in ``root``) the set is unlabelled (labels 0, ``["all"]``).
    Unreadable files are skipped, counted in ``skipped`` and named in one warning.

    Args:
        root (str | Path): the folder.
        image_size (int): side of the square output images.
        channels (int): 1 (grayscale) or 3 (RGB).
        max_bad_fraction (float): largest tolerated share of unreadable files, in [0, 1]; default 0.05.

    Returns:
        ImageSet: with ``paths`` set; no test split (see ``holdout``).

    Raises:
        DataError: ``root`` is missing or holds no images (the message shows the expected layout), more than
            ``max_bad_fraction`` of the files are unreadable, or an argument is invalid.
    """
    _check_shape(image_size, channels)
    _check_bad_fraction(max_bad_fraction)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder '{root}' does not exist or is not a folder (expected {IMAGE_FOLDER_LAYOUT})")
    paths = _list_image_files(root)
    if not paths:
        raise DataError(f"image folder '{root}' holds no .png/.jpg/.jpeg files (expected {IMAGE_FOLDER_LAYOUT})")
    parts = [p.relative_to(root).parts for p in paths]
    # Classes come from the file layout, before reading, so a class whose files are all broken keeps its index.
    if all(len(q) >= 2 for q in parts):
        class_names = sorted({q[0] for q in parts})
        index = {name: i for i, name in enumerate(class_names)}
        labels = np.array([index[q[0]] for q in parts], dtype=np.int64)
    else:
        class_names = ["all"]
        labels = np.zeros(len(paths), dtype=np.int64)
    names = ["/".join(q) for q in parts]
    images, kept, skipped = _read_files(paths, names, image_size, channels, max_bad_fraction, f"image folder '{root}'")
    return ImageSet(images, labels[kept], class_names, skipped=skipped, paths=[str(paths[i]) for i in kept])
