"""One row per run of a multi-seed sweep: per-client FID, their mean, and where and how long it trained.

Reads the small files each run leaves (``seed_K/cut_NNNN/evaluation.json``, ``metrics.json``, ``config.toml``), so
it works on a sweep directory and on its committed copy alike; prints a Markdown table.

    .venv/bin/python experiments/runs_table.py results/fashion-mnist-seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import tomllib
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="a directory with seed_K/cut_NNNN/ runs")
    a = p.parse_args()
    rows = []
    for run in sorted(a.sweep.glob("seed_*/cut_*")):
        ev_path = run / "evaluation.json"
        if not ev_path.is_file():
            continue
        ev = json.loads(ev_path.read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        run_cfg = tomllib.loads((run / "config.toml").read_text())["run"]
        fids = [v["vs_test"]["fid"] for _, v in sorted(ev["fidelity"]["per_client"].items())]
        seed = int(run.parent.name.removeprefix("seed_"))
        where = f"{run_cfg['device']}, {run_cfg.get('threads') or 'default'} threads"
        rows.append((int(ev["cut"]), seed, fids, where, metrics["train_seconds_total"]))
    print("| cut | seed | FID client " + " / ".join(str(i) for i in range(len(rows[0][2]))) +
          " | mean | device | train s (all nodes) |")
    print("|---|---|---|---|---|---|")
    for cut, seed, fids, where, seconds in sorted(rows):
        print(f"| {cut} | {seed} | {' / '.join(f'{f:.2f}' for f in fids)} | {statistics.fmean(fids):.2f} | {where} "
              f"| {seconds:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
