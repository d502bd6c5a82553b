"""Bounds in both directions (docs/protocol.md, "Bounds"): a client refuses what a hostile server asks beyond the
client's own configuration, the server refuses what a hostile client asks beyond its quotas; each refusal is one
logged line naming the peer, the value and the limit, and the federation goes on."""

from __future__ import annotations

import logging

import pytest
import torch

from collafuse.config import ConfigError
from collafuse.split.client import Client
from collafuse.split.protocol import SERVER, Message
from collafuse.split.runner import Federation
from collafuse.split.transport import handle_checked
from conftest import fixed_secrets, synthetic_clients, tiny_config


@pytest.fixture
def fed():
    cfg = tiny_config()
    f = Federation(cfg, synthetic_clients(cfg), secrets=fixed_secrets(2))
    f.train(progress=False)
    return f


def _state(client: Client) -> dict:
    tensors, meta = client.state()
    return {"meta": meta, **{k: v.clone() for k, v in tensors.items()}}


def _same(a: dict, b: dict) -> bool:
    return a["meta"] == b["meta"] and all(torch.equal(a[k], b[k]) for k in a if k != "meta")


# -- a hostile server ------------------------------------------------------------------------------------------------
def test_a_client_refuses_more_steps_than_its_own_config(fed, caplog):
    c = fed.clients[0]
    before = _state(c)
    with caplog.at_level(logging.WARNING):
        reply = handle_checked(c, Message("train_request", SERVER, "client0", meta={"round": 99, "steps": 10**7}))
    assert reply.kind == "error"
    assert reply.meta["reason"] == ("train_request from server asks client0 for 10000000 steps (allowed: at most 2, "
                                    "its train.client_steps)")
    assert "refused 'train_request' from 'server'" in caplog.text and "10000000" in caplog.text
    assert _same(before, _state(c))  # nothing trained, nothing changed
    ok = handle_checked(c, Message("train_request", SERVER, "client0", meta={"round": 99, "steps": 2}))
    assert ok.kind == "train_reply"  # its own limit is fine


def test_a_client_refuses_hand_offs_it_never_asked_for_or_at_another_cut(fed):
    c = fed.clients[1]
    x = torch.zeros(4, *fed.cfg.image_shape)
    unasked = handle_checked(c, Message("sample_response", SERVER, "client1", {"x_cut": x}, {"cut": 6}))
    assert unasked.kind == "error" and "awaits 0" in unasked.meta["reason"]
    order = handle_checked(c, Message("sample_order", SERVER, "client1", meta={"n": 4}))
    assert order.kind == "sample_request"
    wrong = handle_checked(c, Message("sample_response", SERVER, "client1", {"x_cut": x}, {"cut": 15}))
    assert wrong.kind == "error"
    assert wrong.meta["reason"] == ("sample_response from server hands client1 an x_cut at step 15 (allowed: 6, its "
                                    "own cut)")
    assert c._pending_y is not None and not c.finished  # still waiting for the right one
    right = handle_checked(c, Message("sample_response", SERVER, "client1", {"x_cut": x}, {"cut": 6}))
    assert right.kind == "sample_done" and right.meta["n"] == 4


def test_a_fedavg_client_refuses_more_steps_than_its_own_config():
    cfg = tiny_config(split={"algorithm": "fedavg"})
    f = Federation(cfg, synthetic_clients(cfg), secrets=fixed_secrets(2))
    w = f.server.global_weights()
    reply = handle_checked(f.clients[0], Message("model_push", SERVER, "client0", {"weights": w},
                                                 {"round": 1, "steps": 3}))
    assert reply.kind == "error" and "(allowed: at most 2, its train.client_steps)" in reply.meta["reason"]
    assert f.clients[0].pushed_round == 0


# -- a hostile client ------------------------------------------------------------------------------------------------
def test_the_server_enforces_a_sampling_quota_per_client_per_round(caplog):
    cfg = tiny_config(split={"cut": 6, "sample_quota": 8}, sample={"n_per_client": 4, "batch_size": 4},
                      eval={"n_samples": 8})
    f = Federation(cfg, synthetic_clients(cfg), secrets=fixed_secrets(2))
    f.train(progress=False)
    ask = Message("sample_request", "client0", SERVER, {"y": torch.zeros(4, dtype=torch.int64)})
    assert [handle_checked(f.server, ask).kind for _ in range(2)] == ["sample_response"] * 2
    with caplog.at_level(logging.WARNING):
        third = handle_checked(f.server, ask)
    assert third.kind == "error"
    assert third.meta["reason"] == ("sample_request from client0 asks for 4 hand-offs after 8 in round 2 (allowed: 8 "
                                    "per client per round, split.sample_quota)")
    assert "refused 'sample_request' from 'client0'" in caplog.text
    other = Message("sample_request", "client1", SERVER, {"y": torch.full((4,), 9, dtype=torch.int64)})
    assert handle_checked(f.server, other).kind == "sample_response"  # a quota per client: the others go on
    f.server.start_round(3)
    assert handle_checked(f.server, ask).kind == "sample_response"  # and per round


def test_the_quota_cannot_be_below_what_the_run_itself_samples():
    with pytest.raises(ConfigError, match=r"split.sample_quota = 10 is invalid \(allowed: an integer >= 36"):
        tiny_config(split={"cut": 6, "sample_quota": 10}, sample={"n_per_client": 36}, eval={"n_samples": 20})


def test_a_second_view_is_refused_and_its_client_dropped_while_the_federation_goes_on(caplog):
    """Without fresh upload noise a client gives one view per run: a re-send of the same bytes is fine, a different
    view (which would let the server average the noise away) is refused, also after a server restart."""
    cfg = tiny_config(train={"rounds": 3})
    data = synthetic_clients(cfg)
    f = Federation(cfg, data, secrets=fixed_secrets(2))
    f.run_round(1)
    u, y = f.clients[0].upload()
    same = Message("upload", "client0", SERVER, {"x_cut": u.clone(), "y": y.clone()}, {"round": 2, "cut": 6})
    assert handle_checked(f.server, same) is None  # accepted, nothing new
    other = Message("upload", "client0", SERVER, {"x_cut": u + 0.01, "y": y.clone()}, {"round": 2, "cut": 6})
    reply = handle_checked(f.server, other)
    assert reply.kind == "error" and reply.meta["reason"] == (
        "upload from client0 is a second, different view of its images (allowed: one view per run, re-sent "
        "unchanged; split.fresh_upload_noise = true for one per round)")
    assert torch.equal(f.server.uploads[0][0], u)  # the pool still holds the first view
    # across a restart the server still knows the view it accepted (the checkpoint keeps its digest)
    tensors, meta = f.server.state()
    restarted = Federation(cfg, data, secrets=fixed_secrets(2))
    restarted.server.load_state(tensors, meta)
    assert handle_checked(restarted.server, other).kind == "error"
    assert handle_checked(restarted.server, same) is None
    # a client whose new view is refused leaves; the others go on
    restarted.server.uploads.clear()
    restarted.clients[0]._upload = (1, u + 0.01, y)  # a client that lost its secret, or lies
    with caplog.at_level(logging.WARNING):
        restarted.run_round(2)
        restarted.run_round(3)
    assert restarted.dropped == ["client0"] and restarted.client_ids == ["client1"]
    assert "client0 dropped from the federation" in caplog.text
    assert restarted.history.losses["client1"][-1] is not None and restarted.history.losses["client0"][-1] is None


def test_with_fresh_noise_one_new_view_per_round():
    cfg = tiny_config(split={"cut": 6, "fresh_upload_noise": True}, train={"rounds": 2})
    f = Federation(cfg, synthetic_clients(cfg), secrets=fixed_secrets(2))
    f.run_round(1)
    u, y = f.clients[0].upload(2)
    f.server.start_round(2)
    first = Message("upload", "client0", SERVER, {"x_cut": u, "y": y}, {"round": 2, "cut": 6})
    assert handle_checked(f.server, first) is None
    second = Message("upload", "client0", SERVER, {"x_cut": u + 0.01, "y": y}, {"round": 2, "cut": 6})
    reply = handle_checked(f.server, second)
    assert reply.kind == "error" and reply.meta["reason"] == (
        "upload from client0 is a second new view in round 2 (allowed: one per round with split.fresh_upload_noise)")
