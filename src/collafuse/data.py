"""Datasets and their partition across clients.

Every partition rule is a matrix P [clients, classes] whose column c says which share of class c each client gets.
The same P splits the official train set and the official test set, so each client's held-out split has the
client's own class mix.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import DataConfig

FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


class DataError(ValueError):
    """Data missing or unreadable; the message says where it was expected and how to get it."""


@dataclass
class ClientData:
    """One client's private images in [-1, 1] as float32 [N, 1, 28, 28] with int64 labels."""

    index: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.train_y, minlength=num_classes).tolist()


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


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def partition_matrix(cfg: DataConfig, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """P [clients, classes]: the share of each class that each client holds (columns sum to 1 or 0)."""
    n = cfg.num_clients
    if cfg.partition == "iid":
        return np.full((n, num_classes), 1.0 / n)
    if cfg.partition == "class_groups":
        groups = cfg.class_groups or [g.tolist() for g in np.array_split(np.arange(num_classes), n)]
        P = np.zeros((n, num_classes))
        # With fewer clients than configured groups, the groups are dealt out round-robin.
        for g, classes in enumerate(groups):
            P[g % n, classes] = 1.0
        return P
    if cfg.partition == "dirichlet":
        # Dirichlet(alpha) class mix per class across clients (Hsu et al. 2019).
        return rng.dirichlet(np.full(n, cfg.dirichlet_alpha), size=num_classes).T
    raise DataError(f"data.partition = {cfg.partition!r} is invalid (allowed: 'class_groups', 'iid', 'dirichlet')")


def split_indices(labels: np.ndarray, P: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal each class's (shuffled) indices to clients in proportion to P's column. Disjoint, covers every class
    whose column is non-zero."""
    parts: list[list[np.ndarray]] = [[] for _ in range(P.shape[0])]
    for c in range(P.shape[1]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        share = P[:, c]
        if share.sum() == 0:
            continue
        bounds = np.round(np.cumsum(share / share.sum()) * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, bounds[:-1])):
            parts[k].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=int) for p in parts]


def load_client_datasets(cfg: DataConfig, num_classes: int, seed: int) -> list[ClientData]:
    """Load the configured dataset and give each client its train split and held-out test split."""
    if cfg.dataset != "fashion-mnist":
        raise DataError(f"data.dataset = {cfg.dataset!r} is invalid (allowed: 'fashion-mnist')")
    arrays = load_fashion_mnist(cfg.root)
    rng = np.random.default_rng(seed)
    P = partition_matrix(cfg, num_classes, rng)
    train_parts = split_indices(arrays["train_y"], P, rng)
    test_parts = split_indices(arrays["test_y"], P, rng)
    clients = []
    for i, (tr, te) in enumerate(zip(train_parts, test_parts)):
        if cfg.max_train_per_client:
            tr = np.sort(rng.permutation(tr)[: cfg.max_train_per_client])
        if cfg.max_test_per_client:
            te = np.sort(rng.permutation(te)[: cfg.max_test_per_client])
        if len(tr) == 0:
            raise DataError(f"client {i} received no training images under data.partition = {cfg.partition!r}")
        clients.append(ClientData(
            index=i,
            train_x=to_model_range(arrays["train_x"][tr]),
            train_y=torch.from_numpy(arrays["train_y"][tr].astype(np.int64)),
            test_x=to_model_range(arrays["test_x"][te]),
            test_y=torch.from_numpy(arrays["test_y"][te].astype(np.int64)),
        ))
    return clients


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (the Fashion-MNIST format; read back by ``read_idx``)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wb") as f:
        f.write(header + a.tobytes())
    tmp.replace(path)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """Inverse of ``to_model_range`` (exact: every value came from a uint8)."""
    return ((x.squeeze(1).numpy().astype(np.float64) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def export_client_folders(cfg: DataConfig, num_classes: int, seed: int, out_dir: Path) -> list[Path]:
    """Write each client's partition as its own Fashion-MNIST-layout folder ``out_dir/client<i>/`` (the four IDX
    files), so a deployed client node can be given only its own images (``data-dir`` in its node config)."""
    paths = []
    for c in load_client_datasets(cfg, num_classes, seed):
        d = Path(out_dir) / f"client{c.index}"
        d.mkdir(parents=True, exist_ok=True)
        for key, x in (("train_x", c.train_x), ("test_x", c.test_x)):
            write_idx(d / FASHION_MNIST_FILES[key], _to_uint8(x))
        for key, y in (("train_y", c.train_y), ("test_y", c.test_y)):
            write_idx(d / FASHION_MNIST_FILES[key], y.numpy().astype(np.uint8))
        paths.append(d)
    return paths


def load_client_folder(root: str | Path, index: int, num_classes: int) -> ClientData:
    """All the images of one client's own folder (Fashion-MNIST layout, e.g. written by ``export_client_folders``):
    what a deployed client node reads, and all it reads."""
    arrays = load_fashion_mnist(root)
    for key in ("train_y", "test_y"):
        if len(arrays[key]) and int(arrays[key].max()) >= num_classes:
            raise DataError(f"{root}: labels up to {int(arrays[key].max())} (allowed: [0, {num_classes - 1}])")
    if len(arrays["train_x"]) == 0:
        raise DataError(f"{root}: no training images for client {index}")
    return ClientData(index, to_model_range(arrays["train_x"]),
                      torch.from_numpy(arrays["train_y"].astype(np.int64)),
                      to_model_range(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64)))
