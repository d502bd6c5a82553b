"""Assemble results/fashion-mnist-quality/ from the quality experiment's runs (experiments/quality.sh).

Reads, for each run directory under RUNS (one per cut, written by benchmarks/convergence.py and evaluated by
``collafuse evaluate``): ``evaluation.json`` (per-client FID/KID vs held-out images), the FID-vs-wall-clock points in
``RUNS/state.json``, and the sample grids. Computes each client's real-data floor at the same sample count (FID of
``n`` of the client's training images against ``n`` of its held-out images, the same extractor), then writes into OUT:
``quality.json`` (every number), ``fid_vs_time.png`` (the FID curves) and each run's sample grids, and prints the
Markdown table that OUT/README.md quotes.

    .venv/bin/python experiments/quality_report.py runs/quality results/fashion-mnist-quality
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("out", type=Path)
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from collafuse.config import load_config
    from collafuse.data.partition import load_client_datasets
    from collafuse.evaluation.evaluate import classifier_arrays
    from collafuse.evaluation.features import get_extractor
    from collafuse.evaluation.fidelity import fid_kid
    from collafuse.split.checkpoint import write_text_atomic
    from collafuse.split.protocol import client_node

    state = json.loads((a.runs / "state.json").read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name, rs in sorted(state["runs"].items(), key=lambda kv: kv[1]["cut"]):
        ev_path = a.runs / name / "evaluation.json"
        if not ev_path.is_file():
            print(f"{name}: not evaluated yet, left out")
            continue
        runs[name] = (rs, json.loads(ev_path.read_text()))

    # The floor: the same client's real train images vs its held-out images, n vs n, same extractor and subsets.
    first = next(iter(runs))
    cfg = load_config(a.runs / first / "config.toml")
    clients = load_client_datasets(cfg.data, cfg.num_classes, cfg.seeds.data)  # the runs' own splits (same seed)
    n = runs[first][1]["n_samples_per_client"]
    n_real = next(iter(runs[first][1]["fidelity"]["per_client"].values()))["vs_test"]["n_real"]  # as evaluated
    extractor = get_extractor("classifier", data_root=cfg.data.root, cache_dir=cfg.eval.cache_dir or None,
                              arrays=classifier_arrays(cfg), progress=False)
    floor = {client_node(i): fid_kid(c.test_x[:n_real], c.train_x[:n], extractor)["fid"] for i, c in enumerate(clients)}

    rows = {}
    for name, (rs, ev) in runs.items():
        per = ev["fidelity"]["per_client"]
        rows[name] = {
            "cut": rs["cut"], "rounds": rs["rounds_done"], "train_seconds": rs["seconds"],
            "fid_vs_test": {k: v["vs_test"]["fid"] for k, v in per.items()},
            "kid_vs_test": {k: v["vs_test"]["kid_mean"] for k, v in per.items()},
            "label_mix": {k: v["label_mix"] for k, v in per.items()},
            "curve": [(q["seconds"], q["fast"]["mean"]) for q in rs["points"]],
        }
        pts = rs["points"]
        if len(pts) >= 2:  # FID change per training hour over the last stretch of the curve
            a_, b_ = pts[-2], pts[-1]
            rows[name]["slope_fid_per_hour"] = ((b_["fast"]["mean"] - a_["fast"]["mean"])
                                                / max(b_["seconds"] - a_["seconds"], 1e-9) * 3600)
        for img in sorted((a.runs / name).glob("samples_client*.png")):
            shutil.copyfile(img, a.out / f"cut{rs['cut']:04d}_{img.name}")
    result = {"n_samples_per_client": n, "n_real": n_real, "floor_fid": floor, "runs": rows,
              "curve_sampler": state.get("fast_sampler"), "sampler": cfg.sample.sampler, "steps": cfg.sample.ddim_steps,
              "eta": cfg.sample.eta}
    write_text_atomic(a.out / "quality.json", json.dumps(result, indent=1))

    names = list(floor)
    print(f"classifier FID vs held-out images, {n} samples per client ({n_real} real); floor = {n} real train images")
    print("| run | cut | rounds | train min | " + " | ".join(f"FID {c}" for c in names) + " | mean FID | mean / floor "
          "| KID (mean) | slope (FID/h) |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|---|")
    mean_floor = sum(floor.values()) / len(floor)
    print("| real floor | - | - | - | " + " | ".join(f"{floor[c]:.2f}" for c in names)
          + f" | {mean_floor:.2f} | 1.00 | - | - |")
    for name, r in rows.items():
        mean = sum(r["fid_vs_test"].values()) / len(names)
        kid = sum(r["kid_vs_test"].values()) / len(names)
        slope = r.get("slope_fid_per_hour")
        print(f"| {name} | {r['cut']} | {r['rounds']} | {r['train_seconds'] / 60:.1f} | "
              + " | ".join(f"{r['fid_vs_test'][c]:.1f}" for c in names)
              + f" | {mean:.1f} | {mean / mean_floor:.1f} | {kid:.3f} | "
              + (f"{slope:+.1f}" if slope is not None else "-") + " |")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in rows.items():
        ax.plot([s / 60 for s, _ in r["curve"]], [f for _, f in r["curve"]], "o-", label=f"cut {r['cut']} ({name})")
    ax.axhline(mean_floor, color="k", ls=":", label=f"real floor ({n} vs {n_real})")
    ax.set_xlabel("training wall-clock (min, 2 CPU cores)")
    ax.set_ylabel(f"classifier FID (mean over clients, {state.get('n', '?')} samples)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "fid_vs_time.png", dpi=110)
    print(f"wrote {a.out}/quality.json, fid_vs_time.png and the sample grids")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
