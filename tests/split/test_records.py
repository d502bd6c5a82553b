"""The run's records stay true across crashes: a run killed with SIGKILL at three points (during the uploads, in
the middle of a round, during sampling) and resumed holds, in its message log, loss curves and metrics.json, each
round once; what crossed again after the restart is reported apart; ``seq`` rises strictly.

The reference is a run that was never killed, with the same client secrets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from collafuse.split.protocol import Message
from collafuse.split.transport import MessageLog, uncounted
from conftest import TINY, merge, write_secrets

# Runs collafuse's own CLI, with MessageLog.append patched to SIGKILL the process right after it logged the record
# that matches the condition (argv[1], JSON: kind, sender and optionally round / the how-manieth match). With
# "torn", half a line is written first, as when a kill lands inside a write.
_KILLER = r"""
import json, os, signal, sys
from collafuse.split import transport
cond = json.loads(sys.argv[1])
orig = transport.MessageLog.append
seen = [0]
def append(self, msg, rejected=None):
    orig(self, msg, rejected)
    if msg.kind != cond["kind"] or msg.sender != cond["sender"]:
        return
    if "round" in cond and msg.meta.get("round") != cond["round"]:
        return
    seen[0] += 1
    if seen[0] < cond.get("nth", 1):
        return
    if cond.get("torn"):
        with self.path.open("a") as f:
            f.write('{"seq": 99999, "kind": "tra')
    os.kill(os.getpid(), signal.SIGKILL)
transport.MessageLog.append = append
from collafuse.cli import main
sys.exit(main(sys.argv[2:]))
"""

ROUNDS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory, idx_dataset_module):
    """The straight run and the three killed-and-resumed runs (module scope: they are shared by the tests)."""
    tmp = tmp_path_factory.mktemp("records")
    toml = tmp / "tiny.toml"
    toml.write_text(tomli_w.dumps(merge(TINY, {"data": {"root": str(idx_dataset_module)},
                                               "train": {"rounds": ROUNDS, "checkpoint_every": 2}})))
    secrets = write_secrets(tmp / "secrets.toml", 2)
    args = ["run", str(toml), "--quiet", "--client-secrets", str(secrets)]
    straight = tmp / "straight"
    assert subprocess.run([sys.executable, "-m", "collafuse", *args, "--out", str(straight)],
                          capture_output=True).returncode == 0
    points = {
        "uploads": {"kind": "upload", "sender": "client0", "round": 1},  # before any checkpoint, client1 not asked
        "mid_round": {"kind": "train_reply", "sender": "client0", "round": 5, "torn": True},  # checkpoint: round 4
        "sampling": {"kind": "sample_request", "sender": "client1"},  # training done, client0 sampled already
        # the same kill, with the uploads in the server's memory only: the restarted server must ask for them again
        "mid_round_memory": {"kind": "train_reply", "sender": "client0", "round": 5},
    }
    out = {"straight": straight}
    for name, cond in points.items():
        run = tmp / name
        extra = ["--set", "split.upload_pool=memory"] if name.endswith("_memory") else []
        killed = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(cond), *args, *extra, "--out", str(run)],
                                capture_output=True)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
        resumed = subprocess.run([sys.executable, "-m", "collafuse", *args, *extra, "--out", str(run), "--resume"],
                                 capture_output=True)
        assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
        out[name] = run
    return out


@pytest.fixture(scope="module")
def idx_dataset_module(tmp_path_factory):
    import numpy as np

    from conftest import write_idx

    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 120), ("t10k", 40)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    return root


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "message_log.jsonl").read_text().splitlines()]


def _what(record: dict) -> tuple:
    """A record without its seq and time: what crossed."""
    return tuple(json.dumps(record.get(k), sort_keys=True)
                 for k in ("kind", "sender", "receiver", "arrays", "bytes", "meta", "digest", "rejected"))


POINTS = ["uploads", "mid_round", "sampling", "mid_round_memory"]


@pytest.mark.parametrize("point", POINTS)
def test_a_killed_run_counts_each_round_once(runs, point):
    killed, straight = _records(runs[point]), _records(runs["straight"])
    counted = [r for r, why in zip(killed, uncounted(killed)) if why is None]
    assert [_what(r) for r in counted] == [_what(r) for r in straight]
    seqs = [r["seq"] for r in killed]
    assert all(b > a for a, b in zip(seqs, seqs[1:])), "seq must rise strictly"
    assert any(r.get("replayed") for r in killed), "the kill left records past the checkpoint"
    # what was marked replayed is one block: the records past the checkpoint, before the resumed process's first
    replayed = [i for i, r in enumerate(killed) if r.get("replayed")]
    assert replayed == list(range(replayed[0], replayed[-1] + 1))


@pytest.mark.parametrize("point", POINTS)
def test_loss_curves_and_metrics_match_the_run_that_was_never_killed(runs, point):
    a = json.loads((runs[point] / "metrics.json").read_text())
    b = json.loads((runs["straight"] / "metrics.json").read_text())
    assert a["losses"] == b["losses"] and all(len(v) == ROUNDS for v in a["losses"].values())
    la, lb = a["message_log"], b["message_log"]
    assert {k: la[k] for k in ("messages", "client_to_server_bytes", "server_to_client_bytes", "by_kind",
                               "per_client")} == {k: lb[k] for k in ("messages", "client_to_server_bytes",
                                                                      "server_to_client_bytes", "by_kind",
                                                                      "per_client")}
    assert lb["replayed"]["messages"] == 0 and lb["resent_uploads"]["messages"] == 0
    assert la["resent_uploads"]["messages"] == (2 if point == "mid_round_memory" else 0)
    assert la["replayed"]["messages"] > 0
    assert "After restarts" in (runs[point] / "report.md").read_text()
    assert "After restarts" not in (runs["straight"] / "report.md").read_text()


def test_a_restarted_server_reuses_its_stored_uploads(runs):
    """With the uploads on disk (the default) the restarted server trains on its stored pool: after the kill in
    round 5 no client is asked to upload again, and the run still ends where the straight one does."""
    records = _records(runs["mid_round"])
    resumed_from = min(r["seq"] for r in records if r.get("replayed"))
    assert not [r for r in records if r["seq"] > resumed_from and r["kind"] in ("upload_request", "upload")]
    manifests = sorted((runs["mid_round"] / "server" / "uploads").glob("client*/manifest.json"))
    assert [json.loads(m.read_text())["client"] for m in manifests] == [0, 1]


def test_the_uploads_resent_after_a_restart_are_reported_apart(runs):
    """With the uploads in memory only, the restarted server asks again: the clients re-send the same bytes (the
    view is drawn once), and those are counted apart from the first uploads."""
    la = json.loads((runs["mid_round_memory"] / "metrics.json").read_text())["message_log"]
    records = _records(runs["mid_round_memory"])
    resent = [r for r in records if r.get("resent")]
    assert la["resent_uploads"]["messages"] == len(resent) == la["resent_uploads"]["requests"] == 2
    first = [r for r in _records(runs["straight"]) if r["kind"] == "upload"]
    assert {(r["sender"], r["digest"]) for r in resent} <= {(r["sender"], r["digest"]) for r in first}
    assert la["by_kind"]["upload"]["messages"] == len(first)  # the first uploads, each once


def test_a_torn_last_line_is_dropped_and_seq_goes_on(tmp_path):
    path = tmp_path / "log.jsonl"
    log = MessageLog(path)
    for r in (1, 2):
        log.append(Message("train_request", "server", "client0", meta={"round": r, "steps": 1}))
    with path.open("a") as f:
        f.write('{"seq": 2, "kind": "train_re')  # a kill inside the write
    log = MessageLog(path)
    assert [r["meta"]["round"] for r in log.records] == [1, 2]
    assert path.read_text().endswith("}\n")
    log.append(Message("train_request", "server", "client0", meta={"round": 3, "steps": 1}))
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_replayed_and_resent_records_leave_the_totals(tmp_path):
    """Hand-counted: two uploads of 4x1x2x2 float32 (64 bytes) + 4 int64 labels (32 bytes) = 96 bytes each."""
    x, y = torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)
    log = MessageLog(tmp_path / "log.jsonl")
    up = Message("upload", "client0", "server", {"x_cut": x, "y": y}, {"round": 1, "cut": 3})
    log.append(up)
    log.append(Message("train_request", "server", "client0", meta={"round": 2, "steps": 1}))
    assert log.replay_after(1) == 1  # the checkpoint was written after the upload
    log.append(up)  # the server restarted without the upload: the client sends the same bytes again
    other = Message("upload", "client0", "server", {"x_cut": x + 1, "y": y}, {"round": 2, "cut": 3})
    log.append(other)  # a new view (fresh noise): counted
    s = log.summary()
    assert s["by_kind"]["upload"] == {"messages": 2, "bytes": 192}
    assert s["replayed"] == {"messages": 1, "bytes": 0}
    assert s["resent_uploads"] == {"messages": 1, "requests": 0, "bytes": 96}
    assert s["messages"] == 2 and s["client_to_server_bytes"] == 192
    reread = MessageLog(tmp_path / "log.jsonl")
    assert [r.get("replayed", False) for r in reread.records] == [False, True, False, False]
    assert [r.get("resent", False) for r in reread.records] == [False, False, True, False]


def test_each_start_that_trains_is_a_labelled_segment(runs):
    """metrics.json says what trained which rounds: the straight run one segment from round 1; the run killed in
    round 5 (last checkpoint: round 4) a second from round 5; the run killed while sampling none more (its resume
    trained nothing); the run killed before any checkpoint started over, so one. Each names this machine."""
    import os

    def segments(name):
        return json.loads((runs[name] / "metrics.json").read_text())["training_segments"]

    assert [s["from_round"] for s in segments("straight")] == [1]
    assert [s["from_round"] for s in segments("mid_round")] == [1, 5]
    assert [s["from_round"] for s in segments("sampling")] == [1]
    assert [s["from_round"] for s in segments("uploads")] == [1]
    seg = segments("mid_round")[1]
    assert (seg["device"], seg["precision"], seg["gpu"], seg["torch"]) == ("cpu", "fp32", None, torch.__version__)
    assert seg["logical_cpus"] == os.cpu_count() and seg["cpu"] and seg["torch_threads"] >= 1
    cpuinfo = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert ("avx512f" in seg["cpu_flags"]) == ("avx512f" in cpuinfo)  # the VM may name only "AMD EPYC"
    report = (runs["mid_round"] / "report.md").read_text()
    assert "- trained from round 1 on `cpu`, CPU" in report and "- trained from round 5 on `cpu`" in report
