"""The FedAvg baseline (split.algorithm = "fedavg"): the averaging math against hand-written values and numpy, what
crosses (weights only, and only in this mode), Adam state kept local, exact resume, a client dropping out of a round,
bad input. FedAvg over the Flower adapter, bit for bit against in process: flower/test_flower_adapter.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from collafuse.config import ConfigError
from collafuse.split import fedavg
from collafuse.split.protocol import SERVER, Message, ProtocolError, check_message
from collafuse.split.runner import Federation
from collafuse.split.transport import InProcessTransport, handle_checked
from conftest import fixed_secrets, synthetic_clients, tiny_config

FEDAVG = {"algorithm": "fedavg"}


def _fed(tmp_path=None, rounds=2, sizes=(16, 48), **sections) -> Federation:
    cfg = tiny_config(split=FEDAVG, train={"rounds": rounds, "client_steps": 2, "server_steps": 2, "batch_size": 8},
                      **sections)
    data = [synthetic_clients(cfg, n=n, seed=i)[i] for i, n in enumerate(sizes)]
    return Federation(cfg, data, secrets=fixed_secrets(len(sizes)))


# -- the math ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("updates,expected", [
    ([([1.0, 2.0], 1), ([3.0, 6.0], 3)], [2.5, 5.0]),               # (1*1 + 3*3)/4, (2*1 + 6*3)/4
    ([([1.0, -1.0], 2), ([3.0, 1.0], 2)], [2.0, 0.0]),              # equal sizes: the plain mean
    ([([0.5, 0.25], 7)], [0.5, 0.25]),                               # one client: its own weights
    ([([1.0], 1), ([2.0], 1), ([10.0], 8)], [8.3]),                  # (1 + 2 + 80)/10
])
def test_weighted_average_matches_hand_computed_values(updates, expected):
    got = fedavg.weighted_average([(torch.tensor(w), n) for w, n in updates])
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("updates,match", [
    ([], "at least one"),
    ([(torch.zeros(2), 1), (torch.zeros(3), 1)], "disagree"),
    ([(torch.zeros(2), 0)], "allowed: integers >= 1"),
])
def test_weighted_average_refuses_what_cannot_be_averaged(updates, match):
    with pytest.raises(ValueError, match=match):
        fedavg.weighted_average(updates)


def test_flatten_and_load_flat_round_trip_and_refuse_a_wrong_length():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    v = torch.arange(fedavg.num_weights(model), dtype=torch.float32)
    fedavg.load_flat(model, v)
    assert torch.equal(model[0].weight.detach().flatten(), v[:6])  # parameters() order: weight, bias, weight, bias
    assert torch.equal(fedavg.flatten(model), v)
    with pytest.raises(ValueError, match=r"allowed: exactly 11"):
        fedavg.load_flat(model, torch.zeros(10))


# -- one round, against numpy ------------------------------------------------------------------------------------------
def test_the_server_averages_the_updates_it_received_weighted_by_each_clients_images():
    fed = _fed(rounds=1)
    seen: dict[int, tuple[np.ndarray, int]] = {}
    receive = fed.server.receive_update

    def record(client, weights, examples):
        seen[client] = (weights.double().numpy().copy(), examples)
        receive(client, weights, examples)

    fed.server.receive_update = record
    before = fed.server.global_weights()
    fed.run_round(1)
    assert {k: n for k, (_, n) in seen.items()} == {0: 16, 1: 48}  # each client's training images
    expected = (16 * seen[0][0] + 48 * seen[1][0]) / 64
    got = fed.server.global_weights().double().numpy()
    assert np.allclose(got, expected, rtol=0, atol=1e-6)
    assert not np.allclose(got, before.double().numpy())  # the clients trained


def test_only_weights_cross_and_the_clients_adam_state_stays_local():
    fed = _fed(rounds=2)
    fed.train(progress=False)
    n = fedavg.num_weights(fed.server.learner.model)
    kinds = {r["kind"] for r in fed.log.records}
    assert kinds == {"model_push", "model_update", "train_reply"}  # the last push (steps 0) is acknowledged
    for r in fed.log.records:
        assert [a["name"] for a in r["arrays"]] in ([], ["weights"])
        assert all(a["shape"] == [n] and a["bytes"] == 4 * n for a in r["arrays"])  # float32: 4 bytes a weight
    # Adam moments are per client: both clients trained, their moments differ, and none of them ever crossed.
    moments = [c.learner.optimizer.state_dict()["state"][0]["exp_avg"] for c in fed.clients]
    assert all(m.abs().sum() > 0 for m in moments) and not torch.equal(moments[0], moments[1])
    # After the final push every client holds the final average (and samples with it).
    w = fed.server.global_weights()
    assert all(torch.equal(fedavg.flatten(c.learner.model), w) for c in fed.clients)
    x = fed.sample(0, 3)["x0"]
    assert x.shape == (3, *fed.cfg.image_shape) and torch.isfinite(x).all()


def test_round_decay_is_the_product_of_the_step_decays():
    assert fedavg.round_decay(lambda j: j / 10, 2, 3) == pytest.approx(0.2 * 0.3 * 0.4, rel=1e-12)
    assert fedavg.round_decay(lambda j: 0.5, 7, 0) == 1.0  # no step: the EMA keeps what it had


def test_the_ema_follows_the_averages_and_is_the_same_on_every_client():
    fed = _fed(rounds=3)
    pushed = []
    apply = fed.clients[0].apply_global

    def record(round_, weights):
        if round_ > fed.clients[0].pushed_round:
            pushed.append(weights.double().clone())
        apply(round_, weights)

    fed.clients[0].apply_global = record
    fed.train(progress=False)
    # The reference: diffusers' own EMAModel, stepped K times on each average (what the per-step EMA of the other
    # modes would do on a trajectory that stands still for K steps), with its warm-up decay (1 + s) / (10 + s).
    model = torch.nn.Linear(1, len(pushed[0]), bias=False).double()
    ema = EMAModel(model.parameters(), decay=fed.cfg.train.ema_decay)
    for w in pushed:
        model.weight.data.copy_(w.view(-1, 1))
        for _ in range(fed.cfg.train.client_steps):
            ema.step(model.parameters())
    reference = ema.shadow_params[0].view(-1)
    shadow = [torch.nn.utils.parameters_to_vector(c.learner.ema.shadow_params) for c in fed.clients]
    assert torch.allclose(shadow[0].double(), reference, rtol=0, atol=1e-5)
    # not a constant-decay EMA from the initial weights: the warm-up forgets them
    d = fed.cfg.train.ema_decay ** fed.cfg.train.client_steps
    constant = pushed[0]
    for w in pushed[1:]:
        constant = d * constant + (1 - d) * w
    assert not torch.allclose(shadow[0].double(), constant, rtol=0, atol=1e-5)
    assert torch.equal(shadow[0], shadow[1])


# -- the protocol, per mode --------------------------------------------------------------------------------------------
def test_weights_may_cross_only_under_fedavg_and_nothing_else_may():
    push = Message("model_push", SERVER, "client0", {"weights": torch.zeros(5)}, {"round": 1, "steps": 2})
    check_message(push, "fedavg")
    with pytest.raises(ProtocolError, match="kind 'model_push' is not allowed under collafuse"):
        check_message(push)
    upload = Message("upload", "client0", SERVER, {"x_cut": torch.zeros(1, 1, 28, 28), "y": torch.zeros(1).long()},
                     {"round": 1, "cut": 6})
    check_message(upload)
    with pytest.raises(ProtocolError, match="kind 'upload' is not allowed under fedavg"):
        check_message(upload, "fedavg")
    # a sampling order and its count may cross (the client samples the whole chain itself); a hand-off may not
    check_message(Message("sample_order", SERVER, "client0", meta={"n": 4}), "fedavg")
    check_message(Message("sample_done", "client0", SERVER, meta={"n": 4}), "fedavg")
    for kind, arrays, src, dst in (("sample_request", {"y": torch.zeros(2).long()}, "client0", SERVER),
                                   ("sample_response", {"x_cut": torch.zeros(2, 1, 28, 28)}, SERVER, "client0")):
        with pytest.raises(ProtocolError, match=f"kind '{kind}' is not allowed under fedavg"):
            check_message(Message(kind, src, dst, arrays), "fedavg")
    with pytest.raises(ProtocolError, match="examples"):
        check_message(Message("model_update", "client0", SERVER, {"weights": torch.zeros(5)},
                              {"round": 1, "steps": 2, "examples": 0}), "fedavg")


def test_a_collafuse_client_refuses_weights_and_a_fedavg_server_refuses_an_upload(tmp_path):
    collafuse_fed = Federation(tiny_config(), secrets=fixed_secrets(2),
                               clients_data=synthetic_clients(tiny_config(), n=16))
    push = Message("model_push", SERVER, "client0", {"weights": torch.zeros(5)}, {"round": 1, "steps": 2})
    reply = handle_checked(collafuse_fed.clients[0], push)
    assert reply.kind == "error" and "not allowed under collafuse" in reply.meta["reason"]
    fed = _fed()
    upload = Message("upload", "client0", SERVER, {"x_cut": torch.zeros(1, 1, 28, 28), "y": torch.zeros(1).long()},
                     {"round": 1, "cut": 6})
    reply = handle_checked(fed.server, upload)
    assert reply.kind == "error" and "not allowed under fedavg" in reply.meta["reason"]
    assert fed.server.updates == {}
    short = Message("model_update", "client0", SERVER, {"weights": torch.zeros(5)},
                    {"round": 1, "steps": 2, "examples": 3})
    reply = handle_checked(fed.server, short)
    assert reply.kind == "error" and "carries 5 weights" in reply.meta["reason"] and fed.server.updates == {}


# -- resume, dropout, bad input ----------------------------------------------------------------------------------------
def test_a_run_stopped_after_round_one_resumes_to_the_same_weights_bit_for_bit(tmp_path):
    whole = _fed(rounds=3)
    whole.train(tmp_path / "a", progress=False)
    first = _fed(rounds=1)
    first.train(tmp_path / "b", progress=False)  # ends with the final push of round 1 and its checkpoint
    resumed = _fed(rounds=3)
    assert resumed.restore(tmp_path / "b")
    resumed.train(tmp_path / "b", progress=False)
    assert torch.equal(resumed.server.global_weights(), whole.server.global_weights())
    for a, b in zip(resumed.clients, whole.clients, strict=True):
        assert torch.equal(fedavg.flatten(a.learner.model), fedavg.flatten(b.learner.model))
        sa, sb = a.learner.optimizer.state_dict()["state"], b.learner.optimizer.state_dict()["state"]
        assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sb)
    assert resumed.history.to_dict()["losses"] == whole.history.to_dict()["losses"]


class DropClient1InRound2(InProcessTransport):
    def exchange(self, msgs):
        if any(m.kind == "model_push" and m.meta["round"] == 2 for m in msgs):
            msgs_ok = [m for m in msgs if m.receiver != "client1"]
            out = {id(d.request): d for d in super().exchange(msgs_ok)}
            from collafuse.split.transport import Delivery
            return [out.get(id(m)) or Delivery(m, error="unavailable: client1 dropped out") for m in msgs]
        return super().exchange(msgs)


def test_a_client_that_drops_out_is_left_out_of_that_rounds_average():
    fed = _fed(rounds=2)
    fed.transport = DropClient1InRound2(list(fed.transport.roles.values()), fed.log, "fedavg")
    seen = {}
    receive = fed.server.receive_update

    def record(client, weights, examples):
        seen.setdefault(fed.history.rounds_done + 1, {})[client] = weights.clone()
        receive(client, weights, examples)

    fed.server.receive_update = record
    fed.train(progress=False)
    assert sorted(seen[1]) == [0, 1] and sorted(seen[2]) == [0]
    assert torch.equal(fed.server.global_weights(), seen[2][0])  # the average of one update is that update
    assert any("round 2: client1 skipped" in e for e in fed.events)
    assert fed.history.losses["client1"][1] is None and fed.history.losses["client0"][1] is not None


@pytest.mark.parametrize("split,match", [
    ({"algorithm": "fedsgd"}, r"split.algorithm = 'fedsgd' is invalid \(expected one of 'collafuse', 'fedavg'\)"),
    ({"algorithm": "fedavg", "upload_clip_norm": 1.0}, r"split.upload_clip_norm = 1.0 is invalid .*fedavg"),
    ({"algorithm": "fedavg", "fresh_upload_noise": True}, r"split.fresh_upload_noise = True is invalid .*fedavg"),
])
def test_bad_algorithm_settings_name_the_key_the_value_and_what_is_allowed(split, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(split=split)

