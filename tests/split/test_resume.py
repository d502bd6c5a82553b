"""Exact resume: N rounds + stop + resume + N rounds == 2N rounds straight; atomic, verified checkpoints."""

from __future__ import annotations

import pytest
import torch

import collafuse.split.checkpoint as checkpoint
from collafuse.split.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from collafuse.split.runner import Federation
from conftest import fixed_secrets, synthetic_clients, tiny_config


def _fed(rounds: int, **sections) -> Federation:
    cfg = tiny_config(train={"rounds": rounds, "checkpoint_every": 1}, **sections)
    # The same explicit secrets in every federation of this file: each is compared with another bit for bit.
    return Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(cfg.data.num_clients))


def _assert_same_state(a: Federation, b: Federation) -> None:
    sa, sb = a.node_states(), b.node_states()
    assert sa.keys() == sb.keys()
    for node in sa:
        ta, ma = sa[node]
        tb, mb = sb[node]
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{node}:{k} differs"
        assert ma == mb
    assert a.history.losses == b.history.losses


@pytest.fixture
def straight():
    fed = _fed(4)
    fed.train(progress=False)
    return fed


def test_stop_and_resume_equals_straight_run(straight, tmp_path):
    first = _fed(2)
    first.train(tmp_path, progress=False)
    resumed = _fed(4)
    assert resumed.restore(tmp_path)
    assert resumed.history.rounds_done == 2
    resumed.train(tmp_path, progress=False)
    _assert_same_state(resumed, straight)
    # and the samples drawn afterwards agree too
    torch.testing.assert_close(resumed.sample(0, 2)["x0"], straight.sample(0, 2)["x0"], rtol=0, atol=0)


def test_interrupt_loses_at_most_the_current_round(straight, tmp_path):
    fed = _fed(4)

    def interrupt(round_):
        if round_ == 3:
            raise KeyboardInterrupt  # Ctrl-C right after round 3's checkpoint...

    with pytest.raises(KeyboardInterrupt):
        fed.train(tmp_path, progress=False, on_round=interrupt)
    resumed = _fed(4)
    resumed.restore(tmp_path)
    assert resumed.history.rounds_done == 3
    resumed.train(tmp_path, progress=False)
    _assert_same_state(resumed, straight)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    fed = _fed(3)
    fed.train(tmp_path, progress=False, on_round=lambda r: None)
    before = latest_checkpoint(tmp_path)
    real_save = checkpoint.save_file
    calls = []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")  # dies after writing the first node's file of the new round
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", dying_save)
    fed.cfg.train.rounds = 4
    with pytest.raises(OSError):
        fed.train(tmp_path, progress=False)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == before
    load_checkpoint(before, fed.cfg.identity_hash())  # still complete and verified


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path):
    fed = _fed(1)
    fed.train(tmp_path, progress=False)
    path = latest_checkpoint(tmp_path)

    other = _fed(1, split={"cut": 3})
    with pytest.raises(CheckpointError, match="different configuration"):
        other.restore(tmp_path)

    node_file = path / "client0.safetensors"
    data = bytearray(node_file.read_bytes())
    data[-10] ^= 0xFF
    node_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        _fed(1).restore(tmp_path)

    (tmp_path / "LATEST").write_text("round_999999\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        _fed(1).restore(tmp_path)
