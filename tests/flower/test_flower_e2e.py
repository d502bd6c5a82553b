"""End to end over real Flower processes on 127.0.0.1 (slow: minutes; marked ``flower_e2e``).

- simulation: our own SuperLink in simulation mode, ``flwr run``, the run's server weights equal the in-process
  ones, and nothing is left running;
- deployment: a local CA, a TLS SuperLink with SuperNode authentication, 2 registered SuperNodes each reading only
  its own data folder; an unregistered key is refused; a client dropped mid-run is skipped and rejoins with its
  state; a kill -9 of the ServerApp is resumed from the last per-round checkpoint by the next ``flwr run``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from collafuse.config import config_from_dict  # noqa: E402
from collafuse.flower.launch import (  # noqa: E402
    check_finished,
    descendants,
    find_process,
    launched,
    run_config_arg,
    simulate,
    start_deployment,
    start_flwr_run,
)
from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from collafuse.split.protocol import SERVER  # noqa: E402
from collafuse.split.runner import Federation  # noqa: E402
from conftest import TINY, fixed_secrets, merge  # noqa: E402

pytestmark = pytest.mark.flower_e2e


def _write_config(tmp_path: Path, idx_dataset: Path, **sections) -> Path:
    cfg = config_from_dict(merge(merge(TINY, {"data": {"root": str(idx_dataset), "num_clients": 2}}), sections))
    path = tmp_path / "tiny.toml"
    path.write_text(cfg.to_toml())
    return path


def _round_done(out: Path) -> int:
    ptr = out / "checkpoints" / "LATEST"
    return int(ptr.read_text().strip().split("_")[1]) if ptr.is_file() else 0


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = predicate()
        if v:
            return v
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def test_simulation_runs_the_same_rounds_and_leaves_nothing_running(tmp_path, idx_dataset):
    config = _write_config(tmp_path, idx_dataset)
    out = tmp_path / "sim"
    # Each simulated node keeps its secret in its own state dir; giving both sides the same ones makes the run
    # comparable with an in-process one (by default each node draws its own from OS entropy).
    for i, s in fixed_secrets(2).items():
        (out / "nodes" / f"client{i}").mkdir(parents=True)
        (out / "nodes" / f"client{i}" / "client.secret").write_text(s.hex())
    m = simulate(config, out, samples=2, timeout=600)
    assert m["rounds_done"] == 2 and m["samples_finished"] == {"client0": 2, "client1": 2}
    assert all((out / "nodes" / f"client{i}" / "samples" / "batch_0000.png").is_file() for i in range(2))
    # Equivalence with the in-process runner: the server weights are bit-identical (tolerance 0).
    nodes, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    fed = Federation(config_from_dict(merge(TINY, {"data": {"root": str(idx_dataset), "num_clients": 2}})),
                     secrets=fixed_secrets(2))
    fed.train(progress=False)
    local, _ = fed.server.state()
    assert all(torch.equal(nodes[SERVER][0][k], local[k]) for k in local)
    # Teardown by PID: no process recorded, and none of them alive.
    assert not list((out / "flower-sim" / "pids").glob("*.pid"))


def test_deployment_tls_auth_drop_rejoin_and_server_crash(tmp_path, idx_dataset):
    config = _write_config(tmp_path, idx_dataset, train={"rounds": 4})
    work, out = tmp_path / "deploy", tmp_path / "deploy" / "server"
    with launched(work) as procs:
        dep = start_deployment(procs, config, [], nodes=2, extra_keys=["rogue"])

        # 1. An unregistered key is refused: the SuperNode cannot activate and exits.
        dep.node_dirs["rogue"] = work / "rogue"
        rogue = dep.start_supernode("rogue", 0)
        _wait(lambda: rogue.poll() is not None, 120, "the unregistered SuperNode to be refused")
        assert rogue.returncode != 0
        assert "Failed to activate" in procs.log_tail("rogue", 40) or "2004" in procs.log_tail("rogue", 40)

        # 2. Train 4 rounds; client1's SuperNode stops after round 1 and is started again after round 2 (it needs
        #    a few seconds to reconnect, so it is back for round 3 or 4).
        rc = run_config_arg(config, out, [], samples=2, reply_timeout=60, join_timeout=120)
        run = start_flwr_run(procs, "collafuse-tls", rc)
        _wait(lambda: _round_done(out) >= 1, 300, "round 1")
        procs.stop("site1")
        _wait(lambda: _round_done(out) >= 2, 300, "round 2 without client1")
        dep.start_supernode("site1", 1)
        run.wait(600)
        procs.stop("flwr-run")
        m = check_finished(out, 0, 4, procs)
        losses = m["history"]["losses"]
        assert losses["client1"][0] is not None and losses["client1"][-1] is not None
        assert losses["client1"][1] is None and all(x is not None for x in losses["client0"])
        assert any("client1 skipped" in e for e in m["events"])
        assert m["samples_finished"] == {"client0": 2, "client1": 2}
        # client1 kept its state across the drop: it trained in the rounds it was present for.
        state = json.loads((latest_checkpoint(work / "site1" / "state" / "checkpoints") / "state.json").read_text())
        assert state["rounds_done"] == 4

        # 3. kill -9 of the ServerApp in round 6 of 6: the next flwr run resumes after round 5.
        rc5 = run_config_arg(config, out, ["train.rounds=6"], samples=0, reply_timeout=60, join_timeout=120)
        run = start_flwr_run(procs, "collafuse-tls", rc5)
        _wait(lambda: _round_done(out) >= 5, 300, "round 5")
        link = procs.started["superlink"].pid
        serverapp = _wait(lambda: find_process(link, "flwr-serverapp"), 60, "the ServerApp process")
        os.kill(serverapp, signal.SIGKILL)
        assert _round_done(out) == 5
        procs.stop("flwr-run")
        run = start_flwr_run(procs, "collafuse-tls", rc5)
        run.wait(600)
        procs.stop("flwr-run")
        m = check_finished(out, 0, 6, procs)
        assert m["resumed"] and m["rounds_done"] == 6
        flwr_log = (work / "logs" / "flwr-run.log").read_text()
        assert "resuming after round 5" in flwr_log
        started = [p.pid for p in procs.started.values()]
    # Teardown stopped every process this test started, and their helpers.
    assert not any(Path(f"/proc/{p}").exists() and _alive(p) for p in started)
    assert not list((work / "pids").glob("*.pid"))
    # Each deployed node served its messages from a long-lived site process (flower/site.py), which ended with
    # its SuperNode: client1's first site when its SuperNode stopped, every site at teardown.
    sites = [json.loads(p.read_text())["pid"] for p in work.glob("site*/state/site/*.addr")]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in sites) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sites and not any(_alive(p) for p in sites)
    for name in ("site0", "site1"):
        logs = [p.read_text() for p in (work / name / "state" / "site").glob("*.log")]
        assert logs and all("serving client" in t for t in logs)
        assert all("exiting: watched process ended" in t for t in logs)
        # One site per SuperNode life and run config, however many messages it served: site0 lived through both
        # runs (two run configs), site1 was stopped and started again during the first.
        assert sum(t.count("serving client") for t in logs) == {"site0": 2, "site1": 3}[name]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_descendants_finds_children(tmp_path):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time; "
                          "c=subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); time.sleep(30)"])
    try:
        kids = _wait(lambda: descendants(p.pid), 10, "a child")
        assert len(kids) == 1
    finally:
        for k in descendants(p.pid):
            os.kill(k, signal.SIGKILL)
        p.kill()
        p.wait()
