"""With identical weights on both sides, split sampling equals unsplit sampling to float tolerance.

The reference is written directly against diffusers (one scheduler, one loop over every timestep, one generator):
for t > cut it uses the server's converted prediction k_t * eps_S, for t <= cut the client's eps_c. The split run
goes through Server.sample_to_cut, a hand-off, and Client.finish on their own scheduler instances. The multistep
DPM-Solver++ is defined on the split as two runs of the solver (the client's starts afresh from x_cut, with no
history of the server's steps), so the reference starts a fresh scheduler at the hand-off as well.
"""

from __future__ import annotations

import pytest
import torch

from collafuse.split.client import Client
from collafuse.split.diffusion import DiffusionSchedule, split_timesteps
from collafuse.split.server import Server
from conftest import synthetic_clients, tiny_config

T = 20


SAMPLERS = {"ddpm": ("ddpm", 0.0), "ddim": ("ddim", 0.0), "ddim-eta1": ("ddim", 1.0), "ddim-eta0.5": ("ddim", 0.5),
            "dpmsolver": ("dpmsolver", 0.0)}


def _roles(cut: int, sampler: str):
    kind, eta = SAMPLERS[sampler]
    cfg = tiny_config(diffusion={"timesteps": T}, split={"cut": cut},
                      sample={"sampler": kind, "eta": eta, "ddim_steps": 6, "use_ema": False})
    server = Server(cfg)
    client = Client(0, synthetic_clients(cfg)[0], cfg)
    # Identical weights on both sides (same architecture and label embedding size in the tiny config).
    client.learner.model.load_state_dict(server.learner.model.state_dict())
    return cfg, server, client


def _reference(cfg, net, cut, y, seed):
    sch = DiffusionSchedule(cfg.diffusion)
    scheduler = sch.sampler(cfg.sample.sampler, cut, cfg.sample.ddim_steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(y), *cfg.image_shape), generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps.tolist():
            if cfg.sample.sampler == "dpmsolver" and t == cut - 1:  # the hand-off: the client's solver starts afresh
                scheduler = sch.sampler(cfg.sample.sampler, cut, cfg.sample.ddim_steps)
            eps = net(x, torch.full((len(y),), t), class_labels=y).sample
            if t >= cut:  # a server step: protocol t+1 > cut
                eps = float(sch.server_eps_scale(t + 1, cut)) * eps
            extra = {"eta": cfg.sample.eta} if cfg.sample.sampler == "ddim" else {}  # diffusers' own eta argument
            x = scheduler.step(eps, t, x, generator=g, **extra).prev_sample
    return x


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("cut", [0, 1, 7, 13, T])
def test_split_sampling_equals_unsplit(sampler, cut):
    cfg, server, client = _roles(cut, sampler)
    y = torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(11)
    x_cut = server.sample_to_cut(y, 0, g)
    split = client.finish(x_cut.clone(), y, g)
    ref = _reference(cfg, server.learner.model, cut, y, seed=11)
    torch.testing.assert_close(split, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver"])
def test_cut_zero_is_the_global_model_and_cut_T_the_client_model(sampler):
    """Cut 0: the server alone, k_t = 1 throughout, equals a single-model run; the client adds no step.
    Cut T: the server adds no step; the client alone equals a single-model run (x_T drawn by the client)."""
    y = torch.tensor([4, 5, 6])
    cfg, server, client = _roles(0, sampler)
    g = torch.Generator().manual_seed(3)
    x = server.sample_to_cut(y, 0, g)
    assert torch.equal(client.finish(x.clone(), y, g), x)  # no client step at cut 0
    sch = DiffusionSchedule(cfg.diffusion)
    assert all(float(sch.server_eps_scale(t, 0)) == pytest.approx(1.0) for t in range(1, T + 1))
    torch.testing.assert_close(x, _reference(cfg, server.learner.model, 0, y, 3), rtol=1e-5, atol=1e-5)

    cfg, server, client = _roles(T, sampler)
    out = client.sample(3, transport=None, generator=torch.Generator().manual_seed(3))  # no server involved
    labels = out["y"]
    torch.testing.assert_close(out["x0"], _reference(cfg, client.learner.model, T, labels, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cut", [0, 1, 2, 7, 13, 19, 20])
@pytest.mark.parametrize("steps", [1, 3, 6, 20])
def test_ddim_grid_lands_exactly_on_the_cut(cut, steps):
    sch = DiffusionSchedule(tiny_config().diffusion)
    scheduler = sch.sampler("ddim", cut, steps)
    ts = scheduler.timesteps.tolist()
    stride = T // scheduler.num_inference_steps
    assert stride <= T // steps
    assert all(a - b == stride for a, b in zip(ts, ts[1:]))  # DDIMScheduler steps t -> t - T // steps
    assert ts[-1] - stride < 0 and ts[0] + stride > T - 1  # starts at the top, ends at x0
    server_ts, client_ts = split_timesteps(scheduler.timesteps, cut)
    if cut < T:
        assert server_ts and server_ts[-1] - stride == cut - 1  # the server's last step lands on x_cut
    if cut >= 1:
        assert client_ts[0] == cut - 1  # the client starts from x_cut
    assert server_ts + client_ts == ts
