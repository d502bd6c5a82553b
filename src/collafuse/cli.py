"""Command line: ``collafuse run`` trains and samples a federation; ``collafuse sample`` samples a trained run.

Bad input (config, data, checkpoint) ends with one line on stderr and exit code 2; Ctrl-C ends with 130 after
telling how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config
from .data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="collafuse", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train a federation, sample every client, write the report")
    run.add_argument("config", help="TOML config, e.g. configs/demo.toml")
    run.add_argument("--out", required=True, help="run directory (outputs, checkpoints, message log)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.rounds=5 (repeatable)")
    run.add_argument("--device", help="torch device, overrides run.device (e.g. cpu, cuda)")
    run.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    smp = sub.add_parser("sample", help="generate images for one client from a trained run")
    smp.add_argument("run_dir", help="a directory written by 'collafuse run'")
    smp.add_argument("--client", type=int, required=True, help="client index")
    smp.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    smp.add_argument("--out", required=True, help="output directory")
    smp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="sampling overrides, e.g. --set sample.sampler=ddpm --set seeds.sample=7")
    smp.add_argument("--device", help="torch device, overrides run.device")
    smp.add_argument("--quiet", action="store_true", help="no progress bars")
    ev = sub.add_parser("evaluate", help="fidelity, disclosure, compute and communication of a trained run")
    ev.add_argument("run_dir", help="a directory written by 'collafuse run'")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="evaluation overrides, e.g. --set eval.n_samples=1000 --set eval.extractor=inception")
    ev.add_argument("--device", help="torch device, overrides run.device")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    sw = sub.add_parser("sweep", help="one run per cut point, each evaluated, and one report")
    sw.add_argument("config", help="TOML config, e.g. configs/sweep.toml")
    sw.add_argument("--cuts", default="0,50,100,200,300,500,1000",
                    help="comma-separated cut points (default: %(default)s)")
    sw.add_argument("--out", required=True, help="sweep directory (one run directory per cut, report.md)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run, e.g. --set train.rounds=40")
    sw.add_argument("--device", help="torch device, overrides run.device")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _with_device(overrides: list[str], device: str | None) -> list[str]:
    return overrides + ([f"run.device={json.dumps(device)}"] if device else [])


def cmd_run(args) -> int:
    from .experiment import run_experiment

    cfg: Config = load_config(args.config, _with_device(args.overrides, args.device))
    out = Path(args.out)
    try:
        report = run_experiment(cfg, out, args.resume, not args.quiet, "collafuse " + shlex.join(sys.argv[1:]))
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: collafuse run {args.config} --out {out} --resume", file=sys.stderr)
        return 130
    print(f"outputs: {out}/ (samples_client*.png, cut_client*.png, real_client*.png, metrics.json, "
          f"message_log.jsonl, config.toml)\nreport: {report}")
    return 0


def cmd_sample(args) -> int:
    from .report import write_client_images
    from .runner import load_run
    from .transport import MessageLog

    if args.n < 1:
        raise ConfigError(f"--n = {args.n} is invalid (allowed: an integer >= 1)")
    out = Path(args.out)
    fed = load_run(Path(args.run_dir), _with_device(args.overrides, args.device), MessageLog(out / "message_log.jsonl"))
    if not 0 <= args.client < fed.cfg.data.num_clients:
        raise ConfigError(f"--client = {args.client} is invalid (allowed: 0..{fed.cfg.data.num_clients - 1})")
    out.mkdir(parents=True, exist_ok=True)
    fed.set_progress(not args.quiet)
    write_client_images(fed, args.client, args.n, out, real=False)
    print(f"wrote {out}/samples_client{args.client}.png, cut_client{args.client}.png, "
          f"samples_client{args.client}.safetensors")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run

    run_dir = Path(args.run_dir)
    result = evaluate_run(run_dir, _with_device(args.overrides, args.device), progress=not args.quiet)
    print(f"wrote {run_dir}/evaluation.json (cut {result['cut']}, {result['n_samples_per_client']} samples per "
          f"client, extractor {result['extractor']['name']})")
    return 0


def cmd_sweep(args, argv: list[str] | None = None) -> int:
    from .sweep import parse_cuts, run_sweep

    overrides = _with_device(args.overrides, args.device)
    try:
        report = run_sweep(args.config, parse_cuts(args.cuts), Path(args.out), overrides, progress=not args.quiet,
                           command="collafuse " + shlex.join(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        print(f"\ninterrupted; the same command resumes: collafuse sweep {args.config} --cuts {args.cuts} "
              f"--out {args.out}", file=sys.stderr)
        return 130
    print(f"report: {report}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for a model hub
    args = _parser().parse_args(argv)
    try:
        if args.command == "sweep":
            return cmd_sweep(args, argv)
        commands = {"run": cmd_run, "sample": cmd_sample, "evaluate": cmd_evaluate}
        return commands[args.command](args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
