"""Partition rules over real loaders: coverage, sizes, Dirichlet reproducibility and minimum size, attribute-group
overlap, per-client folders, and the errors for empty clients; plus an end-to-end tiny run on image folders with
two clients, each reading its own directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.config import ConfigError, DataConfig, config_from_dict
from collafuse.data.common import DataError
from collafuse.data.partition import attribute_group_indices, load_client_datasets
from conftest import TINY, merge


def _data(idx_dataset, **kw) -> DataConfig:
    return config_from_dict({"data": {"root": str(idx_dataset), **kw}}).data


def test_class_groups_are_disjoint_and_cover_every_image(idx_dataset):
    clients = load_client_datasets(_data(idx_dataset, num_clients=3), 10, seed=0)
    assert sum(len(c.train_y) for c in clients) == 120 and sum(len(c.test_y) for c in clients) == 40
    classes = [set(c.train_y.tolist()) for c in clients]
    assert all(a.isdisjoint(b) for i, a in enumerate(classes) for b in classes[i + 1:])
    assert set().union(*classes) == set(range(10))
    for c in clients:  # the held-out split follows the client's own class mix
        assert set(c.test_y.tolist()) == set(c.train_y.tolist())


def test_iid_sizes_are_balanced(idx_dataset):
    clients = load_client_datasets(_data(idx_dataset, num_clients=4, partition="iid"), 10, seed=0)
    sizes = [len(c.train_y) for c in clients]
    assert sum(sizes) == 120 and max(sizes) - min(sizes) <= 10  # per class rounding only


def test_dirichlet_is_reproducible_and_respects_the_minimum_size(idx_dataset):
    cfg = _data(idx_dataset, num_clients=4, partition="dirichlet", dirichlet_alpha=0.3, min_client_size=20)
    a, b = load_client_datasets(cfg, 10, seed=5), load_client_datasets(cfg, 10, seed=5)
    assert all(torch.equal(x.train_x, y.train_x) for x, y in zip(a, b, strict=True))
    assert all(len(c.train_y) >= 20 for c in a) and sum(len(c.train_y) for c in a) == 120
    c = load_client_datasets(cfg, 10, seed=6)
    assert any(len(x.train_y) != len(y.train_y) for x, y in zip(a, c, strict=True))  # the seed matters


def test_dirichlet_minimum_that_cannot_be_met_is_a_one_line_error(idx_dataset):
    cfg = _data(idx_dataset, num_clients=4, partition="dirichlet", dirichlet_alpha=0.05, min_client_size=31)
    with pytest.raises(DataError, match="min_client_size = 31") as e:
        load_client_datasets(cfg, 10, seed=0)
    assert "\n" not in str(e.value)


def test_an_empty_client_names_the_client_and_the_rule(tmp_path):
    from conftest import write_idx

    rng = np.random.default_rng(0)
    for split, labels in (("train", np.repeat(np.arange(5), 4)), ("t10k", np.arange(5))):  # classes 5-9 absent
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError, match="client 1 received no training images under data.partition = 'class_groups'"):
        load_client_datasets(_data(tmp_path, num_clients=2), 10, seed=0)


def test_attribute_groups_overlap_as_in_the_paper():
    names = ["Black_Hair", "Blond_Hair", "Eyeglasses", "Wavy_Hair"]
    attrs = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=bool)
    parts = attribute_group_indices(attrs, names, [["Black_Hair", "Blond_Hair"], ["Eyeglasses"], ["Wavy_Hair"]])
    assert [p.tolist() for p in parts] == [[0, 1, 4], [0, 2], [2, 4]]
    assert set(parts[0]) & set(parts[1]) == {0}  # image 0 has black hair and glasses: both clients hold it
    with pytest.raises(DataError, match="Bald"):
        attribute_group_indices(attrs, names, [["Bald"]])


def _image_folder(root, classes, n, size, rng):
    for k in classes:
        (root / k).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size + 4 * i, 3), dtype=np.uint8)).save(root / k / f"{i}.png")


def test_each_client_reads_only_its_own_folder_and_a_tiny_run_goes_end_to_end(tmp_path):
    pytest.importorskip("collafuse.data.sources")
    from collafuse.split.runner import Federation

    rng = np.random.default_rng(0)
    sites = [tmp_path / "hospital_a", tmp_path / "hospital_b"]
    _image_folder(sites[0], ["benign", "malignant"], 6, 20, rng)  # mixed sizes: 20x20, 20x24, ...
    _image_folder(sites[1], ["benign", "malignant"], 5, 36, rng)
    cfg = config_from_dict(merge(TINY, {
        "data": {"dataset": "image-folder", "partition": "folders", "client_roots": [str(s) for s in sites],
                 "num_clients": 2, "num_classes": 2, "image_size": 16, "channels": 3, "test_fraction": 0.25},
        "server_model": {"block_out_channels": [8, 16]}, "client_model": {"block_out_channels": [8, 16]},
    }))
    assert cfg.image_shape == (3, 16, 16)
    fed = Federation(cfg)
    sizes = [len(c.data.train_y) + len(c.data.test_y) for c in fed.clients]
    assert sizes == [12, 10]  # every image of its own folder, nothing of the other
    assert fed.clients[0].data.train_x.shape[1:] == (3, 16, 16)
    fed.train(progress=False)
    out = fed.sample(1, 3)
    assert out["x0"].shape == (3, 3, 16, 16) and torch.isfinite(out["x0"]).all()


def test_folders_partition_needs_one_root_per_client():
    with pytest.raises(ConfigError, match="data.client_roots"):
        config_from_dict({"data": {"dataset": "image-folder", "partition": "folders", "num_clients": 2,
                                   "client_roots": ["/a"]}})


@pytest.mark.parametrize("section,match", [
    ({"channels": 2}, "data.channels = 2"),
    ({"image_size": 4}, "data.image_size = 4"),
    ({"partition": "attribute_groups"}, "only with data.dataset = 'celeba'"),
    ({"dataset": "svhn"}, "data.dataset"),
])
def test_bad_data_settings_are_one_line_errors(section, match):
    with pytest.raises(ConfigError, match=match) as e:
        config_from_dict({"data": section})
    assert "\n" not in str(e.value)


def test_model_depth_must_suit_the_image_size():
    with pytest.raises(ConfigError, match="at most 3 levels for 28x28"):
        config_from_dict({"server_model": {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}})
    cfg = config_from_dict({"data": {"dataset": "cifar10"},
                            "server_model": {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}})
    assert cfg.image_shape == (3, 32, 32)  # 32 -> 16 -> 8 -> 4: four levels fit


@pytest.mark.parametrize("path,shape", [("configs/cifar10.toml", (3, 32, 32)), ("configs/celeba64.toml", (3, 64, 64)),
                                        ("configs/digits.toml", (1, 16, 16)), ("configs/emoji.toml", (3, 32, 32))])
def test_shipped_configs_build_models_that_fit_their_images(path, shape):
    """The RGB paper-like configs (not runnable here: no data, no GPU) at least build and run their UNets."""
    from pathlib import Path

    from collafuse.config import load_config
    from collafuse.split.models import node_labels, node_model

    cfg = load_config(Path(__file__).resolve().parents[2] / path, ["run.device=\"cpu\""])
    assert cfg.image_shape == shape
    labels = node_labels(cfg, "server")
    model = node_model(cfg.server_model, labels, 0, "server", cfg.image_shape)
    ids = labels.encode(torch.zeros(1, dtype=torch.long), 0)
    with torch.no_grad():
        out = model(torch.zeros(1, *shape), torch.tensor([10]), class_labels=ids).sample
    assert out.shape == (1, *shape)


def test_per_client_sizes_are_exact_and_leave_the_rest_for_validation(idx_dataset):
    """A list of sizes gives each client exactly that many training images (12 per class in the tiny set: client 0
    holds classes 0-4, 60 images); the rest of its images become its validation set, its test split is whole."""
    cfg = DataConfig(root=str(idx_dataset), num_clients=2, max_train_per_client=[7, 60])
    a, b = load_client_datasets(cfg, 10, seed=0)
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (7, 53, 20)
    assert (len(b.train_y), b.val_x, len(b.test_y)) == (60, None, 20)
    # disjoint, and together every training image of client 0's classes
    rows = {tuple(x.flatten().tolist()) for x in torch.cat([a.train_x, a.val_x])}
    assert len(rows) == 60
    again = load_client_datasets(cfg, 10, seed=0)[0]
    assert torch.equal(again.train_x, a.train_x)  # drawn once by the data seed: every configuration shares it
    assert not torch.equal(load_client_datasets(cfg, 10, seed=1)[0].train_x, a.train_x)
    # the single-number cap draws the same images as before the list form existed
    capped = load_client_datasets(DataConfig(root=str(idx_dataset), num_clients=2, max_train_per_client=7), 10, 0)
    assert torch.equal(capped[0].train_x, a.train_x)


@pytest.mark.parametrize("sizes, needle", [
    ([5], "a list of 2 integers >= 1, one per client (data.num_clients = 2)"),
    ([5, 0], "a list of 2 integers >= 1"),
    ([5, 6, 7], "a list of 2 integers >= 1"),
    (-1, "an integer >= 0 (0 = all)"),
])
def test_bad_sizes_are_one_line_errors(sizes, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"num_clients": 2, "max_train_per_client": sizes}})
    assert f"data.max_train_per_client = {sizes!r} is invalid" in str(e.value) and needle in str(e.value)


def test_a_size_above_what_the_client_holds_names_what_it_holds(idx_dataset):
    with pytest.raises(DataError, match=r"client 1 holds 60 training images"):
        load_client_datasets(DataConfig(root=str(idx_dataset), num_clients=2, max_train_per_client=[5, 61]), 10, 0)
