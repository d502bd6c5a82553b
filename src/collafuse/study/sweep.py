"""``collafuse sweep CONFIG --cuts 0,50,...,1000 --out DIR``: one run per cut point, each evaluated, then one report.

Resumable at every level: a finished run (``metrics.json`` with all rounds) is not trained again, a half-trained one
resumes from its checkpoint, an evaluated one (``evaluation.json`` of its last checkpoint) is not evaluated again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..evaluation.evaluate import evaluate_run
from ..evaluation.experiment import run_experiment
from ..split.checkpoint import latest_checkpoint, write_text_atomic


def parse_cuts(text: str, timesteps: int | None = None) -> list[int]:
    try:
        cuts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise ConfigError(f"--cuts = {text!r} is invalid (expected comma-separated integers, e.g. 0,200,1000)"
                          ) from None
    if not cuts:
        raise ConfigError(f"--cuts = {text!r} is invalid (expected at least one cut)")
    if timesteps is not None and not all(0 <= c <= timesteps for c in cuts):
        raise ConfigError(f"--cuts = {text!r} is invalid (allowed: integers in [0, {timesteps}] (diffusion.timesteps))")
    return cuts


def _trained(run_dir: Path, rounds: int) -> bool:
    path = run_dir / "metrics.json"
    return path.is_file() and json.loads(path.read_text()).get("rounds") == rounds


def _evaluated(run_dir: Path) -> bool:
    path, ckpt = run_dir / "evaluation.json", latest_checkpoint(run_dir / "checkpoints")
    return path.is_file() and ckpt is not None and json.loads(path.read_text()).get("checkpoint") == ckpt.name


def _evaluated_runs(sweep_dir: Path, cuts: list[int]) -> dict[int, Path]:
    """The runs among ``cuts`` under ``sweep_dir`` that have an evaluation.json (their checkpoints need not exist)."""
    runs = {cut: sweep_dir / f"cut_{cut:04d}" for cut in cuts}
    return {cut: d for cut, d in runs.items() if (d / "evaluation.json").is_file()}


def parse_baseline(text: str) -> tuple[str, Path]:
    """``LABEL=DIR`` of ``--baseline``: a sweep directory of runs without a cut (e.g. FedAvg at the same budget)."""
    label, sep, path = text.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise ConfigError(f"--baseline = {text!r} is invalid (expected LABEL=DIR, e.g. "
                          "FedAvg=results/fashion-mnist-seeds/fedavg)")
    if not Path(path).is_dir():
        raise ConfigError(f"--baseline = {text!r} is invalid ({path} is not a directory; allowed: a sweep directory "
                          "with DIR/cut_NNNN/evaluation.json, or DIR/seed_K/cut_NNNN/evaluation.json with --seeds)")
    return label.strip(), Path(path)


def baseline_run(sweep_dir: Path, label: str) -> Path | None:
    """The one evaluated run of a baseline under ``sweep_dir`` (its ``cut_NNNN/``); None when there is none."""
    found = sorted(d for d in sweep_dir.glob("cut_*") if (d / "evaluation.json").is_file())
    if len(found) > 1:
        raise ConfigError(f"--baseline {label}={sweep_dir.parent if sweep_dir.name.startswith('seed_') else sweep_dir}"
                          f" is invalid ({len(found)} evaluated runs under {sweep_dir}: "
                          f"{', '.join(d.name for d in found)}; allowed: exactly one per seed)")
    return found[0] if found else None


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise ConfigError(f"--seeds = {text!r} is invalid (expected comma-separated integers >= 0, e.g. 0,1,2)"
                          ) from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds = {text!r} is invalid (expected comma-separated integers >= 0, e.g. 0,1,2)")
    return seeds


# Seed k moves every shared seed by k * SEED_STRIDE, far from the small integers configs use.
SEED_STRIDE = 1000


def seed_overrides(base: Config, seed: int, vary_partition: bool = False) -> list[str]:
    """Config overrides for seed ``seed``: the server's model init, training noise and sampling noise move (and the
    partition with ``vary_partition``); seed 0 is the config as written. The clients' streams move with their
    secrets, one file per seed (`run_sweep`)."""
    keys = ["init", "noise", "sample"] + (["data"] if vary_partition else [])
    return [f"seeds.{k}={getattr(base.seeds, k) + SEED_STRIDE * seed}" for k in keys]


def run_sweep(config: str | Path, cuts: list[int], out: Path, overrides: list[str] | tuple[str, ...] = (),
              progress: bool = True, command: str = "", secrets: dict | None = None,
              seeds: list[int] | None = None, vary_partition: bool = False, report_only: bool = False,
              baselines: dict[str, Path] | None = None) -> Path:
    """Train and evaluate one run per cut under ``out/cut_NNNN``, then write ``out/report.md`` and
    ``out/metrics.json``; returns the report path. ``secrets``: explicit client secrets for every run (see
    ``run_experiment``); by default each run's clients draw their own.

    ``report_only``: train and evaluate nothing; summarise the runs that have an ``evaluation.json`` (a committed
    copy of a sweep's small files is enough: no checkpoint, no secrets), skipping the others. It is how a sweep
    that spans machines is summarised from the results each machine committed.

    With ``seeds``: one such sweep per seed under ``out/seed_K/``, every cut of a seed with the same client secrets
    (``out/seed_K/client-secrets.toml``, drawn from OS entropy once: the sweep plays every client, so it holds
    their secrets; never hand that file to a server), then the summary over seeds in ``out/`` (`seed_summary`).

    ``baselines``: label -> a sweep directory holding one evaluated run without a cut (FedAvg: ``collafuse sweep
    ... --cuts 1000 --set split.algorithm=fedavg``), per seed under ``seed_K/`` with ``seeds``; each report adds it
    to its tables and plots. Nothing of it is trained here."""
    from .sweep_report import write_sweep_report

    base = load_config(config, overrides)
    parse_cuts(",".join(map(str, cuts)), base.diffusion.timesteps)
    out.mkdir(parents=True, exist_ok=True)
    if seeds is not None:
        if secrets is not None:
            raise ConfigError("--client-secrets and --seeds exclude each other (with --seeds each seed's clients "
                              "get secrets of their own, DIR/seed_K/client-secrets.toml)")
        from ..split.seeding import read_secrets_file, write_secrets_file
        from .seed_summary import write_seed_summary

        runs_by_seed = {}
        base_by_seed = {label: {s: r for s in seeds if (r := baseline_run(d / f"seed_{s}", label)) is not None}
                        for label, d in (baselines or {}).items()}
        for label, found in base_by_seed.items():
            if not found:
                raise ConfigError(f"--baseline {label}={baselines[label]} is invalid (no evaluated run under "
                                  f"{baselines[label]}/seed_K/cut_NNNN for --seeds {','.join(map(str, seeds))})")
        for seed in seeds:
            seed_base = {label: found[seed] for label, found in base_by_seed.items() if seed in found}
            seed_dir = out / f"seed_{seed}"
            if report_only:
                found = _evaluated_runs(seed_dir, cuts)
                if found:
                    write_sweep_report(found, seed_dir, base, f"{command} (seed {seed})", seed_base)
                    runs_by_seed[seed] = found
                continue
            path = seed_dir / "client-secrets.toml"
            seed_secrets = read_secrets_file(path) if path.exists() else write_secrets_file(
                path, base.data.num_clients)
            extra = [*overrides, *seed_overrides(base, seed, vary_partition)]
            run_sweep(config, cuts, seed_dir, extra, progress, f"{command} (seed {seed})", seed_secrets,
                      baselines={label: baselines[label] / f"seed_{seed}" for label in seed_base} or None)
            runs_by_seed[seed] = {cut: seed_dir / f"cut_{cut:04d}" for cut in cuts}
        if not runs_by_seed:
            raise ConfigError(f"--report-only: no run of --seeds {','.join(map(str, seeds))} x --cuts "
                              f"{','.join(map(str, cuts))} under {out} has an evaluation.json (allowed: a sweep "
                              "directory with evaluated runs, DIR/seed_K/cut_NNNN/evaluation.json)")
        write_text_atomic(out / "COMMAND", (command or f"run_sweep({config!s}, {cuts}, seeds={seeds})") + "\n")
        return write_seed_summary(runs_by_seed, out, base.diffusion.timesteps, command, base_by_seed)
    single = {}
    for label, d in (baselines or {}).items():
        if (r := baseline_run(d, label)) is None:
            raise ConfigError(f"--baseline {label}={d} is invalid (no evaluated run under {d}/cut_NNNN)")
        single[label] = r
    if report_only:
        runs = _evaluated_runs(out, cuts)
        if not runs:
            raise ConfigError(f"--report-only: no run of --cuts {','.join(map(str, cuts))} under {out} has an "
                              "evaluation.json (allowed: a sweep directory with evaluated runs, "
                              "DIR/cut_NNNN/evaluation.json)")
        return write_sweep_report(runs, out, base, command, single)
    runs = {}
    for cut in cuts:
        cfg = load_config(config, [*overrides, f"split.cut={cut}"])
        run_dir = out / f"cut_{cut:04d}"
        if progress:
            print(f"[sweep] cut {cut}: {run_dir}", file=sys.stderr)
        if not _trained(run_dir, cfg.train.rounds):
            run_experiment(cfg, run_dir, resume=True, progress=progress, command=f"{command} (cut {cut})",
                           secrets=secrets)
        if not _evaluated(run_dir):
            evaluate_run(run_dir, progress=progress)  # its config.toml carries the sweep's [eval] settings
        runs[cut] = run_dir
    write_text_atomic(out / "COMMAND", (command or f"run_sweep({config!s}, {cuts})") + "\n")
    return write_sweep_report(runs, out, base, command, single)
