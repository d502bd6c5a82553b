"""The default fast sampler against the full DDPM-1000 chain, on the same trained runs (issue 11, part 3).

Each RUN directory holds two evaluations of one trained run: ``evaluation.json`` (the config's sampler, DPM-Solver++
at 25 steps for configs/quality.toml) and ``evaluation-ddpm.json`` (``collafuse evaluate RUN --output
evaluation-ddpm.json --set sample.sampler=ddpm``), both against the same held-out images with the same feature
extractor. Prints one Markdown row per run: per-client FID under each sampler, the means over clients, and the fast
sampler's mean over DDPM's. The sampler's name and step count are read from each file, not assumed.

    .venv/bin/python experiments/ddpm_table.py results/fashion-mnist-seeds/gpu-replicate/seed_1/cut_0000 \
        results/fashion-mnist-seeds/gpu-replicate/seed_1/cut_0200/ddpm-run \
        results/fashion-mnist-seeds/gpu-replicate/seed_1/cut_1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def per_client(evaluation: dict, key: str) -> list[float]:
    """One figure per client (sorted by client name), against the held-out images."""
    return [v["vs_test"][key] for _, v in sorted(evaluation["fidelity"]["per_client"].items())]


def sampler_name(evaluation: dict) -> str:
    grid = evaluation["sampler_grid"]
    return f"{grid['sampler']}-{len(grid['timesteps'])}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+", help="run directories with evaluation.json and evaluation-ddpm.json")
    a = p.parse_args()
    rows = []
    for run in a.runs:
        paths = (run / "evaluation.json", run / "evaluation-ddpm.json")
        missing = [str(q) for q in paths if not q.is_file()]
        if missing:
            print(f"error: {run}: missing {', '.join(missing)}", file=sys.stderr)
            return 2
        fast, ddpm = (json.loads(q.read_text()) for q in paths)
        if fast["cut"] != ddpm["cut"] or fast["n_samples_per_client"] != ddpm["n_samples_per_client"]:
            print(f"error: {run}: the two evaluations differ in cut or sample count", file=sys.stderr)
            return 2
        rows.append((fast, ddpm))
    print("| cut | fast sampler | FID, fast: client 0 / 1 / 2 (mean) | FID, DDPM-1000 (mean) | fast / DDPM "
          "| KID, fast (mean) | KID, DDPM (mean) |")
    print("|---|---|---|---|---|---|---|")
    for fast, ddpm in sorted(rows, key=lambda r: r[0]["cut"]):
        cells = []
        for ev, key in ((fast, "fid"), (ddpm, "fid")):
            v = per_client(ev, key)
            cells.append(f"{' / '.join(f'{x:.2f}' for x in v)} ({statistics.fmean(v):.2f})")
        ratio = statistics.fmean(per_client(fast, "fid")) / statistics.fmean(per_client(ddpm, "fid"))
        kids = [f"{statistics.fmean(per_client(ev, 'kid_mean')):.3f}" for ev in (fast, ddpm)]
        print(f"| {fast['cut']} | {sampler_name(fast)} | {cells[0]} | {cells[1]} | {ratio:.2f} | {kids[0]} "
              f"| {kids[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
