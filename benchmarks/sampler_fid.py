"""Which sampler keeps DDPM-1000's quality at <= 100 network evaluations? FID per sampler on one trained run.

For each sampler spec (``kind:steps:eta``: ddpm, ddim or dpmsolver; DDPM runs all T steps, eta is DDIM's) every
client of the run draws ``--n`` samples through the real split (server to the cut, client to x0; the client's sampling
stream from its secret, the same for every spec), and the project's classifier-feature FID against the client's
held-out images is computed (``collafuse.evaluation.evaluate.sample_fids``, the extractor ``collafuse evaluate`` uses).
Printed: network evaluations per image, seconds per image, FID per client and the mean FID relative to DDPM-1000.
Every fast sampler is drawn ``--repeats`` times from different client streams, so the table shows the FID's own
sampling noise beside the differences between samplers (DDPM-1000, ~1-2 s per image on 2 CPU cores, once by
default). With ``--json`` the numbers are written after every draw and the same command resumes an interrupted
table.

    .venv/bin/python benchmarks/sampler_fid.py runs/demo --n 100 --specs ddpm:1000:0,ddim:50:0,ddim:50:1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from collafuse.evaluation.evaluate import classifier_arrays, sample_fids
from collafuse.evaluation.features import get_extractor
from collafuse.split.checkpoint import write_text_atomic
from collafuse.split.runner import load_run


def parse_spec(text: str) -> tuple[str, int, float]:
    try:
        kind, steps, eta = text.split(":")
        if kind not in ("ddpm", "ddim", "dpmsolver"):
            raise ValueError(kind)
        return kind, int(steps), float(eta)
    except ValueError:
        raise SystemExit(f"error: sampler spec {text!r} is invalid (allowed: KIND:STEPS:ETA with KIND ddpm, ddim "
                         f"or dpmsolver, e.g. ddim:50:1)") from None


def client_mean(fids: dict[str, float]) -> float:
    return sum(fids.values()) / len(fids)


def repeat_means(row: dict) -> list[float]:
    """The row's mean-over-clients FID of each repeat (rows from before repeats hold one: their ``fid``)."""
    return [client_mean(f) for f in row.get("repeats", [row["fid"]])]


def print_table(run_dir: Path, cut: int, rounds: int, n: int, rows: list[dict]) -> None:
    ref = next((r for r in rows if r["sampler"] == "ddpm"), rows[0])
    names = list(ref["fid"])
    mean_ref = statistics.mean(repeat_means(ref))
    print(f"\nrun {run_dir} (cut {cut}, {rounds} rounds), {n} samples per client; classifier FID vs held-out images; "
          f"per client: the first draw; mean: over clients, then over the sampler's repeats (± their std)")
    print("| sampler | eta | NFE | s/image | " + " | ".join(f"FID {c}" for c in names)
          + " | repeats | mean FID | mean / DDPM |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for r in rows:
        means = repeat_means(r)
        mean = statistics.mean(means)
        spread = f" ± {statistics.stdev(means):.1f}" if len(means) > 1 else ""
        r["mean_fid_vs_ref"] = mean / mean_ref
        print(f"| {r['sampler']}-{r['steps']} | {r['eta']:g} | {r['network_evaluations']} | "
              f"{r['seconds_per_image']:.3f} | " + " | ".join(f"{r['fid'][c]:.1f}" for c in names)
              + f" | {len(means)} | {mean:.1f}{spread} | {mean / mean_ref:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--n", type=int, default=100, help="samples per client and sampler (default: %(default)s)")
    p.add_argument("--specs", default="ddpm:1000:0,ddim:50:0,ddim:100:0,ddim:50:1,ddim:100:1,ddim:25:1",
                   help="comma-separated kind:steps:eta (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="draws of every fast sampler, each from its own client stream, for the FID's sampling noise "
                        "(default: %(default)s)")
    p.add_argument("--ddpm-repeats", type=int, default=1, help="draws of DDPM-1000 (default: %(default)s)")
    p.add_argument("--json", type=Path, help="write the numbers here after every draw; an existing file for the "
                                             "same run and n is resumed (its draws are not made again)")
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

    def save(rows: list[dict]) -> None:
        """Write this invocation's rows so far and every row of the resumed file not reached yet (a table killed
        halfway keeps all its draws)."""
        if a.json:
            reached = {(r["sampler"], r["steps"], r["eta"]) for r in rows if r}
            rest = [r for key, r in done.items() if key not in reached]
            a.json.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(a.json, json.dumps({"run": str(a.run_dir), "cut": cfg.cut, "n": a.n,
                                                  "rounds": base.history.rounds_done,
                                                  "rows": [r for r in rows if r] + rest}, indent=1))

    rows = []
    for kind, steps, eta in specs:
        row = done.get((kind, steps, eta))
        if row is not None:
            row.setdefault("repeats", [row["fid"]])
            row.setdefault("seconds_per_image_repeats", [row["seconds_per_image"]])
        rows.append(row)
        have, want = len(row["repeats"]) if row else 0, a.ddpm_repeats if kind == "ddpm" else a.repeats
        fed = None if have >= want else load_run(
            a.run_dir, [f"sample.sampler={kind}", f"sample.ddim_steps={steps}", f"sample.eta={eta}"])
        for rep in range(want if fed is not None else 0):
            # Draw r: the client streams named by r (repeat 0 keeps the name of the tables made before repeats), and
            # the server's own sampling stream as it stands after r draws from the checkpoint (the server draws
            # x_T and its steps' noise from it). A resumed table replays the draws it has, to put it there.
            stream = ("sampler-fid", cfg.seeds.sample) + ((rep,) if rep else ())
            if rep < have:
                replay, _ = sample_fids(fed, a.n, extractor, *stream)
                if any(abs(replay[k] - v) > 1e-6 * max(1.0, v) for k, v in row["repeats"][rep].items()):
                    print(f"warning: {kind}-{steps} eta {eta:g} draw {rep} replayed to other FIDs ({replay}): the "
                          f"checkpoint or the code changed since it was drawn", flush=True)
                continue
            fids, seconds = sample_fids(fed, a.n, extractor, *stream)
            if row is None:
                sched = fed.server.schedule.sampler(kind, cfg.cut, steps)
                row = rows[-1] = {
                    "sampler": kind, "steps": steps, "eta": eta, "fid": fids, "repeats": [],
                    "seconds_per_image_repeats": [],
                    "network_evaluations": len(sched.timesteps) * (2 if cfg.sample.guidance_scale != 1 else 1)}
            row["repeats"].append(fids)
            row["seconds_per_image_repeats"].append(seconds / (a.n * len(fed.clients)))
            row["seconds_per_image"] = statistics.mean(row["seconds_per_image_repeats"])
            print(f"{kind}-{steps} eta {eta:g} draw {rep}: {row['network_evaluations']} NFE, "
                  f"{row['seconds_per_image_repeats'][-1]:.3f} s/image, "
                  + ", ".join(f"{k} FID {v:.1f}" for k, v in fids.items()), flush=True)
            save(rows)
    print_table(a.run_dir, cfg.cut, base.history.rounds_done, a.n, rows)
    save(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
