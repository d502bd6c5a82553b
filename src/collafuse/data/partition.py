"""Datasets and their partition across clients.

Every partition rule is a matrix P [clients, classes] whose column c says which share of class c each client gets.
The same P splits the official train set and the official test set, so each client's held-out split has the
client's own class mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DATASET_DEFAULTS, DataConfig
from .common import DataError, ImageSet
from .idx import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, load_fashion_mnist, write_idx
from .images import as_model_range
from .sources import load_source


@dataclass
class ClientData:
    """One client's private images with int64 labels.

    The images are kept as loaded, uint8 [N, C, H, W]: a quarter of float32's memory (issue 30, CelebA-64 at
    200,000 images is 2.5 GB instead of 9.8 GB). ``train_x``, ``test_x`` and ``val_x`` give them in the model's
    [-1, 1] range as float32, converted when asked for (evaluation reads them whole); training converts one batch
    at a time (`batch`). The conversion is the one every earlier run made at load time (``x / 127.5 - 1`` in
    float32), so the float images are bit-identical to before. Float images already in [-1, 1] are accepted too
    (synthetic fixtures) and returned as they are.
    """

    index: int
    train_images: torch.Tensor
    train_y: torch.Tensor
    test_images: torch.Tensor
    test_y: torch.Tensor
    # The client's own images left out by data.max_train_per_client: never trained on and not the FID reference
    # (that is test_x), so a training curve's best point can be chosen on them. None when nothing was left out.
    val_images: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def train_x(self) -> torch.Tensor:
        """Every training image in [-1, 1], float32 [N, C, H, W] (a new tensor when they are stored as uint8)."""
        return as_model_range(self.train_images)

    @property
    def test_x(self) -> torch.Tensor:
        return as_model_range(self.test_images)

    @property
    def val_x(self) -> torch.Tensor | None:
        return None if self.val_images is None else as_model_range(self.val_images)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """The training images at ``idx`` in [-1, 1] (float32), converting only those."""
        return as_model_range(self.train_images[idx])

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.train_y, minlength=num_classes).tolist()


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


def _to_client(i: int, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> ClientData:
    """uint8 images ([N, H, W] or [N, H, W, C]) and labels -> a client's uint8 [N, C, H, W] images and int64 labels."""
    def images(x):
        x = np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))
        return torch.from_numpy(x if x.flags.writeable else x.copy())  # a view of a read-only array is copied
    return ClientData(i, images(train_x), torch.from_numpy(train_y.astype(np.int64)),
                      images(test_x), torch.from_numpy(test_y.astype(np.int64)))


def _subsample(idx: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.permutation(idx)[:cap]) if cap else idx


def _subsample_with_rest(idx: np.ndarray, cap: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``cap`` of ``idx`` drawn without replacement (all when cap = 0) and the rest; the same draw as `_subsample`,
    so runs from before the rest was kept train on the same images."""
    if not cap:
        return idx, idx[:0]
    order = rng.permutation(idx)
    return np.sort(order[:cap]), np.sort(order[cap:])


def _check_labels(y: np.ndarray, num_classes: int, where: str) -> None:
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"{where} has labels up to {int(y.max())}, but data.num_classes = {num_classes} "
                        f"(allowed: set data.num_classes to at least {int(y.max()) + 1})")


def _client_indices(cfg: DataConfig, train, test, num_classes: int, rng: np.random.Generator):
    """Train and test index lists per client under ``cfg.partition`` (the same rule for both splits)."""
    if cfg.partition == "attribute_groups":
        return [attribute_group_indices(s.attributes, s.attribute_names, cfg.attribute_groups) for s in (train, test)]
    for _ in range(100 if cfg.partition == "dirichlet" else 1):
        P = partition_matrix(cfg, num_classes, rng)
        train_parts = split_indices(train.labels, P, rng)
        if cfg.partition != "dirichlet" or min(len(p) for p in train_parts) >= cfg.min_client_size:
            break
    else:
        raise DataError(f"data.partition = 'dirichlet' with data.dirichlet_alpha = {cfg.dirichlet_alpha} left a "
                        f"client below data.min_client_size = {cfg.min_client_size} in 100 draws (allowed: a larger "
                        f"alpha or a smaller min_client_size)")
    return train_parts, split_indices(test.labels, P, rng)


def attribute_group_indices(attributes: np.ndarray | None, names: list[str] | None,
                            groups: list[list[str]]) -> list[np.ndarray]:
    """Client i: every image having ANY attribute of ``groups[i]``. Clients overlap where images have attributes of
    several groups, as in CollaFuse's CelebA setup (arXiv 2406.14429, Section 4)."""
    if attributes is None or names is None:
        raise DataError("data.partition = 'attribute_groups' needs a source with attributes (allowed: celeba)")
    col = {n: j for j, n in enumerate(names)}
    out = []
    for g in groups:
        unknown = [a for a in g if a not in col]
        if unknown:
            raise DataError(f"data.attribute_groups names {unknown}, which the dataset does not have "
                            f"(allowed: {', '.join(names)})")
        out.append(np.flatnonzero(attributes[:, [col[a] for a in g]].any(axis=1)))
    return out


def load_client_datasets(cfg: DataConfig, num_classes: int, seed: int) -> list[ClientData]:
    """Load the configured dataset and give each client its train split and held-out test split."""
    rng = np.random.default_rng(seed)
    if cfg.partition == "folders":
        return [load_client_source(root, i, cfg, num_classes) for i, root in enumerate(cfg.client_roots)]
    train, test = load_splits(cfg)
    _check_labels(train.labels, num_classes, f"data.dataset = '{cfg.dataset}'" + (
        f" at data.root = '{cfg.root}'" if cfg.dataset not in ("sklearn-digits", "lfw-subset", "emoji") else ""))
    train_parts, test_parts = _client_indices(cfg, train, test, num_classes, rng)
    clients = []
    exact = isinstance(cfg.max_train_per_client, list)  # a list gives sizes, a single number only caps
    for i, (tr, te) in enumerate(zip(train_parts, test_parts)):
        if exact and cfg.train_size(i) > len(tr):
            raise DataError(f"data.max_train_per_client = {cfg.max_train_per_client} is invalid (client {i} holds "
                            f"{len(tr)} training images; allowed: sizes up to what each client holds)")
        tr, rest = _subsample_with_rest(tr, cfg.train_size(i), rng)
        te = _subsample(te, cfg.max_test_per_client, rng)
        if len(tr) == 0:
            raise DataError(f"client {i} received no training images under data.partition = {cfg.partition!r} "
                            f"(allowed: a rule that gives every client images, e.g. fewer clients or other groups)")
        client = _to_client(i, train.images[tr], train.labels[tr], test.images[te], test.labels[te])
        if len(rest):
            val = _to_client(i, train.images[rest], train.labels[rest], test.images[:0], test.labels[:0])
            client.val_images, client.val_y = val.train_images, val.train_y
        clients.append(client)
    return clients


def load_splits(cfg: DataConfig, root: str | Path | None = None):
    """(train, test) ``common.ImageSet`` of the configured source at the configured size. Fashion-MNIST at its
    native size is read directly (the path every committed result used), everything else through sources."""
    root = cfg.root if root is None else root
    _, channels, size = DATASET_DEFAULTS[cfg.dataset]
    if cfg.dataset == "fashion-mnist" and cfg.image_size in (0, size) and cfg.channels in (0, channels):
        a = load_fashion_mnist(root)
        names = list(FASHION_MNIST_CLASSES)
        return (ImageSet(a["train_x"], a["train_y"].astype(np.int64), names),
                ImageSet(a["test_x"], a["test_y"].astype(np.int64), names))
    kind = "idx" if cfg.dataset == "fashion-mnist" else cfg.dataset
    splits = load_source(kind, root, cfg.image_size or size, cfg.channels or channels, test_fraction=cfg.test_fraction,
                         seed=0, max_bad_fraction=cfg.max_bad_fraction, limit=cfg.max_images)
    return splits.train, splits.test


def load_client_source(root: str | Path, index: int, cfg: DataConfig, num_classes: int) -> ClientData:
    """All the images of one client's own directory (``data.dataset`` layout: an image folder or IDX files)."""
    train, test = load_splits(cfg, root)
    _check_labels(train.labels, num_classes, f"client {index}'s folder '{root}'")
    if len(train.labels) == 0:
        raise DataError(f"client {index}'s folder '{root}' has no training images (partition 'folders')")
    return _to_client(index, train.images, train.labels, test.images, test.labels)


def export_client_folders(cfg: DataConfig, num_classes: int, seed: int, out_dir: Path) -> list[Path]:
    """Write each client's partition as its own Fashion-MNIST-layout folder ``out_dir/client<i>/`` (the four IDX
    files), so a deployed client node can be given only its own images (``data-dir`` in its node config, read back
    by ``load_client_source``)."""
    if cfg.dataset not in ("fashion-mnist", "idx") or (cfg.channels or 1) != 1:
        raise DataError(f"data.dataset = {cfg.dataset!r} cannot be exported as IDX folders (allowed: grayscale "
                        f"'fashion-mnist' or 'idx'; give RGB sites their own image folder with partition 'folders')")
    paths = []
    for c in load_client_datasets(cfg, num_classes, seed):
        d = Path(out_dir) / f"client{c.index}"
        d.mkdir(parents=True, exist_ok=True)
        for key, x in (("train_x", c.train_images), ("test_x", c.test_images)):
            write_idx(d / FASHION_MNIST_FILES[key], x[:, 0].numpy())  # loaded images are uint8 already
        for key, y in (("train_y", c.train_y), ("test_y", c.test_y)):
            write_idx(d / FASHION_MNIST_FILES[key], y.numpy().astype(np.uint8))
        paths.append(d)
    return paths
