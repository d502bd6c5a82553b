"""The split's numbers against references that do not come from the code under test: the cosine schedule from its
formula (Nichol & Dhariwal 2021, Eq. 17, with the 0.999 beta cap of diffusers' squaredcos_cap_v2), k_t from the
closed-form Gaussian posterior, and sampler grids written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from collafuse.config import DiffusionConfig
from collafuse.split.diffusion import DiffusionSchedule, split_timesteps


def cosine_alpha_bar(T: int, s: float = 0.008) -> np.ndarray:
    """abar_0..abar_T in protocol indexing: beta_t = min(1 - f(t/T) / f((t-1)/T), 0.999),
    f(u) = cos^2((u + s) / (1 + s) pi / 2)."""
    f = [math.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2 for i in range(T + 1)]
    betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)]
    return np.concatenate([[1.0], np.cumprod([1 - b for b in betas])])


@pytest.mark.parametrize("T", [20, 1000])
def test_cosine_schedule_matches_its_formula(T):
    ab = DiffusionSchedule(DiffusionConfig(timesteps=T)).alpha_bar.double().numpy()
    np.testing.assert_allclose(ab, cosine_alpha_bar(T), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("T,cut", [(20, 6), (1000, 200), (1000, 500)])
def test_k_t_is_the_ratio_of_the_two_gaussian_posterior_means(T, cut):
    """x0 ~ N(mu, v), u = sqrt(abar_s) x0 + sqrt(1-abar_s) eps_u, x_t = sqrt(r) u + sqrt(1-r) eps' with
    r = abar_t / abar_s. Write x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps. Both noises are jointly Gaussian with x_t:
    E[eps | x_t] = Cov(eps, x_t) / Var(x_t) (x_t - m) with Cov = sqrt(1-abar_t), and E[eps' | x_t] likewise with
    Cov = sqrt(1-r). Their ratio, for any x_t, mu and v, is the k_t the server multiplies by."""
    ab = cosine_alpha_bar(T)
    sched = DiffusionSchedule(DiffusionConfig(timesteps=T))
    mu, v, x_t = 0.3, 0.2, 0.7
    for t in (cut + 1, cut + 2, cut + 10, T):
        r = ab[t] / ab[cut]
        var_xt = ab[t] * v + 1 - ab[t]
        e_abs = math.sqrt(1 - ab[t]) * (x_t - math.sqrt(ab[t]) * mu) / var_xt
        e_rel = math.sqrt(1 - r) * (x_t - math.sqrt(ab[t]) * mu) / var_xt
        assert float(sched.server_eps_scale(t, cut)) == pytest.approx(e_abs / e_rel, rel=2e-5)
    # at the cut's next step k_t is large (the relative target is almost pure noise), far from the cut it is ~1
    assert float(sched.server_eps_scale(cut + 1, cut)) > 1.5 and float(sched.server_eps_scale(T, cut)) < 1.01


# (T, cut, ddim_steps) -> the diffusers timesteps of the whole chain, written out by hand, and where it splits.
GRIDS = [
    # stride 20 // 5 = 4, anchored so that the server's last step (index 9) steps to index 5 = protocol step 6
    ((20, 6, 5), [17, 13, 9, 5, 1], [17, 13, 9], [5, 1]),
    ((20, 0, 5), [19, 15, 11, 7, 3], [19, 15, 11, 7, 3], []),  # global model: every step is the server's
    ((20, 20, 5), [19, 15, 11, 7, 3], [], [19, 15, 11, 7, 3]),  # independent clients: every step is the client's
    ((20, 1, 4), [15, 10, 5, 0], [15, 10, 5], [0]),  # cut 1: the client owns one step, index 0
]
# The server's segment (2 steps) is shorter than the stride 4. DDIM: 7 steps of stride 2 give it one. DPM-Solver:
# the stride stays and index 19 goes in front, so the client keeps the 5 steps of the cut-20 grid's spacing.
SHORT_SERVER_SEGMENT = {
    "ddim": ((20, 18, 5), [19, 17, 15, 13, 11, 9, 7, 5, 3, 1], [19], [17, 15, 13, 11, 9, 7, 5, 3, 1]),
    "dpmsolver": ((20, 18, 5), [19, 17, 13, 9, 5, 1], [19], [17, 13, 9, 5, 1]),
}


@pytest.mark.parametrize("kind", ["ddim", "dpmsolver"])
@pytest.mark.parametrize("case", [*GRIDS, "short server segment"])
def test_ddim_grid_and_split_by_hand(kind, case):
    key, grid, server, client = SHORT_SERVER_SEGMENT[kind] if case == "short server segment" else case
    T, cut, n = key
    sched = DiffusionSchedule(DiffusionConfig(timesteps=T)).sampler(kind, cut, n)
    assert [int(t) for t in sched.timesteps] == grid
    assert split_timesteps(sched.timesteps, cut) == (server, client)


def test_dpmsolver_at_cut_990_gives_the_client_icm_step_count():
    """The quality schedule (T 1000, 25 steps, stride 40) at cut 990: the server steps once, 999 -> 989 = x_cut,
    and the client runs 25 steps as the independent client model does (not the 99 of a shrunk stride)."""
    sch = DiffusionSchedule(DiffusionConfig(timesteps=1000))
    server, client = split_timesteps(sch.sampler("dpmsolver", 990, 25).timesteps, 990)
    assert server == [999] and client == list(range(989, -1, -40))
    assert len(client) == len(split_timesteps(sch.sampler("dpmsolver", 1000, 25).timesteps, 1000)[1]) == 25


def test_dpmsolver_steps_from_each_grid_point_to_the_next_and_ends_at_x0():
    """DPM-Solver's noise levels: sigma = sqrt((1 - abar) / abar) at each listed index (diffusers numbering), then 0,
    so the step from index 9 (T 20, cut 6) lands on index 5, protocol step 6 = x_cut, and the last one on x0."""
    cfg = DiffusionConfig(timesteps=20)
    sched = DiffusionSchedule(cfg).sampler("dpmsolver", 6, 5)
    ab = cosine_alpha_bar(20)  # protocol t: diffusers index i has abar_{i+1}
    expected = [math.sqrt((1 - ab[t + 1]) / ab[t + 1]) for t in (17, 13, 9, 5, 1)] + [0.0]
    assert sched.sigmas.tolist() == pytest.approx(expected, rel=2e-3)


def test_ddpm_grid_is_every_step_and_splits_at_the_cut():
    sched = DiffusionSchedule(DiffusionConfig(timesteps=20)).sampler("ddpm", 6)
    assert [int(t) for t in sched.timesteps] == list(range(19, -1, -1))
    assert split_timesteps(sched.timesteps, 6) == (list(range(19, 5, -1)), [5, 4, 3, 2, 1, 0])
