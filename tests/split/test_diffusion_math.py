"""The split's math on data whose distribution is known (x0 ~ N(mu, sigma^2) per pixel).

- the upload has exactly the q(x_s | x0) marginal;
- the relative noising gives x_t the marginal q(x_t | x0);
- the server's relative target and the standard target have conditional means related by k_t;
- split sampling with analytic denoisers, through the real Server and Client code, reproduces the data
  distribution as well as one model doing every step.
"""

from __future__ import annotations

import pytest
import torch

from collafuse.config import DiffusionConfig
from collafuse.split.client import Client
from collafuse.split.diffusion import DiffusionSchedule
from collafuse.split.server import Server
from conftest import synthetic_clients, tiny_config

MU, SIGMA = 0.3, 0.4
N = 200_000


def _gaussian(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("cut", [0, 1, 25, 80])
def test_upload_has_q_marginal(schedule, cut):
    sch = DiffusionSchedule(DiffusionConfig(timesteps=100, schedule=schedule))
    ab = float(sch.alpha_bar[cut])
    x0 = torch.full((N,), 0.7, dtype=torch.float64)  # a fixed image: u | x0 ~ N(sqrt(ab) x0, 1 - ab)
    u = sch.noise(x0, _gaussian(N, 1), cut)
    assert abs(u.mean().item() - ab ** 0.5 * 0.7) < 4 * (1 - ab) ** 0.5 / N ** 0.5 + 1e-9
    assert u.var().item() == pytest.approx(1 - ab, rel=0.02, abs=1e-9)
    if cut == 0:
        assert torch.equal(u, x0)  # the GM baseline uploads x0 itself


@pytest.mark.parametrize("cut,t", [(0, 10), (10, 11), (10, 40), (50, 99)])
def test_relative_noising_composes_to_q_marginal(cut, t):
    sch = DiffusionSchedule(DiffusionConfig(timesteps=100))
    x0 = torch.full((N,), -0.4, dtype=torch.float64)
    u = sch.noise(x0, _gaussian(N, 2), cut)
    x_t = sch.server_noise(u, _gaussian(N, 3), torch.full((N,), t), cut)
    ab_t = float(sch.alpha_bar[t])
    assert x_t.mean().item() == pytest.approx(ab_t ** 0.5 * -0.4, abs=4 * (1 / N) ** 0.5)
    assert x_t.var().item() == pytest.approx(1 - ab_t, rel=0.02)


@pytest.mark.parametrize("cut,t", [(0, 30), (10, 11), (10, 50), (60, 95)])
def test_relative_target_conditional_mean_matches_standard(cut, t):
    """E[eps | x_t] = k_t E[eps' | x_t]. For Gaussian data both are linear in x_t, so least squares recovers them."""
    sch = DiffusionSchedule(DiffusionConfig(timesteps=100))
    x0 = MU + SIGMA * _gaussian(N, 4)
    u = sch.noise(x0, _gaussian(N, 5), cut)
    eps_rel = _gaussian(N, 6)
    x_t = sch.server_noise(u, eps_rel, torch.full((N,), t), cut)
    ab_t = float(sch.alpha_bar[t])
    eps_std = (x_t - ab_t ** 0.5 * x0) / (1 - ab_t) ** 0.5  # the standard target for this x_t

    design = torch.stack([x_t, torch.ones_like(x_t)], 1)
    coef_std = torch.linalg.lstsq(design, eps_std[:, None]).solution.flatten()
    coef_rel = torch.linalg.lstsq(design, eps_rel[:, None]).solution.flatten()
    k = float(sch.server_eps_scale(t, cut))
    # Analytic: E[eps | x_t] = sqrt(1-ab)(x_t - sqrt(ab) mu) / (ab sigma^2 + 1 - ab).
    slope = (1 - ab_t) ** 0.5 / (ab_t * SIGMA ** 2 + 1 - ab_t)
    assert coef_std[0].item() == pytest.approx(slope, rel=0.02)
    assert (k * coef_rel[0]).item() == pytest.approx(slope, rel=0.03)
    assert (k * coef_rel[1]).item() == pytest.approx(coef_std[1].item(), abs=0.01)


def test_eps_scale_is_one_for_the_global_model():
    sch = DiffusionSchedule(DiffusionConfig(timesteps=50))
    for t in range(1, 51):
        assert float(sch.server_eps_scale(t, 0)) == pytest.approx(1.0, abs=1e-6)


class AnalyticEps(torch.nn.Module):
    """The exact epsilon-predictor for x0 ~ N(mu, sigma^2) per pixel; ``relative_to`` gives the server's target
    E[eps' | x_t] = E[eps | x_t] / k_t instead."""

    def __init__(self, schedule: DiffusionSchedule, relative_to: int | None = None):
        super().__init__()
        self.sch, self.cut = schedule, relative_to
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, class_labels=None):
        t_proto = int(t[0]) + 1
        ab = self.sch.alpha_bar[t_proto]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * SIGMA ** 2 + 1 - ab)
        if self.cut is not None:
            eps = eps / self.sch.server_eps_scale(t_proto, self.cut)
        return type("Out", (), {"sample": eps})()


def _analytic_split_sample(sampler: str, cut: int, T: int = 1000, n: int = 64, eta: float = 0.0) -> torch.Tensor:
    cfg = tiny_config(diffusion={"timesteps": T, "clip_sample": False}, split={"cut": cut},
                      sample={"sampler": sampler, "ddim_steps": 100, "eta": eta, "use_ema": False, "batch_size": 256})
    server = Server(cfg)
    client = Client(0, synthetic_clients(cfg)[0], cfg)
    server.learner.model = AnalyticEps(server.schedule, relative_to=cut)
    client.learner.model = AnalyticEps(client.schedule)
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(n, dtype=torch.long)
    return client.finish(server.sample_to_cut(y, 0, g), y, g)  # n x 784 pixel draws


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmsolver", 0.0)])
def test_split_sampling_with_analytic_denoisers_recovers_the_data(sampler, eta):
    """Through the real Server.sample_to_cut (k_t conversion) and Client.finish: the split draws from the data
    distribution as well as one model doing every step (cut 0, k_t = 1)."""
    single = _analytic_split_sample(sampler, cut=0, eta=eta)
    for cut in (200, 1000):
        split = _analytic_split_sample(sampler, cut, eta=eta)
        assert split.mean().item() == pytest.approx(single.mean().item(), abs=0.005)
        assert split.std().item() == pytest.approx(single.std().item(), abs=0.005)
    assert single.mean().item() == pytest.approx(MU, abs=0.01)
    # Stochastic DDIM with a stride of 10 plugs in E[x0 | x_t] at every step, which loses some of the data's
    # variance (0.385 for 0.4 here); DDPM (stride 1) and the deterministic ODE keep it to within 0.01.
    assert single.std().item() == pytest.approx(SIGMA, abs=0.01 if eta == 0 else 0.03)
