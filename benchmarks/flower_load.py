"""Load test of CollaFuse over Flower's simulation engine: 5, 10 and 20 simulated clients, 2 of them dropping.

What is run
-----------
For each client count N (``--clients``, default 5,10,20) one Flower simulation (``flwr.simulation.run_simulation``,
Ray backend) of ``--rounds`` rounds (default 5) on Fashion-MNIST, each in a fresh subprocess of this script (so
RSS, Ray's start and its teardown belong to one N). The config is ``configs/flower.toml`` with overrides: N
clients, ``data.partition = "iid"`` (class_groups allows at most 10 clients), ``--images`` training images per
client, its small UNets ([16, 32]), 5 server + 5 client steps per round, ``--samples`` DDIM-10 samples per client
at the end.

The server side is the production ``collafuse.flower.task.run_server`` (the ServerApp's whole body). The client
side is the production ``ClientNode``, wrapped in a ClientApp defined here, not in the app: for ``--drops`` clients
chosen with a seeded RNG, every message of one randomly chosen round in 1..R-1 fails (different rounds for
different clients while there are enough). Drop modes (``--drop-modes``, cycled over the dropped clients):
``error``, the ClientApp raises at once (Flower sends the server an error reply); ``timeout``, it does not answer:
it sleeps past the transport's ``reply-timeout`` (``--reply-timeout``, default 60 s), then raises (the late error
reply is never pulled). Neither touches the client's state, so the next round it is back where it was.

Ray: ``client_resources.num_cpus = --cpus-per-client`` (default 1) on ``ray.init(num_cpus=--ray-cpus)`` (default:
the machine's cores) sets how many ClientApp actors run, i.e. how many clients train at once; ``run_simulation``'s
own default (2 CPUs per client) would give one actor on a 2-core machine. The reply-timeout must exceed a whole
exchange of N clients through those actors (about 17 s for N = 20 with one actor busy hanging), or healthy clients
are dropped.

What is measured (per N, per round)
-----------------------------------
- round seconds: the ServerApp's own clock (``metrics.json`` ``round_seconds_this_session``: from all clients
  joined, or the previous round's end, to this round's checkpoint);
- server RSS: in simulation the ServerApp runs in a thread of the process that calls ``run_simulation`` (with the
  in-memory SuperLink state and Ray's driver); a sampler thread reads that process's RSS every 0.2 s (psutil),
  giving the RSS at each round's end and the peak within the round; ``VmHWM`` is the process's lifetime peak. The
  RSS of the whole process tree (plus Ray's GCS, raylet and the ClientApp actors) is recorded beside it;
- bytes each way: the array payload bytes of the server's message log (``message_log.jsonl``, as in
  ``metrics.json`` "messages"), and the size of each Flower message's content as Flower serialises it
  (``RecordDict`` protobuf, measured on the ServerApp's Grid calls): what a deployment would put on the wire,
  envelope included;
- drop events: ``metrics.json`` "events".

Checks (PASS/FAIL lines; exit 1 if any fails): the run finishes all rounds; the server's final checkpoint exists
and verifies; every client joined and its upload reached the server; every client's state directory has a verified
checkpoint whose ``rounds_done`` is the last round and whose step count equals the rounds the server counted it in
times the client steps (no round lost, none trained twice); the dropped clients sat out exactly their drop rounds
and trained again afterwards; no other client was skipped; no message was refused; every client finished its
samples; Ray left no process behind.

    .venv/bin/python benchmarks/flower_load.py --out results/flower-load          # ~9 minutes on 2 CPU cores
    .venv/bin/python benchmarks/flower_load.py --clients 5 --rounds 3 --out /tmp/fl
    .venv/bin/python benchmarks/flower_load.py --out results/flower-load --reanalyse   # redo checks/plot, no run

Run directories (server and client state, logs, the raw samples as ``bench.json``) go to ``--work``
(default runs/flower-load/, not committed); the plot, metrics.json and COMMAND.md to ``--out``.

Outside the test suite's time budget: a measurement with checks, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


# -- the run's configuration ------------------------------------------------------------------------------------------
def overrides(a, n: int) -> list[str]:
    return [f"data.num_clients={n}", f"data.partition={a.partition}", f"data.max_train_per_client={a.images}",
            "data.max_test_per_client=50", f"train.rounds={a.rounds}", f"train.client_steps={a.client_steps}",
            f"train.server_steps={a.server_steps}", f"sample.n_per_client={max(a.samples, 1)}",
            "sample.ddim_steps=10", f"sample.batch_size={max(a.samples, 1)}"]  # run config "samples" may be 0


def drop_plan(n: int, rounds: int, drops: int, modes: list[str], seed: int) -> dict[int, dict]:
    """Which clients drop, in which round(s), how: seeded by (seed, n). Drop rounds are in 1..R-1, so every dropped
    client has a later round to come back in."""
    rng = random.Random(f"{seed}-{n}")
    if rounds < 2 or drops == 0:
        return {}
    clients = sorted(rng.sample(range(n), min(drops, n)))
    # Different rounds for different clients while there are enough, so each drop's cost shows on its own.
    pool = list(range(1, rounds))
    picks = rng.sample(pool, len(clients)) if len(clients) <= len(pool) else [rng.choice(pool) for _ in clients]
    return {c: {"rounds": [r], "mode": modes[k % len(modes)]} for k, (c, r) in enumerate(zip(clients, picks))}


# -- one N: runs in its own process ------------------------------------------------------------------------------------
def make_client_app(run_config: dict, drops: dict[int, dict], hang_s: float):
    """The production ClientApp's body (a ClientNode per message) behind a drop switch for the chosen clients."""
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    app = ClientApp()
    plan = {int(k): v for k, v in drops.items()}

    @app.query("collafuse")
    def collafuse(msg, context):
        import torch

        from collafuse.flower.task import ClientNode, config_from_run_config, encode_reply

        torch.set_num_threads(1)
        cid = int(context.node_config["partition-id"])
        rnd = msg.content.config_records["envelope"].get("meta.round")
        p = plan.get(cid)
        if p is not None and rnd is not None and int(rnd) in p["rounds"]:
            if p["mode"] == "timeout":
                time.sleep(hang_s)  # no answer within the server's reply-timeout
            raise RuntimeError(f"load test: client{cid} is down in round {rnd} ({p['mode']})")
        node = ClientNode(config_from_run_config(run_config), context.node_config, str(run_config["out"]))
        return Message(encode_reply(node.handle(msg.content)), reply_to=msg)

    return app


class MeasuredGrid:
    """The ServerApp's Grid, passed through, with the Flower-serialised size of every message pushed and pulled."""

    def __init__(self, grid, wire: list):
        self._grid, self._wire = grid, wire

    def __getattr__(self, name):
        return getattr(self._grid, name)

    @staticmethod
    def _size(m) -> int:
        from flwr.common.serde import recorddict_to_proto

        try:
            return 0 if m.has_error() else recorddict_to_proto(m.content).ByteSize()
        except Exception:  # noqa: BLE001 - a measurement must never break the run
            return 0

    def push_messages(self, messages):
        messages = list(messages)
        now = time.time()
        self._wire.extend({"time": now, "dir": "down", "bytes": self._size(m)} for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        got = list(self._grid.pull_messages(message_ids))
        now = time.time()
        self._wire.extend({"time": now, "dir": "up", "bytes": self._size(r), "error": r.has_error()} for r in got)
        return got


class Sampler(threading.Thread):
    """RSS of this process (the one running the ServerApp) and of its whole process tree, every ``interval`` s."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval, self.samples, self.stop = psutil.Process(), interval, [], threading.Event()

    def snapshot(self, breakdown: bool = False) -> dict:
        import psutil

        rss = self.proc.memory_info().rss
        me = "server process (ServerApp, SuperLink state, Ray driver)"
        tree, actors, procs = rss, 0, {me: rss}
        cpu = {me: sum(self.proc.cpu_times()[:2])} if breakdown else {}
        for c in self.proc.children(recursive=True):
            try:
                r, label = c.memory_info().rss, _label(c)
                if breakdown:
                    cpu[label] = cpu.get(label, 0.0) + sum(c.cpu_times()[:2])
            except psutil.Error:
                continue
            tree += r
            actors += label.startswith("ray::ClientAppActor")
            procs[label] = procs.get(label, 0) + r
        snap = {"time": time.time(), "rss": rss, "tree_rss": tree, "actors": actors}
        if breakdown:  # at round ends: RSS and CPU seconds so far by process, and the machine's load
            snap.update(procs=procs, cpu_s=cpu, loadavg=os.getloadavg()[0])
        return snap

    def run(self):
        while not self.stop.is_set():
            self.samples.append(self.snapshot())
            self.stop.wait(self.interval)


def _label(p) -> str:
    """A short name for one of Ray's processes: its title (ray::ClientAppActor, ray::IDLE), binary or script."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split(".")[0].split()[0]
    if p.name().startswith("python"):
        script = next((Path(x).name for x in cmd[1:] if x.endswith(".py")), None)
        return f"python {script}" if script else "python"
    return p.name()


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def run_one(a) -> int:
    """One simulation of ``a.one`` clients; writes ``<work>/n<N>/bench.json``."""
    import torch

    torch.set_num_threads(1)
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from collafuse.split.runner import Orchestrator

    n = a.one
    out = (a.work / f"n{n:02d}").resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.environ["FLWR_HOME"] = str(out / "flwr_home")
    run_config = {"config": str(a.config.resolve()), "set": ";".join(overrides(a, n)), "out": str(out),
                  "reply-timeout": float(a.reply_timeout), "join-timeout": 300.0, "samples": a.samples}
    drops = drop_plan(n, a.rounds, a.drops, a.drop_modes, a.seed)
    print(f"[load] N={n}: drops {json.dumps(drops)}", flush=True)

    wire: list[dict] = []
    rounds: list[dict] = []  # per round: window [start, end] in time.time()
    result: dict = {}
    sampler = Sampler()

    # Round boundaries: the same moments the ServerApp's own clock uses (its on_round callback), recorded here.
    orig_train = Orchestrator.train

    def train(self, ckpt_dir=None, progress=True, on_round=None):
        start = [time.time()]

        def mark(r):
            now = time.time()
            snap = sampler.snapshot(breakdown=True)
            rounds.append({"round": r, "start": start[0], "end": now, **{k: v for k, v in snap.items() if k != "time"}})
            start[0] = now
            if on_round is not None:
                on_round(r)

        result["train_start"] = start[0]
        return orig_train(self, ckpt_dir, progress, mark)

    Orchestrator.train = train

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        from collafuse.flower.task import run_server

        result["metrics"] = run_server(MeasuredGrid(grid, wire), run_config)

    backend_config = {"client_resources": {"num_cpus": a.cpus_per_client, "num_gpus": 0.0},
                      "init_args": {"num_cpus": a.ray_cpus, "include_dashboard": False,
                                    "object_store_memory": a.object_store_mb * MB}}
    sampler.start()
    t0 = time.time()
    error = None
    try:
        run_simulation(server_app, make_client_app(run_config, drops, a.reply_timeout + 2.0), num_supernodes=n,
                       backend_config=backend_config)
    except BaseException as e:  # noqa: BLE001 - reported as a failed check, with the reason
        error = f"{type(e).__name__}: {e}"
    wall = time.time() - t0
    # Ray's processes should be gone after run_simulation returns (it calls ray.shutdown()).
    import psutil

    me, left = psutil.Process(), []
    for _ in range(40):
        left = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            break
        time.sleep(0.25)
    sampler.stop.set()
    sampler.join()
    bench = {"n": n, "wall_s": wall, "error": error, "drops": drops, "run_config": run_config,
             "backend_config": backend_config, "train_start": result.get("train_start"), "rounds": rounds,
             "samples": sampler.samples, "wire": wire, "vm_hwm": vm_hwm(),
             "left_processes": [f"{p.pid} {p.name()}" for p in left if p.is_running()]}
    (out / "bench.json").write_text(json.dumps(bench))
    print(f"[load] N={n}: simulation {'failed: ' + error if error else 'finished'} in {wall:.0f} s", flush=True)
    return 0


# -- analysis (parent) -------------------------------------------------------------------------------------------------
def analyse(a, n: int, out: Path, wall: float) -> dict:
    """Per-round numbers and the checks, from the child's bench.json and the run's own files."""
    from collafuse.config import load_config
    from collafuse.split.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    checks: list[tuple[str, bool, str]] = []

    def check(name, ok, detail=""):
        checks.append((name, bool(ok), detail))
        return ok

    bench_path = out / "bench.json"
    if not check("the simulation process wrote its measurements", bench_path.is_file(), str(bench_path)):
        return {"n": n, "checks": checks, "wall_s": wall}
    b = json.loads(bench_path.read_text())
    check("run_simulation returned without an error", b["error"] is None, b["error"] or "")
    cfg = load_config(a.config, overrides(a, n))
    R, K, S = cfg.train.rounds, cfg.train.client_steps, cfg.train.server_steps
    mpath = out / "metrics.json"
    m = json.loads(mpath.read_text()) if mpath.is_file() else None
    check("the ServerApp finished: metrics.json written, all rounds done",
          m is not None and m["rounds_done"] == R, f"rounds_done {m and m['rounds_done']} of {R}")
    m = m or {"history": {"losses": {}}, "events": [], "round_seconds_this_session": [], "samples_finished": {},
              "messages": {}}
    losses = m["history"]["losses"]
    clients = [f"client{i}" for i in range(n)]

    # Server checkpoint.
    server_meta = {}
    try:
        path = latest_checkpoint(out / "checkpoints")
        nodes, state = load_checkpoint(path, cfg.identity_hash())
        server_meta = nodes["server"][1]
        check("server's final checkpoint exists and verifies (sha256)", state["round"] == R and
              server_meta["steps"] == R * S, f"{path.name}, {server_meta['steps']} server steps")
    except (CheckpointError, TypeError, KeyError, OSError) as e:
        check("server's final checkpoint exists and verifies (sha256)", False, str(e))
    log = [json.loads(x) for x in (out / "message_log.jsonl").read_text().splitlines()] \
        if (out / "message_log.jsonl").is_file() else []
    joined = {r["sender"] for r in log if r["kind"] == "join"}
    check("every client joined", joined == set(clients), f"{len(joined)} of {n}")
    labels = set(server_meta.get("client_labels", {}))
    check("every client's upload reached the server", labels == {str(i) for i in range(n)}, f"{len(labels)} of {n}")
    rejected = [r for r in log if r.get("rejected")]
    check("no message refused", not rejected, f"{len(rejected)} refused")

    # Clients' own state.
    bad = []
    for c in clients:
        trained = sum(x is not None for x in losses.get(c, []))
        try:
            path = latest_checkpoint(out / "nodes" / c / "checkpoints")
            nodes, state = load_checkpoint(path, cfg.identity_hash())
            meta = nodes[c][1]
            if meta["rounds_done"] != R or meta["steps"] != trained * K or state["rounds_done"] != R:
                bad.append(f"{c}: rounds_done {meta['rounds_done']}, {meta['steps']} steps, server counted "
                           f"{trained} rounds x {K}")
        except (CheckpointError, TypeError, KeyError, OSError) as e:
            bad.append(f"{c}: {e}")
    check("every client's state dir: verified checkpoint, rounds_done = R, steps = rounds counted x K", not bad,
          "; ".join(bad[:3]) or f"{n} clients")

    # Drops.
    drops = {int(k): v for k, v in b["drops"].items()}
    skipped = {}
    for e in m["events"]:
        for c in clients:
            if f" {c} skipped" in e:
                rnd = int(e.split(":")[0].split()[1]) if e.startswith("round ") else e.split(":")[0]
                skipped.setdefault(c, set()).add(rnd)
    bad = []
    for i, p in drops.items():
        c = f"client{i}"
        missed = [r + 1 for r, x in enumerate(losses.get(c, [])) if x is None]
        if missed != p["rounds"] or skipped.get(c, set()) != set(p["rounds"]):
            bad.append(f"{c}: planned {p['rounds']}, missed {missed}, "
                       f"skipped events {sorted(skipped.get(c, []), key=str)}")
        if not any(x is not None for x in losses.get(c, [])[max(p["rounds"]):]):
            bad.append(f"{c} did not train after round {max(p['rounds'])}")
    check("dropped clients sat out exactly their drop rounds and trained again later", not bad,
          "; ".join(bad) or ", ".join(f"client{i} round {p['rounds']} ({p['mode']})" for i, p in drops.items()))
    others = [c for c in clients if int(c[6:]) not in drops and (c in skipped or
                                                                  any(x is None for x in losses.get(c, [None])))]
    check("no other client was skipped", not others, ", ".join(others))
    if a.samples:
        short = {c: v for c, v in m["samples_finished"].items() if v != a.samples}
        check(f"every client finished its {a.samples} samples", len(m["samples_finished"]) == n and not short,
              str(short) if short else "")
    check("Ray left no process behind", not b["left_processes"], ", ".join(b["left_processes"]))

    # Per-round numbers.
    wire, samples = b["wire"], b["samples"]
    rs = m["round_seconds_this_session"]
    per_round = []
    for k, w in enumerate(b["rounds"]):
        lo, hi = w["start"], w["end"]
        inside = [s for s in samples if lo <= s["time"] <= hi] + [w]  # w: the snapshot at the round's end
        # Messages of this round: by their round field where they have one, else by time (the log rounds its
        # timestamps to the millisecond, so the window is shifted by half of one).
        recs = [r for r in log if (r["meta"]["round"] == w["round"] if "round" in r.get("meta", {}) else
                                   lo + 0.0005 < r["time"] <= hi + 0.0005)]
        wr = [x for x in wire if lo <= x["time"] <= hi]
        down = [d for d in drops if w["round"] in drops[d]["rounds"]]
        per_round.append({
            "round": w["round"], "seconds": rs[k] if k < len(rs) else hi - lo,
            "rss_end": w["rss"], "rss_peak": max(s["rss"] for s in inside),
            "tree_rss_peak": max(s["tree_rss"] for s in inside), "actors": max(s["actors"] for s in inside),
            "payload_up": sum(r["bytes"] for r in recs if r["receiver"] == "server" and not r.get("rejected")),
            "payload_down": sum(r["bytes"] for r in recs if r["sender"] == "server"),
            "messages_up": sum(r["receiver"] == "server" for r in recs),
            "messages_down": sum(r["sender"] == "server" for r in recs),
            "wire_up": sum(x["bytes"] for x in wr if x["dir"] == "up"),
            "wire_down": sum(x["bytes"] for x in wr if x["dir"] == "down"),
            "error_replies": sum(bool(x.get("error")) for x in wr),
            "dropped": [{"client": f"client{d}", "mode": drops[d]["mode"]} for d in down],
            "events": [e for e in m["events"] if e.startswith(f"round {w['round']}:")],
            "procs_end": {k: round(v / MB, 1) for k, v in sorted(w.get("procs", {}).items(), key=lambda kv: -kv[1])},
            "cpu_s_end": {k: round(v, 2) for k, v in w.get("cpu_s", {}).items()},
            "loadavg_1min": w.get("loadavg"),
        })
    me = "server process (ServerApp, SuperLink state, Ray driver)"
    for prev, r in zip([None, *per_round[:-1]], per_round):
        if prev is not None and r["cpu_s_end"]:  # CPU seconds spent in this round, by process kind
            d = {k: v - prev["cpu_s_end"].get(k, 0.0) for k, v in r["cpu_s_end"].items()}
            r["cpu_actors_s"] = sum(v for k, v in d.items() if k.startswith("ray::ClientAppActor"))
            r["cpu_server_s"] = d.get(me, 0.0)
    for r in per_round:
        r["uploads"] = sum(rec["kind"] == "upload" for rec in log
                           if rec["receiver"] == "server" and rec.get("meta", {}).get("round") == r["round"])
    # Steady: rounds after the first with no drop and no (late) upload in them.
    quiet = [r for r in per_round[1:] if not r["dropped"] and not r["uploads"]]
    # Seconds a train_request spends in ClientNode.handle (train + save), from the clients' own logs: the per-message
    # compute; it rises when other work on the machine takes the cores.
    handle = []
    for c in clients:
        path = out / "nodes" / c / "message_log.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
        got = {(r["kind"], r.get("meta", {}).get("round")): r["time"] for r in recs}
        handle += [got[("train_reply", q["round"])] - got[("train_request", q["round"])] for q in quiet
                   if ("train_reply", q["round"]) in got and ("train_request", q["round"]) in got]
    steady = lambda key: statistics.median(r[key] for r in quiet) if quiet else math.nan  # noqa: E731
    drop_s = {p["mode"]: per_round[r - 1]["seconds"] for p in drops.values() for r in p["rounds"]
              if r - 1 < len(per_round)}
    return {
        "n": n, "wall_s": wall, "simulation_wall_s": b["wall_s"], "rounds": per_round, "checks": checks,
        "drops": b["drops"], "events": m["events"], "messages_summary": m["messages"],
        "round1_s": per_round[0]["seconds"] if per_round else math.nan,
        "steady_s": steady("seconds"), "drop_round_s": drop_s,
        "rss_end_mb": per_round[-1]["rss_end"] / MB if per_round else math.nan,
        "rss_peak_mb": max((r["rss_peak"] for r in per_round), default=math.nan) / MB,
        "tree_rss_peak_mb": max((r["tree_rss_peak"] for r in per_round), default=math.nan) / MB,
        "vm_hwm_mb": b["vm_hwm"] / MB, "actors": max((r["actors"] for r in per_round), default=0),
        "round1_up": per_round[0]["payload_up"] if per_round else 0,
        "round1_wire_up": per_round[0]["wire_up"] if per_round else 0,
        "steady_wire_up": steady("wire_up"), "steady_wire_down": steady("wire_down"),
        "steady_payload_up": steady("payload_up"), "steady_payload_down": steady("payload_down"),
        "round1_wire_down": per_round[0]["wire_down"] if per_round else 0,
        "backend_config": b["backend_config"], "run_config": b["run_config"],
        "procs_last_round_mb": per_round[-1]["procs_end"] if per_round else {},
        "train_handle_s": statistics.median(handle) if handle else math.nan,
        "steady_cpu_actors_s": steady("cpu_actors_s") if all("cpu_actors_s" in r for r in quiet) else math.nan,
        "steady_cpu_server_s": steady("cpu_server_s") if all("cpu_server_s" in r for r in quiet) else math.nan,
        "loadavg_median": statistics.median(r["loadavg_1min"] for r in per_round)
        if per_round and all(r.get("loadavg_1min") is not None for r in per_round) else math.nan,
    }


def human(b: float) -> str:
    if b != b:
        return "-"
    for unit, f in (("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.2f} {unit}"
    return f"{b:.0f} B"


def f1(x, digits: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    head = ("| N | round 1 s | steady s/round (median, no drop) | drop round s (error / timeout) | server RSS end MB "
            "| server RSS peak MB | tree RSS peak MB (+Ray) | actors | up round 1 | up / down steady round "
            "| CPU s per steady round: actors / server | train message in ClientNode s | load avg | wall s |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        if "steady_s" not in r:
            lines.append(f"| {r['n']} | failed | | | | | | | | | | | | {r['wall_s']:.0f} |")
            continue
        d = r["drop_round_s"]
        lines.append(
            f"| {r['n']} | {r['round1_s']:.1f}{' (drop)' if r['rounds'][0]['dropped'] else ''} | "
            f"{f1(r['steady_s'])} | {f1(d.get('error'))} / "
            f"{f1(d.get('timeout'))} | {r['rss_end_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
            f"{r['tree_rss_peak_mb']:.0f} | {r['actors']} | {human(r['round1_wire_up'])} | "
            f"{human(r['steady_wire_up'])} / {human(r['steady_wire_down'])} | "
            f"{f1(r.get('steady_cpu_actors_s'))} / {f1(r.get('steady_cpu_server_s'))} | "
            f"{f1(r.get('train_handle_s'), 2)} | {f1(r.get('loadavg_median'))} | {r['wall_s']:.0f} |")
    return lines


def plot(rows: list[dict], path: Path, reply_timeout: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in rows if r.get("rounds")]
    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 6.2))
    # 1. round time
    a0 = ax[0]
    for r in rows:
        for x in r["rounds"]:
            kind = ("timeout" if any(d["mode"] == "timeout" for d in x["dropped"]) else
                    "error" if x["dropped"] else "upload" if x["round"] == 1 else
                    "late" if x.get("uploads") else "steady")
            style = {"steady": ("o", "tab:blue"), "upload": ("s", "tab:green"), "error": ("x", "tab:red"),
                     "timeout": ("v", "tab:purple"), "late": ("D", "tab:olive")}[kind]
            a0.scatter(r["n"], x["seconds"], marker=style[0], color=style[1], s=36, zorder=3)
    a0.plot(ns, [r["steady_s"] for r in rows], "-", color="tab:blue", label="steady rounds (dots; line: median)")
    a0.plot(ns, [math.nan if r["rounds"][0]["dropped"] else r["round1_s"] for r in rows], "--", color="tab:green",
            marker="s", label="round 1 (incl. uploads; no drop in it)")
    a0.scatter([], [], marker="D", color="tab:olive", label="round after a round-1 drop (its late upload)")
    a0.scatter([], [], marker="x", color="tab:red", label="round with a client's ClientApp failing")
    a0.scatter([], [], marker="v", color="tab:purple",
               label=f"round with a client silent (server waits the {reply_timeout:g} s reply-timeout)")
    a0.set_yscale("log")
    a0.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500]))
    a0.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a0.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a0.set(xlabel="simulated clients N", ylabel="seconds per round (log scale)", title="round time (ServerApp clock)")
    # 2. RSS
    a1 = ax[1]
    a1.plot(ns, [r["rss_peak_mb"] for r in rows], "o-", color="tab:orange", label="server process, peak in rounds")
    a1.plot(ns, [r["rss_end_mb"] for r in rows], "s--", color="tab:orange", alpha=0.6,
            label="server process, after the last round")
    a1.plot(ns, [r["tree_rss_peak_mb"] for r in rows], "^-", color="tab:gray",
            label="+ Ray (GCS, raylet, actors), peak")
    a1.set(xlabel="simulated clients N", ylabel="RSS (MB)", title="memory", ylim=(0, None))

    # 3. bytes per round
    a2 = ax[2]
    a2.plot(ns, [r["round1_wire_up"] for r in rows], "s-", color="tab:green",
            label="client→server, round 1 (uploads)")
    a2.plot(ns, [r["round1_wire_down"] for r in rows], "s--", color="tab:green", alpha=0.6,
            label="server→client, round 1")
    a2.plot(ns, [r["steady_wire_up"] for r in rows], "o-", color="tab:blue", label="client→server, steady round")
    a2.plot(ns, [r["steady_wire_down"] for r in rows], "o--", color="tab:blue", alpha=0.6,
            label="server→client, steady round")
    a2.set_yscale("log")
    a2.set(xlabel="simulated clients N", ylabel="bytes per round (Flower-serialised content)",
           title="traffic per round")
    for x in ax:
        x.set_xticks(ns)
        x.grid(alpha=0.3)
        x.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.suptitle("CollaFuse over Flower's simulation engine: N clients, 2 of them dropping once (2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NOTES = """\
How the drops work: the benchmark's ClientApp wraps the production `ClientNode`; for each dropped client, every
message of its drop round fails before the node is touched. `error`: the ClientApp raises at once, Flower turns it
into an error reply, the transport reports the client `unavailable ... failed` and the round completes without it.
`timeout`: the ClientApp sleeps past the reply-timeout (then raises; that late reply is never pulled), so the
server waits the whole reply-timeout for that exchange: a silent client costs a round the reply-timeout (twice in
round 1, whose upload exchange waits too). In the next round the client is asked again (its upload too, if the
server lacks it) and trains from its saved state.

Ray: `client_resources.num_cpus = 1` on `num_cpus = 2` gives 2 ClientApp actors, so 2 clients train at a time
whatever N is; each actor is a process holding torch (~0.6 GB RSS), the rest of Ray (GCS, raylet, dashboard and
runtime-env agents, monitors) ~0.5 GB. The number of actors does not grow with N: memory is flat in N, round
time grows linearly (N messages through 2 actors). `run_simulation`'s default (`num_cpus = 2` per client) would
give 1 actor and serialise every client (measured side by side in results/flower-load/ray-actors.md).
"""


def write_report(out: Path, metrics: dict) -> None:
    """The plot and COMMAND.md, from the metrics dict (``--replot`` redraws both from OUT/metrics.json)."""
    rows, total = metrics["runs"], metrics["wall_s"]
    plot(rows, out / "flower_load.png", metrics["args"]["reply_timeout"])
    per_round = ["| N | round | seconds | server RSS end / peak MB | tree RSS peak MB | up / down (Flower bytes) | "
                 "up / down (payload bytes) | messages up / down | dropped / late |", "|" + "---|" * 9]
    for r in rows:
        for x in r.get("rounds", []):
            late = [f"{x['uploads']} late upload(s)"] if x["round"] > 1 and x.get("uploads") else []
            per_round.append(
                f"| {r['n']} | {x['round']} | {x['seconds']:.1f} | {x['rss_end'] / MB:.0f} / {x['rss_peak'] / MB:.0f} "
                f"| {x['tree_rss_peak'] / MB:.0f} | {human(x['wire_up'])} / {human(x['wire_down'])} | "
                f"{human(x['payload_up'])} / {human(x['payload_down'])} | {x['messages_up']} / {x['messages_down']} "
                f"| {', '.join([d['client'] + ' (' + d['mode'] + ')' for d in x['dropped']] + late) or '-'} |")
    procs = list(dict.fromkeys(k for r in rows for k in r.get("procs_last_round_mb", {})))
    (out / "COMMAND.md").write_text("\n".join([
        "# Flower load test (`benchmarks/flower_load.py`)", "",
        "```bash", metrics["command"], "```", "",
        f"Machine: {metrics['machine']}, shared with other work.  ",
        f"Wall time: {total:.0f} s ({total / 60:.1f} min) for the whole script.", "",
        "![round time, server RSS and bytes per round against N](flower_load.png)", "",
        "## Per client count", "", *table(rows), "",
        "Round time is the ServerApp's own clock (`round_seconds_this_session`); \"steady\" is the median of rounds "
        "2..R in which no client dropped and none uploaded late; \"(drop)\" marks a round 1 in which one dropped. "
        "\"Server RSS\" is the process that calls `run_simulation`: it runs the ServerApp (a thread), the in-memory "
        "SuperLink state and Ray's "
        "driver. \"Tree\" adds Ray's GCS, raylet, agents and the ClientApp actors. Bytes are the Flower-serialised "
        "message content (RecordDict protobuf, envelope included) measured on the ServerApp's Grid calls; steady "
        "rounds carry no arrays, only instructions and losses (the array payload bytes of the message log are in "
        "the per-round table). CPU seconds are user + system time of the ClientApp actors and of the server process "
        "within a steady round; \"train message in ClientNode\" is the median time from a train_request to its "
        "reply in the clients' own logs (5 training steps + save; it grows when other work takes the cores); "
        "\"load avg\" is the machine's 1-minute load average at the rounds' ends (median; "
        "this run's own processes count about 2-3 of it, the rest is other work on the shared machine).", "",
        "## Per round", "", *per_round, "",
        "## Where the memory is (RSS by process at the end of the last round)", "",
        "| process | " + " | ".join(f"N={r['n']} MB" for r in rows) + " |", "|---|" + "---|" * len(rows),
        *[f"| {name} | " + " | ".join(f"{r.get('procs_last_round_mb', {}).get(name, 0):.0f}" for r in rows) + " |"
          for name in procs], "",
        "RSS counts shared pages (torch's libraries) once per process, so the tree total overstates the memory "
        "actually in use.", "",
        "## Notes", "", NOTES,
        "## Checks", "", "```", *metrics["checks"], "```", ""]))
    print(f"wrote {out}/flower_load.png, metrics.json, COMMAND.md")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return (f"{os.cpu_count()} CPU cores ({cpu}), {mem / 1024 / 1024:.0f} GiB RAM, no GPU, "
            f"Python {platform.python_version()}")


def run_child(a, n: int, argv: list[str]) -> tuple[int, float]:
    out = a.work / f"n{n:02d}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--one", str(n)]
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(a.work / f"n{n:02d}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        killer = threading.Timer(a.run_timeout, lambda: _kill_tree(proc.pid))
        killer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                if line.startswith(("[collafuse]", "[load]")):
                    print(f"  N={n:<3d} {line.rstrip()}", flush=True)
            rc = proc.wait()
        except BaseException:  # Ctrl-C reaches only this process (the child has a session of its own): stop it too
            _kill_tree(proc.pid)
            raise
        finally:
            killer.cancel()
    return rc, time.time() - t0


def _kill_tree(pid: int) -> None:
    from collafuse.flower.launch import descendants

    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="5,10,20", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--drops", type=int, default=2, help="clients that drop (each in one random round in 1..R-1)")
    p.add_argument("--drop-modes", default="error,timeout", type=lambda s: s.split(","),
                   help="cycled over the dropped clients: error (ClientApp raises), timeout (no reply in time)")
    p.add_argument("--reply-timeout", type=float, default=60.0, help="the transport's reply-timeout, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=200, help="training images per client")
    p.add_argument("--client-steps", type=int, default=5)
    p.add_argument("--server-steps", type=int, default=5)
    p.add_argument("--samples", type=int, default=2, help="samples each client finishes after training (0: none)")
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    p.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray client_resources num_cpus")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2, help="CPUs Ray may use (ray.init num_cpus)")
    p.add_argument("--object-store-mb", type=int, default=512, help="Ray object store size")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "flower.toml")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "flower-load", help="run directories")
    p.add_argument("--out", type=Path, default=REPO / "results" / "flower-load", help="plot, metrics, COMMAND.md")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds before one N's run is killed")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and COMMAND.md from OUT/metrics.json")
    p.add_argument("--reanalyse", action="store_true",
                   help="redo the analysis from the run directories in WORK (same flags as the run), no new run")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.work = a.work.resolve()
    if a.one is not None:
        return run_one(a)
    if a.replot:
        saved = json.loads((a.out / "metrics.json").read_text())
        if "command" not in saved:  # written before the command was stored: rebuild it from the non-default flags
            defaults = vars(p.parse_args([]))
            flags = [f"--{k.replace('_', '-')}={','.join(v) if isinstance(v, list) else v}"
                     for k, v in saved["args"].items()
                     if k not in ("one", "replot", "work") and str(v) != str(defaults.get(k))
                     and not (isinstance(v, list) and v == defaults.get(k))]
            flags = [f.replace(f"={REPO}/", "=") for f in flags]
            saved["command"] = "cd /work/main && .venv/bin/python benchmarks/flower_load.py " + " ".join(flags)
            (a.out / "metrics.json").write_text(json.dumps(saved, indent=1, default=str))
        write_report(a.out, saved)
        return 0

    if a.reanalyse:
        saved = json.loads((a.out / "metrics.json").read_text())
        walls = {r["n"]: r["wall_s"] for r in saved["runs"]}
        rows = [analyse(a, n, a.work / f"n{n:02d}", walls[n]) for n in (int(x) for x in a.clients.split(","))]
        for r, old_row in zip(rows, saved["runs"]):
            r["child_rc"] = old_row.get("child_rc")
        saved["checks"] = [f"{'PASS' if ok else 'FAIL'}  N={r['n']:<3d} {name}" + (f"  [{detail}]" if detail else "")
                           for r in rows for name, ok, detail in r["checks"]]
        saved["runs"], saved["checks_failed"] = rows, sum(c.startswith("FAIL") for c in saved["checks"])
        (a.out / "metrics.json").write_text(json.dumps(saved, indent=1, default=str))
        print("\n".join(table(rows)))
        write_report(a.out, saved)
        return 1 if saved["checks_failed"] else 0

    child_argv = list(argv)
    ns = [int(x) for x in a.clients.split(",")]
    from collafuse.config import ConfigError, load_config

    try:  # a bad flag ends here, before any simulation starts
        for n in ns:
            load_config(a.config, overrides(a, n))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"Flower load test: N = {ns}, {a.rounds} rounds, {a.drops} dropping ({'/'.join(a.drop_modes)}), "
          f"reply-timeout {a.reply_timeout:g} s, {a.images} images per client; runs in {a.work}", flush=True)
    t_all = time.time()
    rows = []
    for k, n in enumerate(ns):
        print(f"[{k + 1}/{len(ns)}] N = {n}: starting", flush=True)
        rc, wall = run_child(a, n, child_argv)
        row = analyse(a, n, a.work / f"n{n:02d}", wall)
        row["child_rc"] = rc
        rows.append(row)
        ok = all(c[1] for c in row["checks"])
        print(f"[{k + 1}/{len(ns)}] N = {n}: {'all checks pass' if ok else 'CHECKS FAILED'} ({wall:.0f} s wall, "
              f"log {a.work}/n{n:02d}.log)", flush=True)
    total = time.time() - t_all

    print("\n" + "\n".join(table(rows)) + "\n")
    checks = [f"{'PASS' if ok else 'FAIL'}  N={r['n']:<3d} {name}" + (f"  [{detail}]" if detail else "")
              for r in rows for name, ok, detail in r["checks"]]
    print("\n".join(checks))
    failed = sum(line.startswith("FAIL") for line in checks)
    print(f"\n{len(checks) - failed} passed, {failed} failed; wall {total:.0f} s")
    metrics = {"command": "cd /work/main && .venv/bin/python benchmarks/flower_load.py " + shlex.join(argv),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
               "machine": machine(), "wall_s": total, "runs": rows, "checks_failed": failed, "checks": checks}
    (a.out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    write_report(a.out, metrics)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
