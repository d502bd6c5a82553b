"""The privacy invariant, checked on a full tiny run, on what the server object actually holds, and by an attacker
given everything the server holds (server_attacker.py)."""

from __future__ import annotations

import json

import pytest
import torch

from collafuse.config import ConfigError, config_from_dict
from collafuse.split.checkpoint import write_text_atomic
from collafuse.split.client import Client
from collafuse.split.protocol import SERVER, SPECS, Message, ProtocolError, check_message
from collafuse.split.runner import Federation
from collafuse.split.seeding import ClientSecret, generator
from conftest import TINY, fixed_secrets, merge, synthetic_clients, tiny_config
from server_attacker import (
    posterior_mean_iid,
    psnr,
    reconstructions,
    restored_server,
    secret_appears_in,
    server_side_files,
    train_run,
)


@pytest.fixture(scope="module")
def trained():
    cfg = tiny_config(data={"num_clients": 3}, train={"rounds": 3})
    fed = Federation(cfg, synthetic_clients(cfg, n=16))
    fed.train(progress=False)
    for c in fed.clients:
        fed.sample(c.index, 3)
    return fed


def _tensors(obj, seen=None):
    """Every tensor reachable from ``obj``: attributes, containers, module parameters and buffers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        yield from obj.state_dict().values()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("collafuse", "diffusers.training_utils")):
        yield from _tensors(vars(obj), seen)
    elif isinstance(obj, torch.optim.Optimizer):
        yield from _tensors(obj.state_dict(), seen)


def test_message_log_holds_only_allowed_kinds_and_arrays(trained):
    records = trained.log.records
    kinds = {r["kind"] for r in records}
    assert kinds == {"upload_request", "upload", "train_request", "train_reply", "sample_request", "sample_response"}
    for r in records:
        spec = SPECS[r["kind"]]
        assert {a["name"] for a in r["arrays"]} == set(spec.arrays)
        assert set(r["meta"]) <= spec.meta
        assert (r["receiver"] == SERVER) == (spec.direction == "c2s")
        for a in r["arrays"]:
            n = 1
            for d in a["shape"]:
                n *= d
            assert a["bytes"] == n * {"float32": 4, "int64": 8}[a["dtype"]]
    # One upload per client in the whole run: the view is cached, never re-drawn.
    assert sorted(r["sender"] for r in records if r["kind"] == "upload") == ["client0", "client1", "client2"]


def test_server_never_holds_x0_or_eps(trained):
    held = [t.detach().float().reshape(-1, 28 * 28) for t in _tensors(trained.server)
            if t.ndim >= 2 and t.shape[-2:] == (28, 28)]
    held = torch.cat(held)
    assert len(held) >= 48  # it does hold the uploads
    for c in trained.clients:
        x0 = c.data.train_x.reshape(-1, 28 * 28)
        secret = ClientSecret.from_tensor(c.state()[0]["secret"])  # the test's god view of the client
        eps = torch.randn(c.data.train_x.shape, generator=secret.generator("upload", 1)).reshape(-1, 28 * 28)
        for secret in (x0, eps, -eps):
            assert torch.cdist(secret, held).min() > 1.0  # nothing the server holds is (close to) a secret
        # ...and what it holds for this client is exactly the q(x_cut | x0) view, with the client's noise.
        u, y = trained.server.uploads[c.index]
        ab = c.schedule.alpha_bar[c.cut]
        torch.testing.assert_close(u.reshape(-1, 784), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
        assert torch.equal(y, c.data.train_y)


def test_uploads_for_an_image_are_identical_across_rounds():
    cfg = tiny_config(train={"rounds": 1})
    data = synthetic_clients(cfg, n=16)
    fed = Federation(cfg, data)
    fed.train(progress=False)
    first = {k: v[0].clone() for k, v in fed.server.uploads.items()}
    fed.server.uploads.clear()  # a server restart: the clients are asked again in the next round
    fed.cfg.train.rounds = 3
    fed.train(progress=False)
    for k, u in first.items():
        assert torch.equal(fed.server.uploads[k][0], u)
    # A fresh client object restored from the client's own state (a restart) recomputes the same bytes...
    again = Client(0, data[0], cfg)
    again.load_state(*fed.clients[0].state())
    assert torch.equal(again.upload()[0], first[0])
    # ...and one that draws its own secret (no state) sends another view.
    assert not torch.equal(Client(0, data[0], cfg).upload()[0], first[0])
    sent = [r for r in fed.log.records if r["kind"] == "upload"]
    assert len(sent) == 2 * cfg.data.num_clients  # asked twice, same view both times


@pytest.mark.parametrize("bad,reason", [
    (Message("upload", "client0", SERVER, {"x0": torch.zeros(2, 1, 28, 28), "y": torch.zeros(2, dtype=torch.long)}),
     "arrays"),
    (Message("upload", "client0", SERVER, {"x_cut": torch.zeros(2, 1, 28, 28), "y": torch.zeros(2, dtype=torch.long),
                                           "eps": torch.zeros(2, 1, 28, 28)}), "arrays"),
    (Message("upload", SERVER, "client0", {"x_cut": torch.zeros(2, 1, 28, 28), "y": torch.zeros(2, dtype=torch.long)}),
     "not allowed"),
    (Message("upload", "client0", SERVER, {"x_cut": torch.full((2, 1, 28, 28), float("nan")),
                                           "y": torch.zeros(2, dtype=torch.long)}), "NaN"),
    (Message("upload", "client0", SERVER, {"x_cut": torch.zeros(2, 1, 28, 28, dtype=torch.float64),
                                           "y": torch.zeros(2, dtype=torch.long)}), "float32"),
    (Message("upload", "client0", SERVER, {"x_cut": torch.zeros(2, 1, 28, 28), "y": torch.zeros(3, dtype=torch.long)}),
     "batch size"),
    (Message("client_weights", "client0", SERVER, {}), "not allowed"),
    (Message("train_reply", "client0", SERVER, meta={"loss": 0.1, "grad_norm": 2.0}), "meta"),
    (Message("train_reply", "client0", SERVER, meta={"loss": float("inf")}), "finite"),
])
def test_forbidden_messages_are_rejected(bad, reason):
    with pytest.raises(ProtocolError, match=reason):
        check_message(bad)


def test_server_rejects_out_of_range_labels(trained):
    bad = Message("sample_request", "client0", SERVER, {"y": torch.tensor([0, 99])})
    with pytest.raises(ProtocolError, match="labels"):
        trained.transport.request(bad)


def test_baselines_run_through_the_same_loop():
    """Cut 0 (global model): clients own no step, the upload is x0 itself. Cut T (independent client models):
    nothing but train instructions and loss replies crosses; no upload, no sampling request."""
    cfg = tiny_config(split={"cut": 0})
    data = synthetic_clients(cfg, n=16)
    fed = Federation(cfg, data)
    fed.train(progress=False)
    fed.sample(0, 2)
    assert all(v is None for c in fed.clients for v in fed.history.losses[c.node_id])
    assert all(v is not None for v in fed.history.losses[SERVER])
    assert torch.equal(fed.server.uploads[0][0], data[0].train_x)

    cfg = tiny_config(split={"cut": cfg.diffusion.timesteps})
    fed = Federation(cfg, synthetic_clients(cfg, n=16))
    fed.train(progress=False)
    out = fed.sample(1, 2)
    assert out["x0"].shape == (2, 1, 28, 28) and torch.isfinite(out["x0"]).all()
    assert {r["kind"] for r in fed.log.records} == {"train_request", "train_reply"}
    assert all(v is None for v in fed.history.losses[SERVER]) and not fed.server.uploads


def test_fresh_upload_noise_is_off_by_default_and_sends_one_view_per_round_when_on():
    cfg = tiny_config(train={"rounds": 3}, split={"cut": 6, "fresh_upload_noise": True})
    data = synthetic_clients(cfg, n=16)
    fed = Federation(cfg, data, secrets=fixed_secrets(2))
    views = []
    fed.train(progress=False, on_round=lambda r: views.append(fed.server.uploads[0][0].clone()))
    assert sum(r["kind"] == "upload" for r in fed.log.records) == 3 * cfg.data.num_clients
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    default = Federation(tiny_config(train={"rounds": 1}), data, secrets=fixed_secrets(2))
    default.train(progress=False)
    assert torch.equal(views[0], default.server.uploads[0][0])  # round 1 is the default view
    assert tiny_config().identity_hash() != cfg.identity_hash()


def test_upload_clip_norm_clips_only_what_is_uploaded():
    """With split.upload_clip_norm = C the upload noises x0 * min(1, C / ||x0||) (written out here), with the same
    noise as without: u_clip - u = sqrt(abar_s) (clip(x0) - x0). The client's own training images stay unclipped."""
    clip = 3.0
    plain_cfg = tiny_config(split={"cut": 6})
    clip_cfg = tiny_config(split={"cut": 6, "upload_clip_norm": clip})
    data = synthetic_clients(plain_cfg, n=16)
    plain, clipped = (Federation(c, data, secrets=fixed_secrets(2)) for c in (plain_cfg, clip_cfg))
    abar = float(plain.server.schedule.alpha_bar[6])
    for a, b in zip(plain.clients, clipped.clients):
        x0 = a.data.train_x
        norms = x0.flatten(1).norm(dim=1)
        assert (norms > clip).all()  # the synthetic images are far larger than C: every one is clipped
        by_hand = x0 * torch.minimum(torch.ones_like(norms), clip / norms)[:, None, None, None]
        assert torch.allclose(b.upload()[0] - a.upload()[0], abar ** 0.5 * (by_hand - x0), atol=1e-5)
        assert torch.equal(b.data.train_x, x0)  # the client's model trains on its real images
    assert plain_cfg.identity_hash() != clip_cfg.identity_hash()
    assert clip_cfg.to_dict()["split"]["upload_clip_norm"] == clip  # public: the server knows C
    with pytest.raises(ConfigError, match=r"split.upload_clip_norm = -1.0 is invalid \(allowed: a number > 0, or "
                                          r"unset for no clipping\)"):
        tiny_config(split={"cut": 6, "upload_clip_norm": -1.0})


# -- the server as an attacker -----------------------------------------------------------------------------------------
def _bound_and_attacks(cfg, data, run_dir, uploads):
    """Posterior-mean PSNR bound (closed form for the i.i.d. uniform pixels of ``synthetic_clients``) and the PSNR
    of every attack the server can run from its own files and the uploads it received."""
    server = restored_server(run_dir)
    abar = float(server.schedule.alpha_bar[cfg.cut])
    support = torch.linspace(-1, 1, 4001)  # a fine grid of the continuous U[-1, 1] prior
    out = {}
    for c, rec in reconstructions(server, uploads).items():
        x0 = data[c].train_x
        bound = psnr(posterior_mean_iid(uploads[c][0], abar, support), x0)
        out[c] = (bound, {name: psnr(x, x0) for name, x in rec.items()},
                  float((rec["exact_seed"] - x0).abs().max()))
    return out


@pytest.mark.parametrize("cut", [3, 6, 10])
def test_an_attacker_with_everything_the_server_holds_cannot_beat_the_posterior_mean(tmp_path, cut):
    """Give the attacker the server's run directory (config.toml, its checkpoint, state.json, the message log) and
    the uploads it received. Rebuilding the noise from every seed it can know fails, and no attack reconstructs
    the training images better than the posterior mean E[x0 | u], the best any estimator from one view can do."""
    cfg = tiny_config(split={"cut": cut}, train={"rounds": 2})
    data = synthetic_clients(cfg, n=64)
    fed = train_run(tmp_path, cfg, data)
    files = server_side_files(tmp_path)
    assert {"config.toml", "message_log.jsonl"} <= set(files) and any(f.endswith("server.safetensors") for f in files)
    for c in fed.clients:
        secret = bytes(c.state()[0]["secret"].tolist())
        assert secret_appears_in(files, secret) == []  # ...but it is in the client's own checkpoint file
        assert secret_appears_in({"own": (tmp_path / "checkpoints" / "round_000002" / f"{c.node_id}.safetensors")
                                  .read_bytes()}, secret) == ["own"]
    for c, (bound, attacks, exact_err) in _bound_and_attacks(cfg, data, tmp_path, fed.server.uploads).items():
        assert 8 < bound < 30  # a noisy view: the bound itself is far from exact recovery
        for name, value in attacks.items():
            assert value <= bound + 0.5, f"client{c} {name}: {value:.2f} dB beats the bound {bound:.2f} dB"
        assert max(attacks.values()) > bound - 3  # and the attacker is competent: its best is near the bound
        assert attacks["exact_seed"] < bound and exact_err > 0.5  # the exact-seed attack fails outright


def test_the_same_attacker_recovers_every_image_when_the_upload_seed_is_shared(tmp_path):
    """The attack has teeth: with the old scheme (noise from the shared seed 3 and the node id) it rebuilds x0."""
    cfg = tiny_config(split={"cut": 6}, train={"rounds": 1})
    data = synthetic_clients(cfg, n=64)
    fed = Federation(cfg, data)
    write_text_atomic(tmp_path / "config.toml", cfg.to_toml())
    fed.train(tmp_path / "checkpoints", progress=False)
    abar = float(fed.server.schedule.alpha_bar[6])
    old = {}
    for c in fed.clients:  # what Client.upload computed before client secrets: generator(seeds.upload=3, id, ...)
        eps = torch.randn(c.data.train_x.shape, generator=generator(3, c.node_id, "upload"))
        old[c.index] = (abar ** 0.5 * c.data.train_x + (1 - abar) ** 0.5 * eps, c.data.train_y)
    for bound, attacks, exact_err in _bound_and_attacks(cfg, data, tmp_path, old).values():
        assert exact_err < 1e-4 and attacks["exact_seed"] > bound + 40


def test_streams_of_two_clients_and_two_runs_differ_and_none_is_a_shared_seed_stream():
    cfg = tiny_config()
    data = synthetic_clients(cfg, n=16)
    a, b = Federation(cfg, data), Federation(cfg, data)
    ua, ub = a.clients[0].upload()[0], b.clients[0].upload()[0]
    assert not torch.equal(ua, ub)  # OS entropy: two runs of one config send different views
    assert not torch.equal(a.clients[0].learner.model.conv_in.weight, b.clients[0].learner.model.conv_in.weight)
    # Given the same secret, two runs agree exactly (reproducible experiments).
    s = fixed_secrets(2)
    x, y = Federation(cfg, data, secrets=s), Federation(cfg, data, secrets=s)
    assert torch.equal(x.clients[1].upload()[0], y.clients[1].upload()[0])


def test_a_shared_upload_seed_in_the_config_is_refused():
    with pytest.raises(ConfigError, match=r"seeds.upload = 3 is not allowed"):
        config_from_dict(merge(TINY, {"seeds": {"upload": 3}}))
    assert "upload" not in json.dumps(tiny_config().to_dict()["seeds"])
