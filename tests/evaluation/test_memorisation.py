"""Memorisation measures (collafuse.evaluation.memorisation) against hand-made cases: hand-computed distances,
exact copies, copies plus small noise, and fresh samples from a closed-form distribution."""

from __future__ import annotations

import math

import pytest
import torch

from collafuse.evaluation.memorisation import COPY_RATIO, memorisation, nearest_distances


def test_nearest_distances_match_hand_values():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    queries = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 0.0]])
    d = nearest_distances(queries, train, k=2)
    # (1,0): 1 to (0,0), sqrt(10) to (0,3); (5,0): 5 and 5; (0,0): 0 and 3.
    assert d.flatten().tolist() == pytest.approx([1.0, math.sqrt(10), 5.0, 5.0, 0.0, 3.0], abs=1e-6)


def test_copy_share_and_ratio_on_hand_points():
    train = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    heldout = torch.tensor([[0.0, 4.0], [10.0, 4.0]])
    # (1, 0): d1 = 1, d2 = sqrt(82): a copy (1/9.06 < 1/3); to the held-out pair: sqrt(17). (5, 0): d1 = d2 = 5.
    out = memorisation(torch.tensor([[1.0, 0.0], [5.0, 0.0]]), train, heldout)
    assert out["copy_share"] == 0.5 and out["copy_ratio_threshold"] == pytest.approx(1 / 3)
    # nn ratios: 1 / sqrt(17) and 5 / sqrt(41); the median of two values is their mean.
    assert out["nn_ratio_median"] == pytest.approx((1 / math.sqrt(17) + 5 / math.sqrt(41)) / 2, rel=1e-6)
    assert out["n_compared_each"] == 2 and out["n_train"] == 2


def _images(n, seed, d=(1, 28, 28)):
    return torch.randn((n, *d), generator=torch.Generator().manual_seed(seed)).clamp(-3, 3) / 3


def test_exact_copies_are_all_copies_and_sit_on_the_training_set():
    train, heldout = _images(200, 0), _images(200, 1)
    out = memorisation(train[:100].clone(), train, heldout)
    assert out["copy_share"] == 1.0
    assert out["nn_ratio_median"] < 1e-5  # distance 0 to the copied image, > 0 to any held-out image


def test_copies_plus_small_noise_still_count_as_copies():
    train, heldout = _images(200, 0), _images(200, 1)
    g = torch.Generator().manual_seed(2)
    # images are ~N(0, 1/9) per pixel: two of them lie ~sqrt(2 * 784 / 9) = 13.2 apart; this noise moves a copy
    # by ~0.05 * 28 = 1.4, well inside a third of that
    noisy = train[:100] + 0.05 * torch.randn(train[:100].shape, generator=g)
    out = memorisation(noisy, train, heldout)
    assert out["copy_share"] == 1.0
    assert out["nn_ratio_median"] < 0.2


def test_fresh_samples_of_the_same_distribution_are_no_copies_and_have_ratio_one():
    """Train, held-out and samples all i.i.d. from one Gaussian: in 784 dimensions every distance concentrates at
    sqrt(2 d) sigma, so d1 / d2 is near 1 (never below 1/3) and the nearest-neighbour ratio's median is 1."""
    train, heldout, fresh = _images(500, 0), _images(500, 1), _images(300, 2)
    out = memorisation(fresh, train, heldout)
    assert out["copy_share"] == 0.0
    assert out["nn_ratio_median"] == pytest.approx(1.0, abs=0.02)
    lo, hi = out["nn_ratio_quartiles"]
    assert lo < 1.0 < hi


def test_the_ratio_compares_equal_sizes():
    """With 50 training but 500 held-out images the nearest held-out image would be nearer for no reason; the
    ratio draws 50 of each, so fresh samples still score about 1."""
    out = memorisation(_images(300, 2), _images(50, 0), _images(500, 1))
    assert out["n_compared_each"] == 50
    assert out["nn_ratio_median"] == pytest.approx(1.0, abs=0.03)


def test_bad_input():
    with pytest.raises(ValueError, match="at least k = 2"):
        nearest_distances(torch.zeros(3, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="differ"):
        nearest_distances(torch.zeros(3, 4), torch.zeros(5, 5))
    with pytest.raises(ValueError, match="samples = 0"):
        memorisation(torch.zeros(0, 4), torch.zeros(5, 4), torch.zeros(5, 4))
    assert COPY_RATIO == pytest.approx(1 / 3)
