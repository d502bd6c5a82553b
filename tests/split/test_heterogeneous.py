"""Heterogeneous federations (issue 29): every client its own cut, model, batch size and steps per round.

References that do not come from the code under test: the closed-form Gaussian posterior for the server's mixed-cut
objective, sampler grids written out by hand, the pre-change code's behaviour (a homogeneous federation written with
[[clients]] tables is the run without them, bit for bit, and keeps today's identity hash), and a real SIGKILL.
"""

from __future__ import annotations

import json
import math
import tomllib

import pytest
import tomli_w
import torch

from collafuse.config import ConfigError, config_from_dict, load_config
from collafuse.split.protocol import SERVER, Message
from collafuse.split.runner import Federation
from collafuse.split.server import Server
from collafuse.split.transport import handle_checked
from conftest import TINY, fixed_secrets, kill_9_then_resume, merge, synthetic_clients, tiny_config

MIXED = [{"cut": 3}, {"cut": 10, "model": {"block_out_channels": [4, 8]}, "batch_size": 4, "client_steps": 1}]


def _with_clients(cfg, clients, **split):
    data = cfg.to_dict()
    data["split"].update(split)
    return config_from_dict({**data, "clients": clients})


def _states(fed: Federation) -> dict:
    return {node: tensors for node, (tensors, _) in fed.node_states().items()}


# -- configuration ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clients,split,needle", [
    ([{"cut": 3}], {}, "clients holds 1 [[clients]] tables (allowed: none, or exactly one per client: 2"),
    ([{"cut": 21}, {}], {}, "clients[0].cut = 21 is invalid (allowed: an integer step in [0, 20]"),
    ([{"cut": -1}, {}], {}, "clients[0].cut = -1 is invalid (allowed: an integer step in [0, T], or unset"),
    ([{"cut": "5"}, {}], {}, "clients[0].cut = '5' is invalid (expected an integer)"),
    ([{}, {"cutt": 5}], {}, "unknown key 'clients[1].cutt' (allowed keys in [[clients]]: cut, model,"),
    ([{}, {"batch_size": 0}], {}, "clients[1].batch_size = 0 is invalid (allowed: an integer >= 1"),
    ([{}, {"model": {"block_out_channels": [8, 16, 16, 16, 16]}}], {},
     "clients[1].model.block_out_channels = [8, 16, 16, 16, 16] is invalid (allowed: at most 3 levels for 28x28"),
    ([{}, {"model": {"norm_num_groups": 3}}], {}, "clients[1].model.norm_num_groups = 3 is invalid (allowed: a "
                                                  "divisor of every entry of clients[1].model.block_out_channels"),
    ([{}, {"model": {"width": 3}}], {}, "unknown key 'clients[1].model.width'"),
    ([{}, {"model": {"condition_on_client": True}}], {}, "clients[1].model.condition_on_client = True is invalid"),
    ([{"cut": 3}, {}], {"min_cut": 5}, "clients[0].cut = 3 of client 0 is outside the server's range (allowed: "
                                       "[5, 19], split.min_cut..split.max_cut)"),
    ([{}, {"cut": 15}], {"max_cut": 12}, "clients[1].cut = 15 of client 1 is outside the server's range (allowed: "
                                         "[6, 12]"),
    ([{}, {"cut": 20}], {}, "clients[1].cut = 20 of client 1 is outside the server's range (allowed: [6, 19]"),
    ([{}, {}], {"min_cut": 9}, "split.cut = 6 of client 0 is outside the server's range (allowed: [9, 19]"),
    ([{}, {}], {"min_cut": 9, "max_cut": 7}, "split.min_cut = 9 is invalid (allowed: at most split.max_cut = 7)"),
])
def test_bad_client_settings_are_one_line_errors(clients, split, needle):
    with pytest.raises(ConfigError) as e:
        _with_clients(tiny_config(), clients, **split)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fedavg_refuses_a_per_client_cut_or_model():
    cfg = tiny_config(split={"algorithm": "fedavg", "cut": None})
    for own in ({"cut": 3}, {"model": {"mid_attention": True}}):
        with pytest.raises(ConfigError, match=r"clients\[0\]\.(cut|model) = .* unset with split.algorithm = 'fedavg'"):
            _with_clients(cfg, [own, {}])
    assert _with_clients(cfg, [{"client_steps": 1}, {}]).for_client(0).train.client_steps == 1


def test_client_views_and_round_trip(tmp_path):
    cfg = _with_clients(tiny_config(), MIXED)
    assert [cfg.client_cut(i) for i in range(2)] == [3, 10] and cfg.cut_range == (3, 19) and cfg.heterogeneous
    view = cfg.for_client(1)
    assert (view.cut, view.client_model.block_out_channels, view.train.batch_size, view.train.client_steps) == \
        (10, [4, 8], 4, 1)
    assert view.client_model.norm_num_groups == 4 and view.clients == []  # the other keys stay the shared ones
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert "[[clients]]" in path.read_text()
    assert load_config(path).identity_hash() == cfg.identity_hash() != tiny_config().identity_hash()


def test_the_clients_array_as_one_override():
    """What a study file's ``set`` uses: the whole [[clients]] array in one ``--set clients=[...]``."""
    cfg = load_config("configs/quality.toml", ["clients=[{cut = 50, model = {block_out_channels = [8, 16, 16]}}, {}, "
                                               "{cut = 500, batch_size = 32}]"])
    assert [cfg.client_cut(i) for i in range(3)] == [50, 200, 500] and cfg.cut_range == (50, 999)
    assert cfg.for_client(2).train.batch_size == 32 and cfg.for_client(0).client_model.block_out_channels == [8, 16, 16]
    with pytest.raises(ConfigError, match=r"override clients = .* is invalid \(expected a TOML array of inline tables"):
        load_config("configs/quality.toml", ["clients=[{cut = 50}"])
    with pytest.raises(ConfigError, match=r"clients = 3 is invalid \(expected an array of tables"):
        load_config("configs/quality.toml", ["clients=3"])


def test_tables_that_repeat_the_shared_values_keep_todays_identity():
    demo = load_config("configs/demo.toml")
    same = _with_clients(demo, [{"cut": 200}, {"client_steps": 10, "batch_size": 64},
                                {"model": {"block_out_channels": [16, 32, 32]}}])
    assert not same.heterogeneous
    # the hash checkpoints of today's demo runs carry (computed by the code before [[clients]] existed), so they resume
    assert demo.identity_hash() == same.identity_hash() == "cf89ac04f6a22881"


def test_the_demo_config_with_repeated_tables_trains_bit_identically():
    """The committed demo config (its models, cut, recipe; 2 rounds of 3 steps on 48 images per client to stay quick),
    once as it is and once with a [[clients]] table per client that repeats the shared values."""
    demo = load_config("configs/demo.toml", ["train.rounds=2", "train.client_steps=3", "train.server_steps=3",
                                             "train.batch_size=16", "data.max_train_per_client=48"])
    same = _with_clients(demo, [{"cut": 200}, {"client_steps": 3}, {"model": {"mid_attention": False}}])
    runs = []
    for cfg in (demo, same):
        fed = Federation(cfg, synthetic_clients(cfg, n=48), secrets=fixed_secrets(3))
        fed.train(progress=False)
        runs.append((_states(fed), fed.history.losses, fed.sample(2, 3)["x0"]))
    (a, la, xa), (b, lb, xb) = runs
    assert a.keys() == b.keys() and la == lb and torch.equal(xa, xb)
    for node in a:
        assert all(torch.equal(a[node][k], b[node][k]) for k in a[node]), node


# -- the server's rule for mixed cuts ---------------------------------------------------------------------------------
def _captured_steps(server: Server, steps: int) -> tuple[torch.Tensor, ...]:
    """Run ``steps`` server steps with the optimizer step replaced by a recorder: each image's cut s, x_t, t, target
    and loss weight, as the learner would receive them."""
    cuts, rows = [], []
    mixed = server.mixed_train_step
    server.mixed_train_step = lambda u, y, c, s: cuts.append(s) or mixed(u, y, c, s)
    server.learner.step = lambda x_t, t_index, ids, target, weights=None: rows.append(
        (x_t, t_index + 1, target, torch.ones(len(t_index)) if weights is None else weights)) or 0.0
    for _ in range(steps):
        server.train_step()
    return (torch.cat(cuts), *(torch.cat(z) for z in zip(*rows)))


def _gaussian_server(cuts: dict[int, int], n: int = 64, mu: float = 0.3, v: float = 0.2) -> Server:
    """A server holding, for each client, n views at its cut of images x0 ~ N(mu, v) per pixel."""
    cfg = _with_clients(tiny_config(train={"batch_size": 256}), [{"cut": s} for s in cuts.values()])
    server = Server(cfg)
    g = torch.Generator().manual_seed(0)
    ab = server.schedule.alpha_bar.double()
    for client, s in cuts.items():
        x0 = mu + v ** 0.5 * torch.randn((n, 1, 28, 28), generator=g, dtype=torch.float64)
        u = ab[s].sqrt() * x0 + (1 - ab[s]).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        server.receive_upload(client, u.float(), torch.zeros(n, dtype=torch.long), s)
    return server


def test_mixed_cut_targets_have_the_absolute_posterior_as_optimum():
    """Two clients with the same data, x0 ~ N(mu, v) per pixel, at cuts 3 and 10 (reference cut 3). For a fixed t the
    optimum of the server's weighted loss sum w (f - target)^2 among f = beta (x_t - m) is the weighted least-squares
    slope. Read through the reference cut, k_t(3) * beta must be the slope of the absolute E[eps | x_t] =
    sqrt(1 - abar_t) (x_t - m) / Var(x_t) (closed form), for each client's images alone: neither cut pulls the other's
    optimum, so the model serves both."""
    mu, v = 0.3, 0.2
    server = _gaussian_server({0: 3, 1: 10}, mu=mu, v=v)
    s, x_t, t, target, w = _captured_steps(server, 150)
    ab = server.schedule.alpha_bar.double()
    for t_fixed in (12, 16, 20):
        slope = float((1 - ab[t_fixed]).sqrt() / (ab[t_fixed] * v + 1 - ab[t_fixed]))
        for cut in (3, 10):
            sel = (t == t_fixed) & (s == cut)
            xs = (x_t[sel].double() - ab[t_fixed].sqrt() * mu).flatten(1)
            ys, ws = target[sel].double().flatten(1), w[sel].double()[:, None]
            beta = float((ws * xs * ys).sum() / (ws * xs * xs).sum())
            assert float(server.schedule.server_eps_scale(t_fixed, 3)) * beta == pytest.approx(slope, rel=0.06), \
                (t_fixed, cut)


def test_each_image_draws_t_from_its_own_steps():
    """t ~ U{s_i + 1..T} for every image: each step of its own range appears about 1 / (T - s_i) of the time, and
    never a step at or below its cut."""
    server = _gaussian_server({0: 3, 1: 10}, n=32)
    s, _, t, _, _ = _captured_steps(server, 40)
    for cut in (3, 10):
        ts = t[s == cut]
        assert int(ts.min()) == cut + 1 and int(ts.max()) == 20
        counts = torch.bincount(ts, minlength=21)[cut + 1:].double()
        expected = len(ts) / (20 - cut)
        assert float(counts.min()) > 0.6 * expected and float(counts.max()) < 1.4 * expected


def test_server_hands_off_at_each_clients_cut():
    """The tiny chain (T = 20, DPM-Solver at 5 steps): stride 4 anchored on the client's cut. Cut 3: grid
    [18, 14, 10, 6, 2] (indices), server steps t > 3 are indices >= 3 -> 4 steps; cut 10: grid [17, 13, 9, 5, 1],
    server steps indices >= 10 -> 2 steps (written out by hand)."""
    cfg = _with_clients(tiny_config(), MIXED)
    fed = Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))
    fed.train(progress=False)
    assert fed.server.client_cuts == {0: 3, 1: 10}
    model = fed.server.learner.sampling_model()
    calls = []
    hook = model.register_forward_hook(lambda mod, args, out: calls.append(int(args[1].flatten()[0])))
    for client, expected in ((0, [18, 14, 10, 6]), (1, [17, 13])):
        calls.clear()
        out = fed.sample(client, 2)
        assert calls == expected and out["x0"].shape == (2, 1, 28, 28) and torch.isfinite(out["x0"]).all()
    hook.remove()


# -- refusals at run time ---------------------------------------------------------------------------------------------
def test_a_client_outside_the_range_is_refused_and_dropped_and_the_federation_goes_on(caplog):
    cfg = tiny_config(train={"rounds": 3})
    fed = Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))
    fed.clients[1].cut = 2  # a misconfigured site: below the server's range [6, 19]
    fed.train(progress=False)
    assert fed.client_ids == ["client0"] and fed.dropped == ["client1"]
    assert any("client1 dropped from the federation" in e for e in fed.events)
    assert any("upload from client1 declares cut 2 (allowed: [6, 19]" in e for e in fed.events)
    assert fed.history.losses["client1"] == [None, None, None]
    assert all(x is not None for x in fed.history.losses["client0"]) and fed.history.rounds_done == 3
    assert set(fed.server.uploads) == {0}
    errors = [r for r in fed.log.records if r["kind"] == "error" and r["receiver"] == "client1"]
    assert errors and "declares cut 2" in errors[0]["meta"]["reason"]  # the client is told why


def test_a_cut_that_changes_between_uploads_is_refused():
    cfg = tiny_config(train={"rounds": 3}, split={"fresh_upload_noise": True})
    fed = Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))
    fed.train(progress=False, on_round=lambda r: setattr(fed.clients[0], "cut", 9) if r == 1 else None)
    assert fed.dropped == ["client0"]
    assert any("declares cut 9, but its earlier uploads were at cut 6 (allowed: 6" in e for e in fed.events)
    # the server kept the view it accepted, not the refused one
    assert fed.server.client_cuts[0] == 6


def test_a_restarted_server_remembers_each_clients_cut(tmp_path):
    cfg = _with_clients(tiny_config(train={"rounds": 2}), MIXED)
    fed = Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))
    fed.train(tmp_path, progress=False)
    again = Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))
    assert again.restore(tmp_path) and again.server.client_cuts == {0: 3, 1: 10}
    u, y = again.clients[1].upload()
    bad = Message("upload", "client1", SERVER, {"x_cut": u, "y": y}, {"round": 3, "cut": 12})
    reply = handle_checked(again.server, bad)
    assert reply.kind == "error" and "declares cut 12, but its earlier uploads were at cut 10" in reply.meta["reason"]


def test_per_client_steps_and_batch_reach_the_client():
    cfg = _with_clients(tiny_config(train={"rounds": 2}), MIXED)
    fed = Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))
    fed.train(progress=False)
    assert fed.clients[0].learner.steps == 2 * 2 and fed.clients[1].learner.steps == 2 * 1
    replies = [r for r in fed.log.records if r["kind"] == "train_reply"]
    assert {(r["sender"], r["meta"]["steps"]) for r in replies} == {("client0", 2), ("client1", 1)}
    uploads = {r["sender"]: r["meta"]["cut"] for r in fed.log.records if r["kind"] == "upload"}
    assert uploads == {"client0": 3, "client1": 10}
    n_params = [sum(p.numel() for p in c.learner.model.parameters()) for c in fed.clients]
    assert n_params[1] < n_params[0]  # client 1's own smaller model


# -- exact resume after a real SIGKILL ---------------------------------------------------------------------------------
def test_kill_9_then_resume_of_a_mixed_cut_run_equals_a_straight_run(tmp_path, idx_dataset):
    toml = tmp_path / "mixed.toml"
    toml.write_text(tomli_w.dumps({**merge(TINY, {"data": {"root": str(idx_dataset)}}), "clients": MIXED}))
    a, b = kill_9_then_resume(toml, tmp_path)
    for node in a:
        assert a[node].keys() == b[node].keys()
        assert all(torch.equal(a[node][k], b[node][k]) for k in a[node]), node
    assert not math.isnan(float(a["server"]["ema.0"].sum()))


# -- accounting per client ---------------------------------------------------------------------------------------------
def test_evaluation_reports_each_client_at_its_own_cut(sweep_toml, tmp_path):
    """A mixed run through the CLI: evaluation.json gives every client its cut, sampler grid, upload epsilon,
    linkage, client FLOPs and bytes. Epsilon must fall with the cut (a later cut adds more noise), the client's
    sampling FLOPs per image must grow with it, and the smaller model must cost less per training step."""
    from collafuse.cli import main

    toml = tmp_path / "mixed.toml"
    data = tomllib.loads(sweep_toml.read_text())
    data["clients"] = MIXED
    toml.write_text(tomli_w.dumps(data))
    out = tmp_path / "run"
    assert main(["run", str(toml), "--out", str(out), "--quiet"]) == 0
    assert "heterogeneous federation: client0 cut 3" in (out / "report.md").read_text()
    assert main(["evaluate", str(out), "--quiet"]) == 0
    ev = json.loads((out / "evaluation.json").read_text())
    assert {k: v["cut"] for k, v in ev["clients"].items()} == {"client0": 3, "client1": 10}
    assert ev["clients"]["client0"]["sampler_grid"]["server_steps"] == 4  # grids of the hand-off test
    assert ev["clients"]["client1"]["sampler_grid"]["server_steps"] == 2
    eps = [ev["disclosure"][c]["formal"]["epsilon"] for c in ("client0", "client1")]
    assert eps[0] > eps[1] > 0
    assert [ev["disclosure"][c]["cut"] for c in ("client0", "client1")] == [3, 10]
    assert all(0 <= ev["disclosure"][c]["results"]["linkage"]["top1"] <= 1 for c in ("client0", "client1"))
    pc = ev["compute"]["per_client"]
    assert pc["client0"]["sampling_per_image"]["client"]["steps"] == 1  # index 2 of [18, 14, 10, 6, 2]
    assert pc["client1"]["sampling_per_image"]["client"]["steps"] == 3  # indices 9, 5, 1
    assert pc["client1"]["client_params"] < pc["client0"]["client_params"]
    assert (pc["client0"]["client_steps_per_round"], pc["client1"]["client_steps_per_round"]) == (2, 1)
    assert pc["client1"]["train_flops_per_round"] < pc["client0"]["train_flops_per_round"]
    comm = ev["communication"]["per_client"]
    assert comm["client0"]["uploaded_bytes"] > 0 and comm["client1"]["uploaded_bytes"] > 0
