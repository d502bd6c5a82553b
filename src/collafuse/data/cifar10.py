"""CIFAR-10, python version (pickled dicts; ``data.dataset = "cifar10"``). Pickles can run code when loaded, so
only a handful of globals load (``RestrictedUnpickler``)."""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np

from .common import DataError, ImageSet, Splits, _check_shape, _fit_array

CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
CIFAR10_LAYOUT = ("root/data_batch_1 .. data_batch_5, root/test_batch, root/batches.meta "
                  "(or root/cifar-10-batches-py/...)")
CIFAR10_SIDE = 32


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
