"""CelebA, aligned and cropped faces with the official attribute and partition lists (``data.dataset = "celeba"``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (
    _BAD_NAMES_SHOWN,
    DataError,
    ImageSet,
    Splits,
    _check_bad_fraction,
    _check_shape,
    _is_int,
    _read_files,
)

CELEBA_LAYOUT = "root/img_align_celeba/*.jpg, root/list_attr_celeba.txt, root/list_eval_partition.txt"


def _celeba_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read '{path}': {e}") from None


def _plain_name(name: str, path: Path, line: int) -> str:
    # The lists name files inside img_align_celeba/; a path (../x) would read outside it.
    if name in (".", "..") or "/" in name or "\\" in name:
        raise DataError(f"{path}:{line}: {name!r} is not a plain file name (expected e.g. 000001.jpg)")
    return name


def _read_celeba_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """list_attr_celeba.txt: line 1 the image count, line 2 the attribute names, then ``name v1 .. vA``, v = 1 / -1."""
    lines = _celeba_lines(path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"'{path}' does not start with an image count and a line of attribute names "
                        f"(expected the official list_attr_celeba.txt)")
    count, names = int(lines[0].strip()), lines[1].split()
    rows: dict[str, np.ndarray] = {}
    for ln, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise DataError(f"{path}:{ln}: expected a file name and {len(names)} values 1 / -1, found {line.strip()!r}")
        rows[_plain_name(parts[0], path, ln)] = np.array([v == "1" for v in parts[1:]], dtype=bool)
    if len(rows) != count:
        raise DataError(f"'{path}' lists {len(rows)} distinct images but its first line says {count}")
    return names, rows


def _read_celeba_partition(path: Path) -> list[tuple[str, int]]:
    """list_eval_partition.txt: ``name split`` per line, split 0 (train), 1 (validation) or 2 (test)."""
    out = []
    for ln, line in enumerate(_celeba_lines(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path}:{ln}: expected 'file name' and 0, 1 or 2, found {line.strip()!r}")
        out.append((_plain_name(parts[0], path, ln), int(parts[1])))
    return out


def read_celeba(root: str | Path, image_size: int, channels: int, max_bad_fraction: float = 0.05,
                limit: int = 0) -> Splits:
    """CelebA, aligned and cropped (``img_align_celeba``), with its 40 binary attributes and official partition.

    Train is partition 0; test is partition 2. The validation partition (1) is left out, so the test set is exactly
    the official test split that published CelebA numbers use. The 178x218 faces are center-cropped to 178x178 and
    resized. CelebA has no classes: labels are 0 and ``class_names`` is ``["all"]``; the attributes (1 -> True,
    -1 -> False) are in ``attributes`` / ``attribute_names``. Images in the partition list that are missing or
    unreadable are skipped and counted like a broken file in an image folder. The Kaggle copy's nested
    ``img_align_celeba/img_align_celeba/`` folder is accepted too (its CSV lists are not).

    Args:
        root (str | Path): the folder.
        image_size (int): side of the square output images.
        channels (int): 3 (RGB) or 1 (grayscale).
        max_bad_fraction (float): largest tolerated share of unreadable images per split, in [0, 1]; default 0.05.
        limit (int): when > 0, read only the first ``limit`` images of each split (partition-file order), since
            all 182,637 train and test faces take long to decode (``data.max_images``); default 0 (all).

    Returns:
        Splits: train and test ``ImageSet`` with attributes and paths.

    Raises:
        DataError: a file or folder is missing (the message shows the layout), a list is malformed (file and line
            named), an image of the partition has no attribute row, or too many images are unreadable.
    """
    _check_shape(image_size, channels)
    _check_bad_fraction(max_bad_fraction)
    if not _is_int(limit) or limit < 0:
        raise DataError(f"data.max_images = {limit!r} is invalid (allowed: 0 (all) or a positive integer)")
    root = Path(root)
    image_dir = root / "img_align_celeba"
    if (image_dir / "img_align_celeba").is_dir():
        image_dir = image_dir / "img_align_celeba"
    attr_path, part_path = root / "list_attr_celeba.txt", root / "list_eval_partition.txt"
    missing = [str(p.relative_to(root)) for p, ok in ((image_dir, image_dir.is_dir()), (attr_path, attr_path.is_file()),
                                                      (part_path, part_path.is_file())) if not ok]
    if missing:
        raise DataError(f"CelebA not found in '{root}': it lacks {', '.join(missing)} (expected {CELEBA_LAYOUT})")
    attribute_names, attributes = _read_celeba_attributes(attr_path)
    partition = _read_celeba_partition(part_path)
    splits = {}
    for split, code in (("train", 0), ("test", 2)):
        names = [name for name, c in partition if c == code]
        if limit:
            names = names[:limit]
        if not names:
            raise DataError(f"'{part_path}' lists no images of partition {code} ({split}) (expected the official list)")
        lacking = [n for n in names if n not in attributes]
        if lacking:
            raise DataError(f"{len(lacking)} images of '{part_path}' have no row in '{attr_path}' (first: "
                            f"{', '.join(lacking[:_BAD_NAMES_SHOWN])})")
        paths = [image_dir / n for n in names]
        images, kept, skipped = _read_files(paths, names, image_size, channels, max_bad_fraction,
                                            f"CelebA {split} split in '{image_dir}'")
        attrs = np.stack([attributes[names[i]] for i in kept])
        splits[split] = ImageSet(images, np.zeros(len(kept), dtype=np.int64), ["all"], attrs, list(attribute_names),
                                 skipped, [str(paths[i]) for i in kept])
    return Splits(splits["train"], splits["test"])
