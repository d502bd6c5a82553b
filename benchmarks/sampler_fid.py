"""Which sampler keeps DDPM-1000's quality at <= 100 network evaluations? FID per sampler on one trained run.

For each sampler spec (``kind:steps:eta``: ddpm, ddim or dpmsolver; DDPM runs all T steps, eta is DDIM's) every
client of the run draws ``--n`` samples through the real split (server to the cut, client to x0; the client's sampling
stream from its secret, the same for every spec), and the project's classifier-feature FID against the client's
held-out images is computed (``collafuse.evaluate.sample_fids``, the extractor ``collafuse evaluate`` uses).
Printed: network evaluations per image, seconds per image, FID per client and the mean FID relative to DDPM-1000.
With ``--json`` the numbers are written after every sampler and the same command resumes an interrupted table
(DDPM-1000 costs ~1-2 s per image on 2 CPU cores).

    .venv/bin/python benchmarks/sampler_fid.py runs/demo --n 100 --specs ddpm:1000:0,ddim:50:0,ddim:50:1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from collafuse.checkpoint import write_text_atomic
from collafuse.evaluate import classifier_arrays, sample_fids
from collafuse.features import get_extractor
from collafuse.runner import load_run


def parse_spec(text: str) -> tuple[str, int, float]:
    try:
        kind, steps, eta = text.split(":")
        if kind not in ("ddpm", "ddim", "dpmsolver"):
            raise ValueError(kind)
        return kind, int(steps), float(eta)
    except ValueError:
        raise SystemExit(f"error: sampler spec {text!r} is invalid (allowed: KIND:STEPS:ETA with KIND ddpm, ddim "
                         f"or dpmsolver, e.g. ddim:50:1)") from None


def print_table(run_dir: Path, cut: int, rounds: int, n: int, rows: list[dict]) -> None:
    ref = next((r for r in rows if r["sampler"] == "ddpm"), rows[0])
    names = list(ref["fid"])
    mean_ref = sum(ref["fid"].values()) / len(names)
    print(f"\nrun {run_dir} (cut {cut}, {rounds} rounds), {n} samples per client; classifier FID vs held-out images")
    print("| sampler | eta | NFE | s/image | " + " | ".join(f"FID {c}" for c in names) + " | mean FID | mean / DDPM |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|")
    for r in rows:
        mean = sum(r["fid"].values()) / len(names)
        r["mean_fid_vs_ref"] = mean / mean_ref
        print(f"| {r['sampler']}-{r['steps']} | {r['eta']:g} | {r['network_evaluations']} | "
              f"{r['seconds_per_image']:.3f} | " + " | ".join(f"{r['fid'][c]:.1f}" for c in names)
              + f" | {mean:.1f} | {mean / mean_ref:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=100, help="samples per client and sampler (default: %(default)s)")
    p.add_argument("--specs", default="ddpm:1000:0,ddim:50:0,ddim:100:0,ddim:50:1,ddim:100:1,ddim:25:1",
                   help="comma-separated kind:steps:eta (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the numbers here after every sampler; an existing file for the "
                                             "same run and n is resumed (its samplers are not drawn again)")
    a = p.parse_args()
    specs = [parse_spec(s) for s in a.specs.split(",")]
    base = load_run(a.run_dir)
    cfg = base.cfg
    done = {}
    if a.json and a.json.is_file():
        old = json.loads(a.json.read_text())
        if old.get("run") == str(a.run_dir) and old.get("n") == a.n and old.get("rounds") == base.history.rounds_done:
            done = {(r["sampler"], r["steps"], r["eta"]): r for r in old["rows"]}
    extractor = get_extractor("classifier", data_root=cfg.data.root, cache_dir=cfg.eval.cache_dir or None,
                              arrays=classifier_arrays(cfg), progress=False)
    rows = []
    for kind, steps, eta in specs:
        if (kind, steps, eta) in done:
            rows.append(done[(kind, steps, eta)])
            continue
        fed = load_run(a.run_dir, [f"sample.sampler={kind}", f"sample.ddim_steps={steps}", f"sample.eta={eta}"])
        fids, seconds = sample_fids(fed, a.n, extractor, "sampler-fid", cfg.seeds.sample)  # same stream every spec
        sched = fed.server.schedule.sampler(kind, cfg.cut, steps)
        row = {"sampler": kind, "steps": steps, "eta": eta, "fid": fids,
               "seconds_per_image": seconds / (a.n * len(fed.clients)),
               "network_evaluations": len(sched.timesteps) * (2 if cfg.sample.guidance_scale != 1 else 1)}
        rows.append(row)
        print(f"{kind}-{steps} eta {eta:g}: {row['network_evaluations']} NFE, {row['seconds_per_image']:.3f} s/image, "
              + ", ".join(f"{k} FID {v:.1f}" for k, v in fids.items()), flush=True)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(a.json, json.dumps({"run": str(a.run_dir), "cut": cfg.cut, "n": a.n,
                                                  "rounds": base.history.rounds_done, "rows": rows}, indent=1))
    print_table(a.run_dir, cfg.cut, base.history.rounds_done, a.n, rows)
    if a.json:
        write_text_atomic(a.json, json.dumps({"run": str(a.run_dir), "cut": cfg.cut, "n": a.n,
                                              "rounds": base.history.rounds_done, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
