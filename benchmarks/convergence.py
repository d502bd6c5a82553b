"""Which training recipe reaches a lower FID per CPU-hour? FID against training wall-clock, old recipe vs new.

Trains one config (default configs/demo.toml) under each recipe at each cut, the runs interleaved round by round in this
one process, so that anything else the machine does slows every run alike. Each run's clock counts its training rounds
only (not the evaluations). Every ``--eval-every`` rounds, and after the last one, each client draws ``--n`` samples
through the real split with the fast sampler (``--fast``, kind:steps:eta) and the project's classifier-feature FID
against its held-out images is taken (``collafuse.evaluation.fidelity.fid_kid``); the mean over clients is plotted
against the run's training seconds. With ``--ddpm-n N`` the last point of each run is also scored with DDPM-1000 on N
samples per client (1-2 s per image on 2 CPU cores: expensive); runs that finished earlier get it when the same command
is given ``--ddpm-n``.

Recipes (``--recipe NAME=key=value;key=value``, repeatable; defaults below):

- ``old``: the recipe of the committed results: fp32, constant lr 1e-3, unweighted loss;
- ``new``: bf16 autocast, lr warm-up then cosine decay, Min-SNR-5 weights (Hang et al. 2023), and for the server the
  k_t^2 factor that equalises its absolute epsilon error with an unsplit model's (``train.server_abs_eps_weight``).

A recipe's ``train.rounds`` can differ from the base config's, so that recipes of different speed fill about the
same wall-clock. Runs checkpoint every round under ``--out``; the same command resumes an interrupted benchmark.
Both recipes use the same client secrets (written once to ``--out``), so init, data order and noise match.

    .venv/bin/python benchmarks/convergence.py --out runs/convergence --json results/convergence/convergence.json \
        --plot results/convergence/fid_vs_time.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_RECIPES = {
    "old": "train.precision=fp32;train.lr_schedule=constant;train.min_snr_gamma=0;train.server_abs_eps_weight=false",
    "new": "train.precision=bf16;train.lr_schedule=cosine;train.lr_warmup_steps=100;train.min_snr_gamma=5;"
           "train.server_abs_eps_weight=true",
}


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"error: --recipe {text!r} is invalid (allowed: NAME=key=value;key=value)")
    return name, [o for o in body.split(";") if o]


def parse_sampler(text: str) -> tuple[str, int, float]:
    try:
        kind, steps, eta = text.split(":")
        return kind, int(steps), float(eta)
    except ValueError:
        raise SystemExit(f"error: sampler {text!r} is invalid (allowed: KIND:STEPS:ETA, e.g. ddim:50:1)") from None


def score(fed, spec: tuple[str, int, float], n: int, extractor, tag: str) -> dict[str, float]:
    """Mean and per-client classifier FID of ``n`` samples per client drawn with sampler ``spec``."""
    from collafuse.evaluation.evaluate import sample_fids

    kind, steps, eta = spec
    sp = fed.cfg.sample
    saved = (sp.sampler, sp.ddim_steps, sp.eta)
    sp.sampler, sp.ddim_steps, sp.eta = kind, steps, eta  # the server and the clients share this config object
    try:
        fids, _ = sample_fids(fed, n, extractor, "convergence", tag, fed.cfg.seeds.sample)
    finally:
        sp.sampler, sp.ddim_steps, sp.eta = saved
    return {"mean": sum(fids.values()) / len(fids), **fids}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    p.add_argument("--cuts", default="0,200", help="comma-separated cuts (default: %(default)s)")
    p.add_argument("--recipe", action="append", default=[], help="NAME=key=value;... (default: old and new, above)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for every run")
    p.add_argument("--eval-every", type=int, default=10, help="rounds between FID points (default: %(default)s)")
    p.add_argument("--n", type=int, default=100, help="samples per client for each FID point (default: %(default)s)")
    p.add_argument("--fast", default="ddim:50:1", help="fast sampler KIND:STEPS:ETA (default: %(default)s)")
    p.add_argument("--ddpm-n", type=int, default=0, help="DDPM-1000 samples per client at each run's end (0: none)")
    p.add_argument("--grids", type=int, default=0, help="at the end, write N-image sample grids into each run dir")
    p.add_argument("--report-only", action="store_true", help="train nothing: table, JSON and plot of --out's state")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("runs/convergence"))
    p.add_argument("--json", type=Path, default=REPO / "results" / "convergence" / "convergence.json")
    p.add_argument("--plot", type=Path, default=REPO / "results" / "convergence" / "fid_vs_time.png")
    a = p.parse_args()

    import torch
    from tqdm import tqdm

    from collafuse.config import load_config
    from collafuse.evaluation.evaluate import classifier_arrays
    from collafuse.evaluation.features import get_extractor
    from collafuse.evaluation.report import write_client_images
    from collafuse.split.checkpoint import write_text_atomic
    from collafuse.split.runner import Federation
    from collafuse.split.seeding import read_secrets_file, write_secrets_file

    if a.threads:
        torch.set_num_threads(a.threads)
    recipes = dict(parse_recipe(r) for r in a.recipe) if a.recipe else {
        k: [o for o in v.split(";") if o] for k, v in DEFAULT_RECIPES.items()}
    cuts = [int(c) for c in a.cuts.split(",")]
    fast = parse_sampler(a.fast)
    a.out.mkdir(parents=True, exist_ok=True)
    state_path = a.out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"runs": {}}
    state.setdefault("fast_sampler", a.fast)
    state.setdefault("n", a.n)
    if a.report_only:
        summarize(state, {"config": a.config}, a.json, a.plot)
        return 0

    base = load_config(a.config, a.overrides)
    secrets_path = a.out / "secrets.toml"  # the benchmark plays every client, so it holds their secrets
    if not secrets_path.exists():
        write_secrets_file(secrets_path, base.data.num_clients)
    secrets = read_secrets_file(secrets_path)

    runs = {}
    for recipe, opts in recipes.items():
        for cut in cuts:
            name = f"{recipe}-cut{cut}"
            cfg = load_config(a.config, [*a.overrides, *opts, f"split.cut={cut}"])
            fed = Federation(cfg, secrets=secrets)
            fed.set_progress(False)
            fed.restore(a.out / name / "checkpoints")
            (a.out / name).mkdir(exist_ok=True)
            write_text_atomic(a.out / name / "config.toml", cfg.to_toml())  # so `collafuse evaluate` reads the run
            rs = state["runs"].setdefault(name, {"recipe": recipe, "cut": cut, "overrides": opts, "seconds": 0.0,
                                                 "rounds_done": 0, "points": []})
            if rs["rounds_done"] != fed.history.rounds_done:  # killed between checkpoint and state: trust the former
                rs["rounds_done"] = fed.history.rounds_done
                rs["points"] = [q for q in rs["points"] if q["round"] <= rs["rounds_done"]]
            runs[name] = (fed, rs)
    extractor = get_extractor("classifier", data_root=base.data.root, cache_dir=base.eval.cache_dir or None,
                              arrays=classifier_arrays(base), progress=False)

    def save_state() -> None:
        write_text_atomic(state_path, json.dumps(state, indent=1))

    if a.ddpm_n:  # runs that finished before --ddpm-n was asked for: their last point gets its DDPM-1000 score now
        for name, (fed, rs) in runs.items():
            pts = rs["points"]
            if rs["rounds_done"] >= fed.cfg.train.rounds and pts and "ddpm" not in pts[-1]:
                pts[-1]["ddpm"] = score(fed, ("ddpm", 1000, 0.0), a.ddpm_n, extractor, f"r{pts[-1]['round']}")
                print(f"{name} round {pts[-1]['round']}: DDPM FID {pts[-1]['ddpm']['mean']:.1f}", flush=True)
                save_state()

    total = sum(f.cfg.train.rounds for f, _ in runs.values())
    bar = tqdm(total=total, initial=sum(rs["rounds_done"] for _, rs in runs.values()), desc="rounds (all runs)",
               dynamic_ncols=True)
    while any(rs["rounds_done"] < f.cfg.train.rounds for f, rs in runs.values()):
        for name, (fed, rs) in runs.items():
            rounds = fed.cfg.train.rounds
            if rs["rounds_done"] >= rounds:
                continue
            r = rs["rounds_done"] + 1
            t0 = time.perf_counter()
            fed.run_round(r)
            rs["seconds"] += time.perf_counter() - t0
            fed.save(a.out / name / "checkpoints")
            rs["rounds_done"] = r
            if r % a.eval_every == 0 or r == rounds:
                point = {"round": r, "seconds": rs["seconds"], "fast": score(fed, fast, a.n, extractor, f"r{r}")}
                if r == rounds and a.ddpm_n:
                    point["ddpm"] = score(fed, ("ddpm", 1000, 0.0), a.ddpm_n, extractor, f"r{r}")
                rs["points"].append(point)
                bar.write(f"{name} round {r}: {rs['seconds']:.0f} s, fast FID {point['fast']['mean']:.1f}"
                          + (f", DDPM FID {point['ddpm']['mean']:.1f}" if "ddpm" in point else ""))
            save_state()
            bar.update(1)
    bar.close()
    if a.grids:
        for name, (fed, rs) in runs.items():
            sp = fed.cfg.sample
            key = [rs["rounds_done"], a.grids, f"{sp.sampler}:{sp.ddim_steps}:{sp.eta:g}"]
            if rs.get("grids") == key:
                continue  # a resumed, finished benchmark: this run's grids are already there, drawn the same way
            for c in fed.clients:  # the configured [sample] sampler, as `collafuse run` draws its grids
                write_client_images(fed, c.index, a.grids, a.out / name)
            rs["grids"] = key
            save_state()

    meta = {"config": a.config, "overrides": a.overrides, "fast_sampler": a.fast, "n": a.n, "ddpm_n": a.ddpm_n,
            "threads": torch.get_num_threads(), "recipes": recipes}
    summarize(state, meta, a.json, a.plot)
    return 0


def summarize(state: dict, meta: dict, json_path: Path | None, plot_path: Path) -> None:
    """Table, ratios to the first recipe, JSON and plot of every run in the benchmark's state (all recipes run
    into this --out so far, not only this invocation's)."""
    from collafuse.split.checkpoint import write_text_atomic

    runs = state["runs"]
    recipes = list(dict.fromkeys(rs["recipe"] for rs in runs.values()))
    cuts = sorted({rs["cut"] for rs in runs.values()})
    fast, n = state.get("fast_sampler", meta.get("fast_sampler")), state.get("n", meta.get("n"))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(json_path, json.dumps({**meta, "runs": runs}, indent=1))
    print(f"\n{n} samples per client, fast sampler {fast}; classifier FID (mean over clients) vs held-out images")
    print("| run | rounds | train s | s/round | final fast FID | best fast FID | DDPM-1000 FID |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        pts = rs["points"]
        last = pts[-1] if pts else {}
        ddpm = last.get("ddpm", {}).get("mean", math.nan)
        print(f"| {name} | {rs['rounds_done']} | {rs['seconds']:.0f} | {rs['seconds'] / max(rs['rounds_done'], 1):.2f} "
              f"| {last.get('fast', {}).get('mean', math.nan):.1f} | "
              f"{min((q['fast']['mean'] for q in pts), default=math.nan):.1f} | {ddpm:.1f} |")
    for cut in cuts:
        ref = runs.get(f"{recipes[0]}-cut{cut}")
        for recipe in recipes[1:]:
            rs = runs.get(f"{recipe}-cut{cut}")
            if ref and rs and ref["points"] and rs["points"]:
                print(f"cut {cut}: final fast FID {recipe}/{recipes[0]} = "
                      f"{rs['points'][-1]['fast']['mean'] / ref['points'][-1]['fast']['mean']:.2f}, "
                      f"training time {recipe}/{recipes[0]} = {rs['seconds'] / ref['seconds']:.2f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cuts), figsize=(5.5 * len(cuts), 4), squeeze=False)
    for ax, cut in zip(axes[0], cuts):
        for recipe in recipes:
            if f"{recipe}-cut{cut}" not in runs:
                continue
            pts = runs[f"{recipe}-cut{cut}"]["points"]
            line, = ax.plot([q["seconds"] / 60 for q in pts], [q["fast"]["mean"] for q in pts], "o-",
                            label=f"{recipe}, {fast}")
            dd = [q for q in pts if "ddpm" in q]
            if dd:
                ax.plot([q["seconds"] / 60 for q in dd], [q["ddpm"]["mean"] for q in dd], "*", ms=12,
                        color=line.get_color(), label=f"{recipe}, DDPM-1000")
        ax.set_title(f"cut {cut}")
        ax.set_xlabel("training wall-clock (min)")
        ax.set_ylabel(f"classifier FID, {n} samples/client")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot_path, dpi=110)
    print(f"plot: {plot_path}")


if __name__ == "__main__":
    raise SystemExit(main())
