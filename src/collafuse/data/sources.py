"""Image sources: datasets in their official on-disk layouts, read as uint8 images at one configured size.

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

import functools
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .partition import DataError, read_idx

SOURCES = ("idx", "image-folder", "cifar10", "celeba", "sklearn-digits", "lfw-subset")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IMAGE_FOLDER_LAYOUT = "root/<class>/**/*.png|jpg|jpeg (one subfolder per class) or root/**/*.png|jpg|jpeg (unlabelled)"
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR10_LAYOUT = ("root/data_batch_1 .. data_batch_5, root/test_batch, root/batches.meta "
                  "(or root/cifar-10-batches-py/...)")
CELEBA_LAYOUT = "root/img_align_celeba/*.jpg, root/list_attr_celeba.txt, root/list_eval_partition.txt"
CIFAR10_SIDE = 32
_BAD_NAMES_SHOWN = 5  # how many unreadable files a warning or error names before "..."
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale PNGs open in one of these


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


# --------------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, KMNIST, ...).


def _idx_images(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, :, :, None]
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x
    raise DataError(f"'{path}' holds an array of shape {list(x.shape)} (allowed: [N, H, W] or [N, H, W, 1|3])")


def read_idx_folder(root: str | Path, image_size: int, channels: int) -> Splits:
    """An MNIST-style IDX folder: the official train and test (t10k) splits.

    Expects ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` in ``root``, each plain or gzipped (``.gz``; preferred when both exist). IDX files
    carry no class names, so the classes are named "0" .. str(max label).

    Args:
        root (str | Path): the folder.
        image_size (int): side of the square output images (resized when it differs from the files').
        channels (int): 1 (grayscale) or 3 (RGB; gray images are replicated).

    Returns:
        Splits: the official train and test sets.

    Raises:
        DataError: a file is missing (the message lists the four expected names), unreadable, or images and labels
            disagree in count or shape.
    """
    _check_shape(image_size, channels)
    root = Path(root)
    found: dict[str, Path] = {}
    for key, name in IDX_FILES.items():
        for candidate in (root / f"{name}.gz", root / name):
            if candidate.is_file():
                found[key] = candidate
                break
    missing = [name for key, name in IDX_FILES.items() if key not in found]
    if missing:
        raise DataError(f"IDX folder '{root}' lacks {', '.join(missing)} (expected the four files "
                        f"{', '.join(IDX_FILES.values())} in it, each plain or .gz, as MNIST / Fashion-MNIST ship)")
    arrays = {key: read_idx(path) for key, path in found.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if y.ndim != 1 or len(x) != len(y):
            raise DataError(f"IDX folder '{root}': {split} labels of shape {list(y.shape)} do not match "
                            f"{len(x)} images (allowed: one label per image)")
    n_classes = max((int(arrays[k].max()) + 1 for k in ("train_y", "test_y") if len(arrays[k])), default=1)
    class_names = [str(c) for c in range(n_classes)]
    sets = {}
    for split in ("train", "test"):
        x = _fit_array(_idx_images(arrays[f"{split}_x"], found[f"{split}_x"]), image_size, channels)
        sets[split] = ImageSet(x, arrays[f"{split}_y"].astype(np.int64), list(class_names))
    return Splits(sets["train"], sets["test"])


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10, python version (pickled dicts). Pickles can run code when loaded, so only a handful of globals load.


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``, which Python 3 pickles of protocol < 3 use to spell bytes objects."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"global '_codecs.encode' with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], object]:
    """(module, name) -> object for every global a CIFAR-10 batch file may name: what a pickled numpy array needs.

    The numpy functions are taken from numpy's own pickling output, so the table follows numpy's private module
    (``numpy.core`` in numpy 1.x, which wrote the official files; ``numpy._core`` since 2.0); both names map to
    the same function. Built on first use, not at import.
    """
    a = np.zeros(1, dtype=np.uint8)
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # __reduce__ names _reconstruct (protocols <= 4); __reduce_ex__(5) names _frombuffer (protocol 5).
    for fn in (a.__reduce__()[0], a.__reduce_ex__(5)[0]):
        module, name = fn.__module__, fn.__name__
        for alias in (module, module.replace("numpy._core", "numpy.core"), module.replace("numpy.core", "numpy._core")):
            allowed[(alias, name)] = fn
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, tuples, str, bytes, numbers and numpy arrays.

    ``find_class`` resolves only the globals in ``_allowed_globals``; any other (``os.system``, ``builtins.eval``,
    ...) raises ``pickle.UnpicklingError`` before anything is called.
    """

    def find_class(self, module: str, name: str) -> object:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return obj


def _load_pickle(path: Path) -> object:
    """Load a pickle file with ``RestrictedUnpickler`` (``encoding="bytes"``: the official files are Python 2)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"refused to load '{path}': {e} (a CIFAR-10 batch holds only dicts, lists, bytes and "
                        f"numpy arrays; nothing else is unpickled)") from None
    except Exception as e:  # truncated or garbage files fail in many ways inside pickle; all mean "unreadable"
        raise DataError(f"cannot read '{path}': {type(e).__name__}: {e}") from None


def _get(d: dict, key: bytes, path: Path) -> object:
    # Files written from Python 3 with str keys load as str: accept both spellings.
    for k in (key, key.decode()):
        if k in d:
            return d[k]
    raise DataError(f"'{path}' lacks the key {key!r} (expected a CIFAR-10 python-version file)")


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 [N, 32, 32, 3], int64 [N])."""
    d = _load_pickle(path)
    if not isinstance(d, dict):
        raise DataError(f"'{path}' holds a {type(d).__name__} (expected a dict with b'data' and b'labels')")
    data, labels = _get(d, b"data", path), _get(d, b"labels", path)
    side = CIFAR10_SIDE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side**2:
        what = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"'{path}': b'data' is {what} (expected uint8 [N, {3 * side**2}]: R, G, B planes of 32x32)")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"'{path}': b'labels' is not a list of integers") from None
    if y.shape != (len(data),):
        raise DataError(f"'{path}': {y.size} labels for {len(data)} images (expected one label per image)")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"'{path}': labels in [{y.min()}, {y.max()}] (allowed: [0, {num_classes - 1}], "
                        f"the classes of batches.meta)")
    # Each row is the R plane, then G, then B, each 32x32 in row-major order.
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    return images, y


def read_cifar10(root: str | Path, image_size: int, channels: int) -> Splits:
    """CIFAR-10, python version (``cifar-10-python.tar.gz`` unpacked): the official 50,000 / 10,000 split.

    Expects ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta`` in ``root`` or in
    ``root/cifar-10-batches-py/``. All five train batches are required: a missing one would silently drop a fifth
    of the data. The files are unpickled by ``RestrictedUnpickler``, which cannot run code.

    Args:
        root (str | Path): the folder.
        image_size (int): side of the square output images (32 keeps the originals).
        channels (int): 3 (RGB) or 1 (PIL's ITU-R 601-2 luma).

    Returns:
        Splits: train (data_batch_1..5 in order) and test (test_batch); class names from batches.meta.

    Raises:
        DataError: a file is missing (the message shows the layout), refused by the restricted unpickler, or
            malformed.
    """
    _check_shape(image_size, channels)
    root = Path(root)
    folder = next((d for d in (root, root / "cifar-10-batches-py") if all((d / f).is_file() for f in CIFAR10_FILES)),
                  None)
    if folder is None:
        missing = [f for f in CIFAR10_FILES if not (root / f).is_file()]
        raise DataError(f"CIFAR-10 not found in '{root}': it lacks {', '.join(missing)} (expected {CIFAR10_LAYOUT}, "
                        f"the unpacked python version)")
    meta = _load_pickle(folder / "batches.meta")
    if not isinstance(meta, dict):
        raise DataError(f"'{folder / 'batches.meta'}' holds a {type(meta).__name__} (expected a dict with "
                        f"b'label_names')")
    names = _get(meta, b"label_names", folder / "batches.meta")
    if not isinstance(names, list | tuple) or not names:
        raise DataError(f"'{folder / 'batches.meta'}': b'label_names' is not a non-empty list")
    class_names = [_text(n) for n in names]
    splits = {}
    for split, files in (("train", CIFAR10_FILES[:5]), ("test", ("test_batch",))):
        batches = [_cifar_batch(folder / f, len(class_names)) for f in files]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        splits[split] = ImageSet(_fit_array(x, image_size, channels), y, list(class_names))
    return Splits(splits["train"], splits["test"])


# --------------------------------------------------------------------------------------------------------------
# CelebA (aligned and cropped faces, official attribute and partition lists).


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


# --------------------------------------------------------------------------------------------------------------
# Small sets bundled with installed packages (quick offline demos).


def _float_to_uint8(x: np.ndarray, top: float) -> np.ndarray:
    """Values in [0, top] -> uint8 [0, 255], rounded."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


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
    x = _float_to_uint8(digits.images, 16.0)[:, :, :, None]
    images = ImageSet(_fit_array(x, image_size, channels), np.asarray(digits.target, dtype=np.int64),
                      [str(c) for c in range(10)])
    return holdout(images, test_fraction, seed)


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
    x = faces if faces.dtype == np.uint8 else _float_to_uint8(faces, 1.0)
    labels = np.repeat(np.array([0, 1], dtype=np.int64), [100, len(x) - 100])
    images = ImageSet(_fit_array(x[:, :, :, None], image_size, channels), labels, ["face", "non-face"])
    return holdout(images, test_fraction, seed)


# --------------------------------------------------------------------------------------------------------------
# Holdout split and the one entry point.


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


def load_source(kind: str, root: str | Path, image_size: int, channels: int, *, test_fraction: float = 0.2,
                seed: int = 0, max_bad_fraction: float = 0.05, limit: int = 0) -> Splits:
    """Load one image source as train and test sets at ``image_size`` x ``image_size`` with ``channels`` channels.

    Args:
        kind (str): ``data.dataset``: "idx", "image-folder", "cifar10", "celeba", "sklearn-digits" or "lfw-subset".
        root (str | Path): the folder holding the files (ignored by the two bundled sets).
        image_size (int): side of the square output images, >= 1.
        channels (int): 1 (grayscale) or 3 (RGB).
        test_fraction (float): held-out share for sources without an official test split (image-folder,
            sklearn-digits, lfw-subset), in [0, 1); default 0.2.
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
    return lfw_subset(image_size, channels, test_fraction, seed)
