"""Per-round cost of running CollaFuse over Flower, against the in-process runner, on the demo config.

What is measured
----------------
The same config (default configs/demo.toml: 3 clients x 5,000 images, 10 server + 10 client steps per round),
``--rounds`` rounds, three ways, one after the other in this one run:

* in-process: ``Federation.train`` (the roles call each other through ``InProcessTransport``);
* Flower simulation: ``collafuse.flower.launch.simulate`` (own SuperLink in simulation mode, Ray SuperNodes);
* Flower deployment on loopback: ``deploy_loopback`` (TLS + SuperNode authentication, one SuperNode per client,
  each with its own exported data folder), once per ``--deployments`` mode: ``site-overlap`` (the default: each
  node's long-lived site process, flower/site.py, and the server's steps overlapped with the clients'), ``site``
  (site processes, the server's steps after the replies) and ``message`` (a fresh ClientApp process per message
  builds the node, as before site processes).

Seconds per round come from each run itself (the in-process loop's clock; the ServerApp's per-round clock, which
starts when every client has joined). Round 1 also carries the one-time uploads, so it is reported apart from the
steady rounds (median of rounds 2..R). Ratios are Flower / in-process.

Every process runs torch with ``--threads`` threads (default 1; OMP_NUM_THREADS for the Flower processes), so
the three ways get the same compute per process; Flower's clients can then train at the same time on the two
cores, which the in-process loop does not do.

    .venv/bin/python benchmarks/flower_overhead.py                  # about 20 minutes on 2 CPU cores
    .venv/bin/python benchmarks/flower_overhead.py --rounds 5 --config configs/flower.toml

A measurement, not a test: it prints the numbers and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# Loopback deployments: (site process, server steps overlapped with the clients' steps).
DEPLOYMENTS = {
    "site-overlap": (True, True),  # the default: long-lived site processes, the server trains while clients do
    "site": (True, False),  # site processes, the server's steps after the clients' replies (as in process)
    "message": (False, False),  # before site processes: a fresh ClientApp process builds the node per message
}


def in_process(config: Path, overrides: list[str]) -> list[float]:
    from collafuse.config import load_config
    from collafuse.split.runner import Federation

    fed = Federation(load_config(config, overrides))
    seconds, clock = [], [time.perf_counter()]

    def on_round(_):
        now = time.perf_counter()
        seconds.append(now - clock[0])
        clock[0] = now

    fed.train(progress=False, on_round=on_round)
    return seconds


def summary(name: str, s: list[float], base: list[float] | None) -> str:
    steady = statistics.median(s[1:]) if len(s) > 1 else float("nan")
    line = f"{name:<22} round 1 {s[0]:6.1f} s   steady {steady:6.1f} s/round"
    if base:
        b_steady = statistics.median(base[1:]) if len(base) > 1 else float("nan")
        line += f"   ratio vs in-process: round 1 {s[0] / base[0]:.2f}, steady {steady / b_steady:.2f}"
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.toml")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--deployments", default="site-overlap,site,message",
                   type=lambda v: [m for m in v.split(",") if m],
                   help=f"loopback deployments to run, comma-separated, of {sorted(DEPLOYMENTS)}")
    p.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary directory)")
    a = p.parse_args(argv)
    if bad := [m for m in a.deployments if m not in DEPLOYMENTS]:
        p.error(f"--deployments {','.join(bad)} is invalid (allowed: {', '.join(sorted(DEPLOYMENTS))})")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch

    torch.set_num_threads(a.threads)
    from collafuse.flower.launch import deploy_loopback, simulate

    overrides = [f"train.rounds={a.rounds}"]
    work = a.keep or Path(tempfile.mkdtemp(prefix="collafuse-flower-bench-"))
    print(f"config {a.config.relative_to(REPO) if a.config.is_relative_to(REPO) else a.config}, {a.rounds} rounds, "
          f"{a.threads} torch thread(s) per process; runs in {work}")
    results = {}
    t = time.perf_counter()
    results["in-process"] = in_process(a.config, overrides)
    print(summary("in-process", results["in-process"], None), f"({time.perf_counter() - t:.0f} s wall)", flush=True)
    t = time.perf_counter()
    m = simulate(a.config, work / "sim", overrides, samples=0)
    results["flower simulation"] = m["round_seconds_this_session"]
    print(summary("flower simulation", results["flower simulation"], results["in-process"]),
          f"({time.perf_counter() - t:.0f} s wall incl. SuperLink and Ray start)", flush=True)
    for mode in a.deployments:
        site, overlap = DEPLOYMENTS[mode]
        t = time.perf_counter()
        m = deploy_loopback(a.config, work / f"deploy-{mode}", overrides, samples=0, site_process=site,
                            overlap=overlap)
        results[f"deployment {mode}"] = m["round_seconds_this_session"]
        print(summary(f"deployment {mode}", results[f"deployment {mode}"], results["in-process"]),
              f"({time.perf_counter() - t:.0f} s wall incl. PKI, SuperLink and SuperNode start)", flush=True)
    for k, v in results.items():
        print(f"  {k} per round: {', '.join(f'{x:.1f}' for x in v)}")
    if a.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
