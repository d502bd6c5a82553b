"""Training-recipe knobs (issue 10): loss weights that depend on the absolute t only, against their formulas;
learning-rate warm-up and cosine decay against hand-computed values; exact resume with both."""

from __future__ import annotations

import math

import pytest
import torch
from test_reference_values import cosine_alpha_bar

from collafuse.config import ConfigError, DiffusionConfig
from collafuse.split.diffusion import DiffusionSchedule
from collafuse.split.runner import Federation
from conftest import fixed_secrets, synthetic_clients, tiny_config

T, CUT = 20, 6


def test_min_snr_weights_follow_their_formula_and_average_one():
    ab = cosine_alpha_bar(T)
    w = DiffusionSchedule(DiffusionConfig(timesteps=T)).loss_weights(range(1, CUT + 1), min_snr_gamma=5.0)
    raw = [min(ab[t] / (1 - ab[t]), 5.0) / (ab[t] / (1 - ab[t])) for t in range(1, CUT + 1)]
    mean = sum(raw) / len(raw)
    for t in range(1, CUT + 1):
        assert float(w[t]) == pytest.approx(raw[t - 1] / mean, rel=1e-5)
    assert float(w[1:CUT + 1].mean()) == pytest.approx(1.0, rel=1e-6)
    assert raw[0] < raw[-1] <= 1.0  # low noise (high SNR) is weighted down, as Min-SNR intends


def test_server_absolute_eps_weights_are_k_t_squared():
    ab = cosine_alpha_bar(T)
    w = DiffusionSchedule(DiffusionConfig(timesteps=T)).loss_weights(range(CUT + 1, T + 1), cut=CUT)
    raw = [(1 - ab[t]) / (1 - ab[t] / ab[CUT]) for t in range(CUT + 1, T + 1)]  # k_t^2, written out
    mean = sum(raw) / len(raw)
    for t in range(CUT + 1, T + 1):
        assert float(w[t]) == pytest.approx(raw[t - CUT - 1] / mean, rel=1e-4)
    assert DiffusionSchedule(DiffusionConfig(timesteps=T)).loss_weights(range(1, 7)) is None  # unweighted


def _fed(rounds=2, **train):
    cfg = tiny_config(train={"rounds": rounds, **train})
    return Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))


def test_warm_up_then_cosine_decay_reach_the_hand_computed_rates():
    fed = _fed(rounds=3, lr_schedule="cosine", lr_warmup_steps=2, lr=1e-3)  # 3 rounds x 2 steps = 6 steps
    fed.cfg.train.rounds = 1
    fed.train(progress=False)  # 2 steps: warm-up done
    assert fed.server.learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    fed.cfg.train.rounds = 2
    fed.train(progress=False)  # 4 steps: cosine at progress (4-2)/(6-2) = 0.5
    cosine = 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert fed.server.learner.optimizer.param_groups[0]["lr"] == pytest.approx(cosine)
    fed.cfg.train.rounds = 3
    fed.train(progress=False)
    assert fed.clients[0].learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    warm = _fed(rounds=2, lr_warmup_steps=4, lr=1e-3)
    warm.cfg.train.rounds = 1
    warm.train(progress=False)  # 2 of 4 warm-up steps
    assert warm.server.learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_weighted_training_resumes_bit_exactly_with_its_schedule(tmp_path):
    knobs = {"lr_schedule": "cosine", "lr_warmup_steps": 1, "min_snr_gamma": 5.0, "server_abs_eps_weight": True}
    straight = _fed(rounds=3, **knobs)
    straight.train(progress=False)
    part = _fed(rounds=3, **knobs)
    part.cfg.train.rounds = 1
    part.train(tmp_path, progress=False)
    resumed = _fed(rounds=3, **knobs)
    assert resumed.restore(tmp_path)
    resumed.train(progress=False)
    for r, s in zip((resumed.server, *resumed.clients), (straight.server, *straight.clients)):
        ta, tb = r.state()[0], s.state()[0]
        assert all(torch.equal(ta[k], tb[k]) for k in ta), r.node_id
    assert resumed.history.losses == straight.history.losses
    plain = _fed(rounds=3)
    plain.train(progress=False)
    assert plain.history.losses != straight.history.losses  # the knobs did change the training


def test_unit_weights_give_the_unweighted_loss():
    fed = _fed()
    learner = fed.server.learner
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t, ids = torch.tensor([7, 9, 12, 19]), torch.tensor([0, 1, 2, 3])
    state = {k: v.clone() for k, v in learner.model.state_dict().items()}
    a = learner.step(x, t, ids, x)
    learner.model.load_state_dict(state)
    b = learner.step(x, t, ids, x, torch.ones(4))
    assert a == pytest.approx(b, rel=1e-6)


def test_bad_recipe_values_get_one_line_errors():
    with pytest.raises(ConfigError, match=r"train.min_snr_gamma = -1.0 is invalid"):
        tiny_config(train={"min_snr_gamma": -1.0})
    with pytest.raises(ConfigError, match=r"train.lr_schedule = 'linear' is invalid"):
        tiny_config(train={"lr_schedule": "linear"})
