"""Data: the IDX reader, partition properties, per-client held-out splits, and clear errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from collafuse.config import DataConfig
from collafuse.data.common import DataError
from collafuse.data.idx import load_fashion_mnist, read_idx
from collafuse.data.partition import load_client_datasets, partition_matrix, split_indices
from conftest import write_idx

REAL = Path("/usr/share/datasets/fashion-mnist")


def test_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    with gzip.open(tmp_path / "trunc.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "trunc.gz")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "junk")


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("partition", ["class_groups", "iid", "dirichlet"])
@pytest.mark.parametrize("n_clients", [1, 3, 5])
def test_partitions_are_disjoint_and_cover(partition, n_clients):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    P = partition_matrix(DataConfig(num_clients=n_clients, partition=partition), 10, np.random.default_rng(1))
    assert P.shape == (n_clients, 10) and np.allclose(P.sum(0), 1)
    parts = split_indices(labels, P, np.random.default_rng(2))
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined)) == len(labels)  # disjoint and complete
    if partition == "class_groups":
        classes = [set(labels[p]) for p in parts]
        assert all(a.isdisjoint(b) for i, a in enumerate(classes) for b in classes[i + 1:])
    if partition == "iid":
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 10


def test_dirichlet_is_reproducible_and_skewed():
    cfg = DataConfig(num_clients=4, partition="dirichlet", dirichlet_alpha=0.1)
    a = partition_matrix(cfg, 10, np.random.default_rng(5))
    b = partition_matrix(cfg, 10, np.random.default_rng(5))
    c = partition_matrix(cfg, 10, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max(axis=0).mean() > 0.6  # alpha = 0.1: most of each class sits with one client


def test_clients_get_train_and_test_with_their_own_classes(idx_dataset):
    cfg = DataConfig(root=str(idx_dataset), num_clients=3, class_groups=[[0, 1], [2, 3, 4], [9]])
    clients = load_client_datasets(cfg, 10, seed=0)
    for c, group in zip(clients, cfg.class_groups):
        assert set(c.train_y.tolist()) == set(group) == set(c.test_y.tolist())
        assert c.train_x.shape[1:] == (1, 28, 28) and -1 <= c.train_x.min() and c.train_x.max() <= 1
    assert [len(c.train_y) for c in clients] == [24, 36, 12]
    capped = load_client_datasets(DataConfig(root=str(idx_dataset), num_clients=2, max_train_per_client=5), 10, 0)
    assert [len(c.train_y) for c in capped] == [5, 5]


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_default_partition():
    clients = load_client_datasets(DataConfig(), 10, seed=0)
    assert [len(c.train_y) for c in clients] == [24000, 18000, 18000]
    assert [len(c.test_y) for c in clients] == [4000, 3000, 3000]
    assert sorted(set(clients[1].train_y.tolist())) == [4, 5, 6]
