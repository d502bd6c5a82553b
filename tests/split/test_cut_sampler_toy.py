"""The sampler near the cut against a closed form (issue 29, item 5): a 2-D Gaussian mixture whose E[eps | x_t] is
exact, so the split's hand-off with the project's default sampler can be scored against q(x_cut) itself.

References: autograd of the mixture's log-density written out here, the sliced W1 of a shifted cloud (|c| 2 / pi in
2-D), hand-written grids, and q(x_cut) sampled exactly. The trained-model comparison is
benchmarks/cut_sampler_toy.py (results/cut-sampler/)."""

from __future__ import annotations

import math

import pytest
import torch

from collafuse.config import ConfigError, DiffusionConfig
from collafuse.evaluation.toy import GaussianMixture, sliced_w1
from collafuse.split.diffusion import DiffusionSchedule, denoise, to_step
from conftest import tiny_config

T, CUT = 100, 30


def _log_q(x: torch.Tensor, mix: GaussianMixture, abar: float) -> torch.Tensor:
    """log q(x_t) of the mixture, written out: log sum_k pi_k N(x; sqrt(abar) mu_k, var I)."""
    var = abar * mix.std ** 2 + 1 - abar
    d = x[:, None, :] - math.sqrt(abar) * mix.means[None]
    logn = -d.pow(2).sum(-1) / (2 * var) - x.shape[1] / 2 * math.log(2 * math.pi * var)
    return torch.logsumexp(logn + mix.pi.log()[None], dim=1)


@pytest.mark.parametrize("abar", [0.99, 0.79, 0.3, 0.01])
def test_exact_eps_is_minus_sqrt_one_minus_abar_times_the_score(abar):
    mix = GaussianMixture.ring(8, radius=2.0, std=0.1)
    x = torch.randn((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(_log_q(x, mix, abar).sum(), x)
    torch.testing.assert_close(mix.eps(x.detach(), abar), -math.sqrt(1 - abar) * score, rtol=1e-9, atol=1e-9)


def test_sliced_w1_of_a_shifted_cloud():
    """Shifting a cloud by c moves every 1-D projection by c . d, so sliced W1 = E|c . d| = |c| 2 / pi in 2-D."""
    a = torch.randn((4000, 2), generator=torch.Generator().manual_seed(1))
    c = torch.tensor([0.3, -0.4])
    assert sliced_w1(a, a + c, directions=4000) == pytest.approx(0.5 * 2 / math.pi, rel=0.03)
    assert sliced_w1(a, a) == 0.0
    with pytest.raises(ValueError, match="allowed: equal shapes"):
        sliced_w1(a, a[:10])


def test_a_denser_server_grid_written_out():
    """``sample.server_grid_factor`` 2.5 at 20 steps: the server's segment on the grid of a 50-step chain, anchored
    on the cut (stride 100 // 50 = 2 from index 29: 99, 97, ..., 31), the client's on the 20-step one (stride 5: 29,
    24, ..., 4)."""
    sched = DiffusionSchedule(DiffusionConfig(timesteps=T))
    dense = sched.split_sampler("dpmsolver", CUT, 20, server_grid_steps=50)
    assert dense.server_steps == list(range(99, 30, -2)) and dense.client_steps == [29, 24, 19, 14, 9, 4]
    assert list(dense.scheduler.timesteps) == dense.server_steps + dense.client_steps
    plain = sched.split_sampler("dpmsolver", CUT, 20)
    assert plain.server_steps == list(range(99, 30, -5)) and plain.client_steps == dense.client_steps
    assert sched.split_sampler("dpmsolver", CUT, 20, server_grid_steps=20).server_steps == plain.server_steps


def test_server_grid_factor_is_dpmsolver_only_and_bounded():
    assert tiny_config(sample={"server_grid_factor": 1.5}).sample.server_grid_steps == 8  # round(1.5 x 5)
    assert tiny_config().sample.server_grid_steps == 0  # factor 1: the client's grid
    with pytest.raises(ConfigError, match=r"sample.server_grid_factor = 1.5 is invalid \(allowed: 1 unless sample"):
        tiny_config(sample={"sampler": "ddim", "server_grid_factor": 1.5})
    with pytest.raises(ConfigError, match=r"sample.server_grid_factor = 5.0 is invalid \(allowed: at most 4 with "
                                          r"sample.ddim_steps = 5"):
        tiny_config(sample={"server_grid_factor": 5.0})
    with pytest.raises(ConfigError, match=r"sample.server_grid_factor = 0.5 is invalid \(allowed: a number in "
                                          r"\[1, 10\]"):
        tiny_config(sample={"server_grid_factor": 0.5})


@pytest.mark.parametrize("sampler,steps,dense", [("dpmsolver", 20, 0), ("dpmsolver", 20, 50), ("ddpm", T, 0)])
def test_the_hand_off_with_the_exact_eps_is_q_of_x_cut(sampler, steps, dense):
    """T = 100, cut 30, the cosine schedule: the server's part of the project's sampler (also on a denser server
    grid), driven by the exact
    E[eps | x_t], lands on q(x_cut) within 0.01 (sliced W1) of the distance between two exact samples of it."""
    sched = DiffusionSchedule(DiffusionConfig(timesteps=T, clip_sample=False))
    mix = GaussianMixture.ring(8, radius=2.0, std=0.1)
    n = 8000
    split = sched.split_sampler(sampler, CUT, steps, dense)

    def eps_fn(x, t_index):
        return mix.eps(x.reshape(n, 2), float(sched.alpha_bar[to_step(int(t_index))])).reshape(x.shape)

    g = torch.Generator().manual_seed(3)
    x_cut = denoise(eps_fn, torch.randn((n, 2, 1, 1), generator=g), split.server_steps, split.scheduler, g)
    abar = float(sched.alpha_bar[CUT])
    ref = mix.sample_noised(n, abar, torch.Generator().manual_seed(4))
    floor = sliced_w1(mix.sample_noised(n, abar, torch.Generator().manual_seed(5)), ref)
    assert sliced_w1(x_cut.reshape(n, 2), ref) < floor + 0.01
    # and a wrong eps (the relative one, without the k_t scale) is far off: the test can tell
    scale = {i: float(sched.server_eps_scale(to_step(i), CUT)) for i in split.server_steps}
    g = torch.Generator().manual_seed(3)
    split = sched.split_sampler(sampler, CUT, steps, dense)
    bad = denoise(lambda x, i: eps_fn(x, i) / scale[int(i)], torch.randn((n, 2, 1, 1), generator=g),
                  split.server_steps, split.scheduler, g)
    assert sliced_w1(bad.reshape(n, 2), ref) > floor + 0.05
