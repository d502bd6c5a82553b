"""Clients keep their images as uint8 and convert one batch at a time (issue 30): the same float values as the
load-time conversion every earlier run made, a quarter of the memory, and bit-identical training."""

from __future__ import annotations

import numpy as np
import torch

from collafuse.config import DataConfig
from collafuse.data.images import as_model_range
from collafuse.data.partition import ClientData, load_client_datasets
from collafuse.split.client import Client
from conftest import fixed_secrets, tiny_config


def test_the_conversion_gives_the_earlier_float32_values_for_every_byte():
    """Reference: the load-time conversion before issue 30 (numpy, float32) and hand-written end points."""
    v = np.arange(256, dtype=np.uint8)
    earlier = v.astype(np.float32) / 127.5 - 1.0
    got = as_model_range(torch.from_numpy(v))
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(earlier))
    assert got[0].item() == -1.0 and got[255].item() == 1.0 and abs(got[127].item() + 1 / 255) < 1e-7
    floats = torch.rand(4) * 2 - 1
    assert as_model_range(floats) is floats  # float images are taken as already in range


def test_loaded_clients_hold_uint8_and_give_floats_on_request(idx_dataset):
    cfg = DataConfig(root=str(idx_dataset), num_clients=2, max_train_per_client=[7, 60])
    a, b = load_client_datasets(cfg, 10, seed=0)
    for images in (a.train_images, a.test_images, a.val_images, b.train_images, b.test_images):
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    assert b.val_images is None and b.val_x is None
    x = a.train_x
    assert x.dtype == torch.float32 and x.nbytes == 4 * a.train_images.nbytes
    assert x.min() >= -1 and x.max() <= 1
    idx = torch.tensor([5, 0, 5])
    assert torch.equal(a.batch(idx), x[idx])


def test_a_client_trains_the_same_on_uint8_images_as_on_their_float_copy():
    """The same images stored as uint8 or as float32 (the earlier storage): the same upload, losses and weights."""
    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (24, *cfg.image_shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, cfg.num_classes, (24,), generator=g)
    as_float = torch.from_numpy(u8.numpy().astype(np.float32) / 127.5 - 1.0)  # the earlier load-time copy
    stored = Client(0, ClientData(0, u8, y, u8[:4], y[:4]), cfg, secret=fixed_secrets(1)[0])
    floats = Client(0, ClientData(0, as_float, y, as_float[:4], y[:4]), cfg, secret=fixed_secrets(1)[0])
    assert torch.equal(stored.upload()[0], floats.upload()[0])
    assert [stored.train_step() for _ in range(3)] == [floats.train_step() for _ in range(3)]
    for p, q in zip(stored.learner.model.parameters(), floats.learner.model.parameters()):
        assert torch.equal(p, q)
