"""IDX files (MNIST, Fashion-MNIST, KMNIST, ...): the reader and writer, Fashion-MNIST at its native size, and any
MNIST-style IDX folder as a source (``data.dataset = "idx"``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .common import DataError, ImageSet, Splits, _check_shape, _fit_array

FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) as used by MNIST and Fashion-MNIST (LeCun et al.; big-endian header)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file '{path}': {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"'{path}' is truncated: header says {dims}, file has {len(raw) - offset} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (the Fashion-MNIST format; read back by ``read_idx``)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wb") as f:
        f.write(header + a.tobytes())
    tmp.replace(path)


def load_fashion_mnist(root: str | Path) -> dict[str, np.ndarray]:
    root = Path(root)
    missing = [name for name in FASHION_MNIST_FILES.values() if not (root / name).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: {root} lacks {', '.join(missing)}. Install it with "
            f"'apt-get install dataset-fashion-mnist' (./run does this) or set data.root to a folder holding "
            f"{', '.join(FASHION_MNIST_FILES.values())}"
        )
    arrays = {key: read_idx(root / name) for key, name in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_x"]) != len(arrays[f"{split}_y"]):
            raise DataError(f"{root}: {split} images and labels differ in count")
    return arrays


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
