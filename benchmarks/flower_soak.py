"""A soak of the Flower deployment on loopback: TLS + SuperNode authentication, run for ``--duration`` seconds while a
SuperNode is stopped and restarted, and the ServerApp is killed with SIGKILL and resumed, at random times.

What is measured
----------------
The deployment of ``collafuse.flower.launch.start_deployment`` (a SuperLink, one SuperNode per client, each with its
own data folder) trains configs/flower.toml with ``train.rounds`` set far beyond what the soak can reach, a
checkpoint every round. Faults come at exponentially distributed intervals (mean ``--mean-gap`` seconds, the
generator seeded with ``--seed``), each only once a round has finished since the last one, and each one of:

* ``supernode``: a random SuperNode is stopped (SIGTERM) and started again ``--down`` seconds later;
* ``serverapp``: the ServerApp process is killed with SIGKILL and a new ``flwr run`` resumes the run.

Every ``--sample-every`` seconds the RSS of every process of the deployment is sampled (psutil). At the end
everything is stopped and the run directory is checked:

* rounds finished: the latest checkpoint's round;
* lost: per ServerApp kill, the rounds between the checkpoint at the kill and the round the next ServerApp resumed
  after (bar: none beyond the round in progress), every checkpoint kept verifies, the loss history has one entry per
  round and node, and the message log's counted records hold each round's ``train_request`` once per client present;
* memory: each long-lived process's RSS slope over the soak (MB per hour, least squares), and the first and last
  samples.

    .venv/bin/python benchmarks/flower_soak.py                       # one hour
    .venv/bin/python benchmarks/flower_soak.py --duration 600 --mean-gap 120 --out results/flower-soak-short

It writes ``OUT/soak.json`` and prints a summary; it exits 1 when something was lost. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def latest_round(ckpt: Path) -> int:
    p = ckpt / "LATEST"
    return int(p.read_text().strip()[6:]) if p.is_file() else 0


def rss_by_process(root_pids: list[int]) -> dict[str, int]:
    """RSS (bytes) of every process under the given roots, by a readable name (the first distinctive argv word)."""
    out: dict[str, int] = defaultdict(int)
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                cmd = " ".join(p.cmdline())
                name = next((w for w in ("flwr-serverapp", "flwr-clientapp", "flower-supernode", "flower-superlink",
                                         "flwr run") if w in cmd), p.name())
                out[name] += p.memory_info().rss
            except psutil.NoSuchProcess:
                continue
    return dict(out)


def slope_mb_per_hour(samples: list[tuple[float, int]]) -> float | None:
    if len(samples) < 3:
        return None
    t = np.array([s[0] for s in samples]) / 3600.0
    y = np.array([s[1] for s in samples]) / 1e6
    return float(np.polyfit(t, y, 1)[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=3600.0, help="seconds of soak")
    p.add_argument("--mean-gap", type=float, default=300.0, help="mean seconds between faults")
    p.add_argument("--down", type=float, default=20.0, help="seconds a stopped SuperNode stays down")
    p.add_argument("--sample-every", type=float, default=15.0, help="seconds between RSS samples")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reply-timeout", type=float, default=60.0)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "flower.toml")
    p.add_argument("--set", action="append", default=[], help="config overrides, as in collafuse run")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "flower-soak")
    p.add_argument("--out", type=Path, default=REPO / "results" / "flower-soak")
    args = p.parse_args(argv)

    from collafuse.flower.launch import find_process, launched, run_config_arg, start_deployment, start_flwr_run
    from collafuse.split.checkpoint import CheckpointError, load_checkpoint

    work = args.work.resolve()
    if work.exists():
        sys.exit(f"--work {work} exists; remove it or choose another (a soak starts from nothing)")
    out_dir = work / "server"
    overrides = ["train.rounds=100000", "train.checkpoint_every=1", f"data.num_clients={args.nodes}", *args.set]
    rng = random.Random(args.seed)
    faults: list[dict] = []
    rss: dict[str, list[tuple[float, int]]] = defaultdict(list)
    t_start = time.time()
    with launched(work) as procs:
        dep = start_deployment(procs, args.config, overrides, nodes=args.nodes)
        rc = run_config_arg(args.config, out_dir, overrides, samples=0, reply_timeout=args.reply_timeout,
                            join_timeout=300)
        start_flwr_run(procs, "collafuse-tls", rc)
        next_fault = time.time() + rng.expovariate(1 / args.mean_gap)
        next_sample = time.time()
        restart_node: tuple[float, str, int] | None = None
        last_fault_round = 0
        end = time.time() + args.duration
        while time.time() < end:
            now = time.time()
            if now >= next_sample:
                roots = [pr.pid for pr in procs.started.values() if pr.poll() is None]
                for name, value in rss_by_process(roots).items():
                    rss[name].append((now - t_start, value))
                next_sample = now + args.sample_every
            if restart_node is not None and now >= restart_node[0]:
                dep.start_supernode(restart_node[1], restart_node[2])
                faults[-1]["back_at"] = round(now - t_start, 1)
                restart_node = None
            ckpt_round = latest_round(out_dir / "checkpoints")
            # a fault only once the federation has made progress since the last one (a round finished after it), so
            # a restarted ServerApp is not killed again before it has resumed
            if now >= next_fault and restart_node is None and ckpt_round > last_fault_round:
                last_fault_round = ckpt_round
                kind = rng.choice(["supernode", "serverapp"])
                if kind == "supernode":
                    i = rng.randrange(args.nodes)
                    procs.stop(f"site{i}")
                    restart_node = (now + args.down, f"site{i}", i)
                    faults.append({"kind": kind, "node": f"site{i}", "at": round(now - t_start, 1),
                                   "checkpoint_round": ckpt_round})
                else:
                    server = find_process(procs.started["superlink"].pid, "flwr-serverapp")
                    if server is None:  # between two runs: nothing to kill now
                        next_fault = now + 5
                        continue
                    os.kill(server, signal.SIGKILL)
                    time.sleep(2)
                    procs.stop("flwr-run")
                    faults.append({"kind": kind, "at": round(now - t_start, 1), "checkpoint_round": ckpt_round})
                    start_flwr_run(procs, "collafuse-tls", rc)
                next_fault = now + rng.expovariate(1 / args.mean_gap)
            time.sleep(1.0)
    elapsed = time.time() - t_start
    rounds_done = latest_round(out_dir / "checkpoints")  # after the teardown: the last round may end during it

    # -- what was lost --------------------------------------------------------------------------------------------
    problems = []
    flwr_log = (work / "logs" / "flwr-run.log").read_text(errors="replace")
    resumed_after = [int(x) for x in re.findall(r"resuming after round (\d+)", flwr_log)]
    kills = [f for f in faults if f["kind"] == "serverapp"]
    for f, after in zip(kills, resumed_after, strict=False):
        f["resumed_after"] = after
        if after < f["checkpoint_round"]:
            problems.append(f"ServerApp kill at {f['at']} s: checkpoint round {f['checkpoint_round']}, resumed after "
                            f"{after}")
    if len(resumed_after) < len(kills):
        problems.append(f"{len(kills)} ServerApp kills but {len(resumed_after)} resumes in the log")
    kept = sorted(p for p in (out_dir / "checkpoints").glob("round_*") if p.is_dir())
    for ck in kept:
        try:
            load_checkpoint(ck)
        except CheckpointError as e:
            problems.append(str(e))
    history = json.loads((kept[-1] / "state.json").read_text())["history"] if kept else {"losses": {}}
    for node, losses in history["losses"].items():
        if len(losses) != rounds_done:
            problems.append(f"{node}: {len(losses)} loss entries for {rounds_done} rounds")
    from collafuse.split.transport import MessageLog, uncounted

    records = MessageLog(out_dir / "message_log.jsonl").records
    requests = Counter((r["meta"]["round"], r["receiver"]) for r, why in zip(records, uncounted(records))
                       if why is None and r["kind"] == "train_request")
    twice = sorted(k for k, v in requests.items() if v > 1)
    if twice:
        problems.append(f"train_request counted twice for (round, client) {twice[:5]}")
    replayed = sum(bool(r.get("replayed")) for r in records)
    resent = sum(bool(r.get("resent")) for r in records)
    memory = {name: {"first_mb": s[0][1] / 1e6, "last_mb": s[-1][1] / 1e6, "peak_mb": max(v for _, v in s) / 1e6,
                     "slope_mb_per_hour": slope_mb_per_hour(s), "samples": len(s)} for name, s in rss.items()}
    result = {"command": "benchmarks/flower_soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seconds": elapsed, "rounds_done": rounds_done, "faults": faults, "problems": problems,
              "message_log": {"records": len(records), "replayed": replayed, "resent": resent},
              "memory": memory}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    print(f"soak: {elapsed:.0f} s, {rounds_done} rounds, {len(faults)} faults "
          f"({Counter(f['kind'] for f in faults)}), records {len(records)} (replayed {replayed}, resent {resent})")
    for f in faults:
        print("  fault", json.dumps(f))
    for name, m in sorted(memory.items()):
        slope = "-" if m["slope_mb_per_hour"] is None else f"{m['slope_mb_per_hour']:+.1f} MB/h"
        print(f"  {name}: RSS {m['first_mb']:.0f} -> {m['last_mb']:.0f} MB (peak {m['peak_mb']:.0f}), slope {slope}")
    print("lost: nothing beyond the round in progress" if not problems else "PROBLEMS:\n  " + "\n  ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
