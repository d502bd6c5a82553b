"""Which sampler keeps DDPM-1000's quality at <= 100 network evaluations? FID per sampler on one trained run.

For each sampler spec (``kind:steps:eta``; DDPM runs all T steps) every client of the run draws ``--n`` samples
through the real split (server to the cut, client to x0; the client's sampling stream from its secret, the same
for every spec), and the project's classifier-feature FID against the client's held-out images is computed
(``collafuse.fidelity.fid_kid``, the extractor ``collafuse evaluate`` uses). Printed: network evaluations per
image, seconds per image, FID per client and the mean FID relative to DDPM-1000.

    .venv/bin/python benchmarks/sampler_fid.py runs/demo --n 100 --specs ddpm:1000:0,ddim:50:0,ddim:50:1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from collafuse.evaluate import classifier_arrays
from collafuse.features import get_extractor
from collafuse.fidelity import fid_kid
from collafuse.runner import load_run


def parse_spec(text: str) -> tuple[str, int, float]:
    kind, steps, eta = text.split(":")
    if kind not in ("ddpm", "ddim"):
        raise SystemExit(f"error: sampler spec {text!r} is invalid (allowed: ddpm:STEPS:ETA or ddim:STEPS:ETA)")
    return kind, int(steps), float(eta)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=100, help="samples per client and sampler (default: %(default)s)")
    p.add_argument("--specs", default="ddpm:1000:0,ddim:50:0,ddim:100:0,ddim:50:1,ddim:100:1,ddim:25:1",
                   help="comma-separated kind:steps:eta (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    a = p.parse_args()
    specs = [parse_spec(s) for s in a.specs.split(",")]
    base = load_run(a.run_dir)
    cfg = base.cfg
    extractor = get_extractor("classifier", data_root=cfg.data.root, cache_dir=cfg.eval.cache_dir or None,
                              arrays=classifier_arrays(cfg), progress=False)
    rows = []
    for kind, steps, eta in specs:
        fed = load_run(a.run_dir, [f"sample.sampler={kind}", f"sample.ddim_steps={steps}", f"sample.eta={eta}"])
        row = {"sampler": kind, "steps": steps, "eta": eta, "fid": {}, "seconds_per_image": 0.0}
        seconds = 0.0
        for c in fed.clients:
            t0 = time.perf_counter()
            out = fed.sample(c.index, a.n, c.stream("sampler-fid", cfg.seeds.sample))
            seconds += time.perf_counter() - t0  # sampling only, not the FID
            row["fid"][c.node_id] = fid_kid(c.data.test_x[:2000], out["x0"], extractor)["fid"]
        row["seconds_per_image"] = seconds / (a.n * len(fed.clients))
        sched = fed.server.schedule.sampler(kind, cfg.cut, steps)
        row["network_evaluations"] = len(sched.timesteps) * (2 if cfg.sample.guidance_scale != 1 else 1)
        rows.append(row)
        print(f"{kind}-{steps} eta {eta:g}: {row['network_evaluations']} NFE, {row['seconds_per_image']:.3f} s/image, "
              + ", ".join(f"{k} FID {v:.1f}" for k, v in row["fid"].items()), flush=True)
    ref = next((r for r in rows if r["sampler"] == "ddpm"), rows[0])
    mean_ref = sum(ref["fid"].values()) / len(ref["fid"])
    print(f"\nrun {a.run_dir} (cut {cfg.cut}, {base.history.rounds_done} rounds), {a.n} samples per client; "
          f"classifier FID vs held-out images")
    names = list(ref["fid"])
    print("| sampler | eta | NFE | s/image | " + " | ".join(f"FID {n}" for n in names) + " | mean FID / DDPM |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    for r in rows:
        mean = sum(r["fid"].values()) / len(r["fid"])
        r["mean_fid_vs_ref"] = mean / mean_ref
        print(f"| {r['sampler']}-{r['steps']} | {r['eta']:g} | {r['network_evaluations']} | "
              f"{r['seconds_per_image']:.3f} | " + " | ".join(f"{r['fid'][n]:.1f}" for n in names)
              + f" | {mean / mean_ref:.2f} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"run": str(a.run_dir), "n": a.n, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
