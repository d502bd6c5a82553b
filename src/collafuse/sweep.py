"""``collafuse sweep CONFIG --cuts 0,50,...,1000 --out DIR``: one run per cut point, each evaluated, then one report.

Resumable at every level: a finished run (``metrics.json`` with all rounds) is not trained again, a half-trained one
resumes from its checkpoint, an evaluated one (``evaluation.json`` of its last checkpoint) is not evaluated again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import latest_checkpoint, write_text_atomic
from .config import ConfigError, load_config
from .evaluate import evaluate_run
from .experiment import run_experiment


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


def run_sweep(config: str | Path, cuts: list[int], out: Path, overrides: list[str] | tuple[str, ...] = (),
              progress: bool = True, command: str = "", secrets: dict | None = None) -> Path:
    """Train and evaluate one run per cut under ``out/cut_NNNN``, then write ``out/report.md`` and
    ``out/metrics.json``; returns the report path. ``secrets``: explicit client secrets for every run (see
    ``run_experiment``); by default each run's clients draw their own."""
    from .sweep_report import write_sweep_report

    base = load_config(config, overrides)
    parse_cuts(",".join(map(str, cuts)), base.diffusion.timesteps)
    out.mkdir(parents=True, exist_ok=True)
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
    return write_sweep_report(runs, out, base, command)
