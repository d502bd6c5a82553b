"""Fault tolerance and hostile input at the role level, with any transport: malformed messages are refused with an
error reply and a log line and never change the server; private labels stay private; a client that drops out
misses rounds without stopping the run and rejoins with its state; repeated instructions are idempotent.

The same behaviour over Flower processes is tested in flower/test_flower_adapter.py and flower/test_flower_e2e.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from collafuse.split.protocol import SERVER, Message, ProtocolError
from collafuse.split.runner import Federation
from collafuse.split.transport import Delivery, InProcessTransport, handle_checked
from conftest import synthetic_clients, tiny_config


def _server_tensors(server) -> dict[str, torch.Tensor]:
    tensors, _ = server.state()
    return {k: v.clone() for k, v in tensors.items()}


@pytest.fixture
def fed():
    cfg = tiny_config()
    f = Federation(cfg, synthetic_clients(cfg, n=16))
    f.train(progress=False)
    return f


def _upload(fed, x=None, y=None, sender="client0"):
    u, yy = fed.clients[0].upload()
    return Message("upload", sender, SERVER, {"x_cut": u.clone() if x is None else x,
                                               "y": yy.clone() if y is None else y},
                   {"round": 9, "cut": fed.clients[0].cut})


def _bad_messages(fed):
    u, y = fed.clients[0].upload()
    nan = u.clone()
    nan[0, 0, 0, 0] = float("nan")
    inf = u.clone()
    inf[1, 0, 3, 3] = float("inf")
    big = fed.cfg.split.max_upload_images + 1
    return {
        "wrong shape": _upload(fed, x=u[:, :, :14, :14].contiguous()),
        "wrong dtype": _upload(fed, x=u.double()),
        "NaN": _upload(fed, x=nan),
        "Inf": _upload(fed, x=inf),
        "label out of range": _upload(fed, y=torch.full_like(y, fed.cfg.num_classes)),
        "negative label": _upload(fed, y=torch.full_like(y, -1)),
        "oversized upload": _upload(fed, x=torch.zeros(big, *fed.cfg.image_shape),
                                    y=torch.zeros(big, dtype=torch.long)),
        "oversized sample batch": Message("sample_request", "client0", SERVER,
                                          {"y": torch.zeros(fed.cfg.sample.batch_size + 1, dtype=torch.long)}),
        "unknown kind": Message("gradient", "client0", SERVER),
        "not a client": _upload(fed, sender="client7"),
    }


@pytest.mark.parametrize("case", ["wrong shape", "wrong dtype", "NaN", "Inf", "label out of range", "negative label",
                                  "oversized upload", "oversized sample batch", "unknown kind", "not a client"])
def test_malformed_message_gets_an_error_reply_and_changes_nothing(fed, case, caplog):
    msg = _bad_messages(fed)[case]
    before = _server_tensors(fed.server)
    uploads_before = {k: v[0].clone() for k, v in fed.server.uploads.items()}
    n_log = len(fed.log.records)
    reply = handle_checked(fed.server, msg, fed.log)
    assert reply.kind == "error" and reply.receiver == msg.sender and reply.sender == SERVER
    assert reply.meta["reason"] and "\n" not in reply.meta["reason"]
    assert "refused" in caplog.text  # the log line
    assert fed.log.records[n_log]["rejected"] == reply.meta["reason"]  # the audit trail says so too
    after = _server_tensors(fed.server)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: v[0] for k, v in fed.server.uploads.items()}.keys() == uploads_before.keys()
    assert all(torch.equal(fed.server.uploads[k][0], uploads_before[k]) for k in uploads_before)
    # The server still trains normally afterwards: nothing was poisoned.
    assert math.isfinite(fed.server.train(2))


def test_error_reasons_name_the_problem(fed):
    msgs = _bad_messages(fed)
    reasons = {case: handle_checked(fed.server, m).meta["reason"] for case, m in msgs.items()}
    assert "image shape [1, 14, 14]" in reasons["wrong shape"]
    assert "torch.float64" in reasons["wrong dtype"]
    assert "NaN or Inf" in reasons["NaN"] and "NaN or Inf" in reasons["Inf"]
    assert f"allowed: [0, {fed.cfg.num_classes - 1}]" in reasons["label out of range"]
    assert "allowed: 1 to" in reasons["oversized upload"] and "allowed: 1 to" in reasons["oversized sample batch"]
    assert "not allowed" in reasons["unknown kind"]
    assert "not a client of this run" in reasons["not a client"]


def test_a_client_cannot_sample_another_clients_private_labels(fed):
    own = sorted(fed.server.client_labels[0])
    foreign = sorted(fed.server.client_labels[1] - fed.server.client_labels[0])
    assert own and foreign
    ok = handle_checked(fed.server, Message("sample_request", "client0", SERVER, {"y": torch.tensor(own[:4])}))
    assert ok.kind == "sample_response"
    bad = handle_checked(fed.server, Message("sample_request", "client0", SERVER, {"y": torch.tensor(foreign[:1])}))
    assert bad.kind == "error" and "never uploaded" in bad.meta["reason"]
    # In process the request is raised at the caller; the transport logged it.
    with pytest.raises(ProtocolError, match="never uploaded"):
        fed.transport.request(Message("sample_request", "client0", SERVER, {"y": torch.tensor(foreign[:1])}))


def test_shared_labels_may_be_requested_by_anyone():
    cfg = tiny_config(sample={"shared_labels": list(range(10))})
    f = Federation(cfg, synthetic_clients(cfg, n=16))
    f.train(progress=False)
    foreign = sorted(f.server.client_labels[1] - f.server.client_labels[0])
    reply = handle_checked(f.server, Message("sample_request", "client0", SERVER, {"y": torch.tensor(foreign[:4])}))
    assert reply.kind == "sample_response" and reply.arrays["x_cut"].shape[0] == len(foreign[:4])


def test_private_labels_survive_a_restart(tmp_path):
    cfg = tiny_config()
    f = Federation(cfg, synthetic_clients(cfg, n=16))
    f.train(tmp_path, progress=False)
    g = Federation(cfg, synthetic_clients(cfg, n=16))
    assert g.restore(tmp_path) and not g.server.uploads  # uploads are not in checkpoints; the label sets are
    assert g.server.client_labels == f.server.client_labels
    foreign = sorted(g.server.client_labels[1] - g.server.client_labels[0])
    bad = handle_checked(g.server, Message("sample_request", "client0", SERVER, {"y": torch.tensor(foreign[:1])}))
    assert bad.kind == "error"


class FlakyTransport(InProcessTransport):
    """In-process delivery, except that the nodes in ``down`` do not answer."""

    def __init__(self, roles, log):
        super().__init__(roles, log)
        self.down: set[str] = set()

    def exchange(self, msgs):
        up = InProcessTransport.exchange
        return [Delivery(m, error=f"unavailable: {m.receiver} dropped out") if m.receiver in self.down
                else up(self, [m])[0] for m in msgs]


def test_a_dropped_client_misses_rounds_and_rejoins_with_its_state():
    cfg = tiny_config(train={"rounds": 5})
    f = Federation(cfg, synthetic_clients(cfg, n=16))
    f.transport = FlakyTransport([f.server, *f.clients], f.log)
    f.train(progress=False, on_round=lambda r: f.transport.down.add("client1") if r == 1 else
            (f.transport.down.discard("client1") if r == 3 else None))
    c0, c1 = f.clients
    assert f.history.rounds_done == 5
    assert [x is None for x in f.history.losses["client1"]] == [False, True, True, False, False]
    assert all(x is not None for x in f.history.losses["client0"] + f.history.losses[SERVER])
    assert c0.learner.steps == 5 * cfg.train.client_steps
    assert c1.learner.steps == 3 * cfg.train.client_steps  # its state kept going from where it stopped
    assert c1.rounds_done == 5
    assert sum("client1 skipped" in e for e in f.events) == 2


def test_a_client_refusing_an_instruction_sits_the_round_out(fed):
    class Refuser:
        node_id = "client1"

        def handle(self, msg):
            raise ProtocolError("disk full")

    fed.transport.roles["client1"] = Refuser()  # the same transport, one role replaced
    r = fed.history.rounds_done + 1
    losses = fed.run_round(r)
    assert math.isnan(losses["client1"]) and math.isfinite(losses["client0"]) and math.isfinite(losses[SERVER])
    assert any("client1 skipped" in e for e in fed.events)


def test_a_repeated_train_request_is_answered_without_training_again(fed):
    c = fed.clients[0]
    r = fed.history.rounds_done + 1
    first = c.handle(Message("train_request", SERVER, c.node_id, meta={"round": r, "steps": 2}))
    steps = c.learner.steps
    again = c.handle(Message("train_request", SERVER, c.node_id, meta={"round": r, "steps": 2}))
    assert c.learner.steps == steps and again.meta == first.meta


def test_sampling_on_server_orders_keeps_the_final_images_on_the_client(fed):
    """The Flower flow: sample_order -> sample_request -> sample_response -> sample_done (in process here)."""
    c = fed.clients[1]
    req = c.handle(Message("sample_order", SERVER, c.node_id, meta={"n": 3}))
    assert req.kind == "sample_request" and len(req.arrays["y"]) == 3
    resp = handle_checked(fed.server, req, fed.log)
    done = handle_checked(c, resp, fed.log)
    assert done.kind == "sample_done" and done.meta == {"n": 3}
    assert len(c.finished) == 1 and c.finished[0]["x0"].shape == (3, *fed.cfg.image_shape)
    assert torch.equal(c.finished[0]["y"], req.arrays["y"])
    # A hand-off nobody asked for is refused.
    stray = handle_checked(c, resp, fed.log)
    assert stray.kind == "error" and "awaits 0" in stray.meta["reason"]
