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

from .config import Config, ConfigError, load_config
from .data.common import DataError
from .flower.launch import LaunchError
from .split.checkpoint import CheckpointError
from .split.seeding import SecretError  # imports no flwr: launch only starts Flower's processes

USER_ERRORS = (ConfigError, DataError, CheckpointError, SecretError)


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
    run.add_argument("--tensorboard", action="store_true",
                     help="TensorBoard event files under OUT/tensorboard (train.tensorboard = true); grids with "
                          "--set eval.grid_every=N")
    run.add_argument("--client-secrets", metavar="FILE",
                     help="client-side TOML of explicit client secrets (client0 = \"hex\"), for a reproducible run; "
                          "default: each client draws its own from OS entropy (see 'collafuse secrets')")

    smp = sub.add_parser("sample", help="generate images for one client from a trained run")
    smp.add_argument("run_dir", help="a directory written by 'collafuse run'")
    smp.add_argument("--client", type=int, required=True, help="client index")
    smp.add_argument("--n", type=int, help="number of images, in the client's own class mix (default 64)")
    smp.add_argument("--labels", metavar="CLASS:COUNT,...",
                     help="the classes to draw and how many of each, e.g. 0:8,3:4 (instead of --n)")
    smp.add_argument("--sampler", choices=("ddpm", "ddim", "dpmsolver"), help="overrides sample.sampler")
    smp.add_argument("--steps", type=int, help="grid steps, overrides sample.ddim_steps (ddpm runs every step)")
    smp.add_argument("--seed", type=int,
                     help="one seed for both the server's and the client's steps: the same images as "
                          "CollaFusePipeline(generator=torch.Generator().manual_seed(SEED)); default: each side's "
                          "own stream")
    smp.add_argument("--out", required=True,
                     help="a .png (one grid), a .safetensors (uint8 images [N, C, H, W] and labels) or a directory "
                          "(both; with neither --labels nor --seed, the hand-offs' grid and float tensors as before)")
    smp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="sampling overrides, e.g. --set sample.sampler=ddpm --set seeds.sample=7")
    smp.add_argument("--device", help="torch device, overrides run.device")
    smp.add_argument("--quiet", action="store_true", help="no progress bars")
    ev = sub.add_parser("evaluate", help="fidelity, disclosure, compute and communication of a trained run")
    ev.add_argument("run_dir", help="a directory written by 'collafuse run'")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="evaluation overrides, e.g. --set eval.n_samples=1000 --set eval.extractor=inception")
    ev.add_argument("--device", help="torch device, overrides run.device")
    ev.add_argument("--output", default="evaluation.json", metavar="NAME",
                    help="file name inside RUN_DIR (default: %(default)s), e.g. evaluation-inception.json for a "
                         "second extractor, so the sweep's evaluation.json is kept")
    ev.add_argument("--checkpoint", metavar="ROUND",
                    help="score this checkpoint (round_000025 or 25, kept by train.keep_rounds) instead of the "
                         "latest: a point of the training curve")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    sw = sub.add_parser("sweep", help="one run per cut point, each evaluated, and one report")
    sw.add_argument("config", help="TOML config, e.g. configs/sweep.toml")
    sw.add_argument("--cuts", default="0,50,100,200,300,500,1000",
                    help="comma-separated cut points (default: %(default)s)")
    sw.add_argument("--out", required=True, help="sweep directory (one run directory per cut, report.md)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run, e.g. --set train.rounds=40")
    sw.add_argument("--device", help="torch device, overrides run.device")
    sw.add_argument("--client-secrets", metavar="FILE", help="explicit client secrets for every run (see run)")
    sw.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2: the sweep once per seed (DIR/seed_K), then "
                                    "mean and 95%% interval over seeds")
    sw.add_argument("--vary-partition", action="store_true", help="with --seeds, also re-draw the data partition")
    sw.add_argument("--report-only", action="store_true",
                    help="train and evaluate nothing: summarise the runs under --out that have an evaluation.json "
                         "(e.g. results committed from several machines)")
    sw.add_argument("--baseline", action="append", default=[], metavar="LABEL=DIR",
                    help="a sweep directory with one evaluated run without a cut (per seed: DIR/seed_K/cut_NNNN), "
                         "added to every table and plot, e.g. FedAvg=results/fashion-mnist-seeds/fedavg")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")

    st = sub.add_parser("study", help="run a study file's grid as a resumable queue (lanes, a deadline or a Ray "
                                      "cluster), copy each finished run's small files to the results folder, "
                                      "refresh the summary")
    st.add_argument("file", help="study TOML, e.g. studies/fashion-mnist-scarce.toml")
    st.add_argument("--lanes", type=int, default=1, help="runs at once on this machine (default %(default)s)")
    st.add_argument("--threads", type=int, default=0, help="torch threads per lane (default: torch's own)")
    st.add_argument("--device", help="torch device for every run, e.g. cuda")
    st.add_argument("--deadline", type=float, metavar="SECONDS",
                    help="stop every lane after this many seconds (runs resume from their last checkpoint)")
    st.add_argument("--commit", action="store_true", help="git commit each finished run's small files at once")
    st.add_argument("--report-only", action="store_true", help="run nothing: rebuild the summary from the results")
    st.add_argument("--list", action="store_true", help="print the queue in priority order with each run's state")
    st.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster (e.g. 127.0.0.1:6379), one task a run")
    st.add_argument("--results", metavar="DIR", help="results folder instead of the study file's")
    st.add_argument("--work", metavar="DIR", help="work folder (checkpoints, secrets) instead of the study file's")
    st.add_argument("--root", metavar="DIR", help="the folder the study's paths are relative to (default: .)")
    st.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run only the runs whose key matches (shell pattern, repeatable), e.g. 'n0100/*/cut_1000'; "
                         "the summary still covers every committed run")
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    st.add_argument("--lane", action="store_true", help=argparse.SUPPRESS)  # one lane process of --lanes N

    ex = sub.add_parser("export", help="write a trained run as a diffusers folder (UNet2DModel subfolders, "
                                       "scheduler, model_index.json, model card) for CollaFusePipeline")
    ex.add_argument("run_dir", help="a directory written by 'collafuse run'")
    ex.add_argument("--out", required=True, help="the export folder (must not exist)")
    ex.add_argument("--party", default="all",
                    help="what to export: 'all' (default), 'server' (its model only) or a client index (its own)")
    ex.add_argument("--checkpoint", metavar="ROUND", help="a kept checkpoint (round_000025) instead of the latest")

    fs = sub.add_parser("flower-sim", help="run a config over Flower's simulation engine (own SuperLink, stopped "
                                           "after)")
    fs.add_argument("config", help="TOML config, e.g. configs/flower.toml")
    fs.add_argument("--out", required=True, help="server run directory (checkpoints, message log, metrics.json); "
                                                 "client states go to OUT/nodes/")
    fs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. --set train.rounds=5")
    fs.add_argument("--samples", type=int, help="images per client after training (default sample.n_per_client)")

    fd = sub.add_parser("flower-deploy", help="loopback deployment: TLS + authenticated SuperLink and one "
                                              "SuperNode per client on 127.0.0.1; train, sample, tear down")
    fd.add_argument("config", help="TOML config, e.g. configs/flower.toml")
    fd.add_argument("--out", required=True, help="work directory (PKI, per-site data and state, server run)")
    fd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. --set train.rounds=2")
    fd.add_argument("--samples", type=int, help="images per client after training (default sample.n_per_client)")

    pk = sub.add_parser("flower-pki", help="make a CA, a SuperLink certificate and SuperNode key pairs for a TLS + "
                                           "authenticated Flower deployment")
    pk.add_argument("--out", required=True, help="directory for ca.crt/ca.key, server.pem/server.key, keys/")
    pk.add_argument("--host", action="append", default=[], metavar="ADDRESS",
                    help="the SuperLink's IP address or DNS name as clients will dial it (repeatable; "
                         "default 127.0.0.1 and localhost)")
    pk.add_argument("--nodes", default="", help="comma-separated SuperNode names to make key pairs for, e.g. "
                                                "site0,site1 (a site can instead make its own with --nodes NAME)")

    sc = sub.add_parser("secrets", help="write fresh client secrets (OS entropy) to a client-side file, for "
                        "reproducible runs with --client-secrets; never give the file to the server")
    sc.add_argument("--clients", type=int, required=True, help="number of clients")
    sc.add_argument("--out", required=True, help="file to write (mode 0600; an existing file is not overwritten)")

    ex = sub.add_parser("export-client-data", help="write each client's partition as its own IDX folder (what a "
                                                   "deployed client node reads)")
    ex.add_argument("config", help="TOML config")
    ex.add_argument("--out", required=True, help="directory; gets client0/, client1/, ...")
    ex.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _with_device(overrides: list[str], device: str | None) -> list[str]:
    return overrides + ([f"run.device={json.dumps(device)}"] if device else [])


def _secrets(args) -> dict | None:
    from .split.seeding import read_secrets_file

    return read_secrets_file(Path(args.client_secrets)) if args.client_secrets else None


def cmd_secrets(args) -> int:
    from .split.seeding import write_secrets_file

    if args.clients < 1:
        raise ConfigError(f"--clients = {args.clients} is invalid (allowed: an integer >= 1)")
    write_secrets_file(Path(args.out), args.clients)
    print(f"wrote {args.clients} client secrets to {args.out} (client-side only: never give it to the server)")
    return 0


def cmd_run(args) -> int:
    from .evaluation.experiment import run_experiment

    overrides = _with_device(args.overrides, args.device) + (["train.tensorboard=true"] if args.tensorboard else [])
    cfg: Config = load_config(args.config, overrides)
    out = Path(args.out)
    try:
        report = run_experiment(cfg, out, args.resume, not args.quiet, "collafuse " + shlex.join(args.argv),
                                _secrets(args))
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: collafuse run {args.config} --out {out} --resume", file=sys.stderr)
        return 130
    print(f"outputs: {out}/ (samples_client*.png, cut_client*.png, real_client*.png, metrics.json, "
          f"message_log.jsonl, config.toml)\nreport: {report}")
    return 0


def parse_labels(text: str) -> list[tuple[int, int]]:
    """``--labels 0:8,3:4`` -> [(0, 8), (3, 4)]: class ids with counts >= 1, each class once."""
    pairs = []
    for item in text.split(","):
        cls, _, count = item.strip().partition(":")
        try:
            pair = (int(cls), int(count))
        except ValueError:
            raise ConfigError(f"--labels item {item.strip()!r} is invalid (allowed: CLASS:COUNT with integers, e.g. "
                              f"0:8,3:4)") from None
        if pair[1] < 1:
            raise ConfigError(f"--labels count {pair[1]} for class {pair[0]} is invalid (allowed: an integer >= 1)")
        if pair[0] in dict(pairs):
            raise ConfigError(f"--labels names class {pair[0]} twice (allowed: each class once, with its count)")
        pairs.append(pair)
    return pairs


def cmd_sample(args) -> int:
    import torch
    from safetensors.torch import save_file

    from .data.images import save_grid, to_uint8
    from .evaluation.report import write_client_images
    from .export.writer import client_classes
    from .split.runner import load_run
    from .split.transport import MessageLog

    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n = {args.n} is invalid (allowed: an integer >= 1)")
    if args.n is not None and args.labels:
        raise ConfigError("--n and --labels are both given (allowed: one of them; --labels carries the counts)")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps = {args.steps} is invalid (allowed: an integer >= 1)")
    pairs = parse_labels(args.labels) if args.labels else None
    overrides = list(args.overrides)
    overrides += [f"sample.sampler={args.sampler}"] if args.sampler else []
    overrides += [f"sample.ddim_steps={args.steps}"] if args.steps else []
    out = Path(args.out)
    kind = out.suffix.lower() if out.suffix.lower() in (".png", ".safetensors") else "dir"
    log_dir = out if kind == "dir" else out.parent
    fed = load_run(Path(args.run_dir), _with_device(overrides, args.device), MessageLog(log_dir / "message_log.jsonl"))
    if not 0 <= args.client < fed.cfg.data.num_clients:
        raise ConfigError(f"--client = {args.client} is invalid (allowed: 0..{fed.cfg.data.num_clients - 1})")
    labels = None
    if pairs is not None:
        allowed = client_classes(fed)[args.client]
        if bad := sorted({c for c, _ in pairs} - set(allowed)):
            raise ConfigError(f"--labels class {bad[0]} is invalid for client {args.client} (allowed: {allowed}, the "
                              f"classes it held or sample.shared_labels shares)")
        labels = torch.cat([torch.full((k,), c, dtype=torch.long) for c, k in pairs])
    n = len(labels) if labels is not None else (args.n or 64)
    log_dir.mkdir(parents=True, exist_ok=True)
    fed.set_progress(not args.quiet)
    if kind == "dir" and labels is None and args.seed is None:
        write_client_images(fed, args.client, n, out, real=False)
        print(f"wrote {out}/samples_client{args.client}.png, cut_client{args.client}.png, "
              f"samples_client{args.client}.safetensors")
        return 0
    result = fed.sample(args.client, n, labels=labels, seed=args.seed)
    ncol = max(1, round(n ** 0.5))
    written = []
    if kind in (".png", "dir"):
        path = out if kind == ".png" else out / f"samples_client{args.client}.png"
        written.append(save_grid(result["x0"], path, ncol))
    if kind in (".safetensors", "dir"):
        path = out if kind == ".safetensors" else out / f"samples_client{args.client}.safetensors"
        save_file({"images": torch.from_numpy(to_uint8(result["x0"])).contiguous(),
                   "labels": result["y"].contiguous()}, str(path),
                  metadata={"run_dir": str(args.run_dir), "client": str(args.client),
                            "sampler": fed.cfg.sample.sampler, "steps": str(fed.cfg.sample.ddim_steps),
                            "seed": "" if args.seed is None else str(args.seed)})
        written.append(path)
    print("wrote " + ", ".join(map(str, written)))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluation.evaluate import evaluate_run

    run_dir = Path(args.run_dir)
    result = evaluate_run(run_dir, _with_device(args.overrides, args.device), progress=not args.quiet,
                          output=args.output, checkpoint=args.checkpoint)
    print(f"wrote {run_dir}/{args.output} ({result['checkpoint']}, cut {result['cut']}, {result['n_samples_per_client']} samples per "
          f"client, extractor {result['extractor']['name']})")
    return 0


def cmd_sweep(args) -> int:
    from .study.sweep import parse_baseline, parse_cuts, parse_seeds, run_sweep

    overrides = _with_device(args.overrides, args.device)
    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    if args.vary_partition and seeds is None:
        raise ConfigError("--vary-partition is invalid without --seeds (allowed: with --seeds 0,1,...)")
    baselines = dict(parse_baseline(b) for b in args.baseline)
    try:
        report = run_sweep(args.config, parse_cuts(args.cuts), Path(args.out), overrides, progress=not args.quiet,
                           command="collafuse " + shlex.join(args.argv),
                           secrets=_secrets(args), seeds=seeds, vary_partition=args.vary_partition,
                           report_only=args.report_only, baselines=baselines or None)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the same command resumes: collafuse {shlex.join(args.argv)}", file=sys.stderr)
        return 130
    print(f"report: {report}")
    return 0


def cmd_study(args) -> int:
    import time

    from .study import runner
    from .study.spec import load_study

    study = load_study(args.file, args.root)
    for name in ("results", "work"):
        if getattr(args, name):
            setattr(study.spec.study, name, str(Path(getattr(args, name)).resolve()))
    if args.only:
        import fnmatch

        keep = [j for j in study.jobs if any(fnmatch.fnmatchcase(j.key, p) for p in args.only)]
        if not keep:
            raise ConfigError(f"--only {' '.join(args.only)} is invalid (it matches no run of {args.file}; allowed: "
                              f"patterns over keys like {study.jobs[0].key})")
        study.queue = keep
    if args.lanes < 1 or args.threads < 0:
        raise ConfigError(f"--lanes = {args.lanes}, --threads = {args.threads} is invalid (allowed: lanes >= 1, "
                          "threads >= 0)")
    if args.deadline is not None and args.deadline <= 0:
        raise ConfigError(f"--deadline = {args.deadline} is invalid (allowed: seconds > 0)")
    if args.list:
        for job in study.queue:
            state = "done" if runner.done(study, job) else "pending"
            print(f"{state:8s} {job.key}  ({', '.join(ev.output for ev in job.evaluations)})")
        return 0
    if args.report_only:
        report = runner.refresh_report(study)
        print(f"report: {report}" if report else f"{args.file}: study.report = 'none' (nothing to rebuild)")
        return 0
    deadline = None if args.deadline is None else time.time() + args.deadline
    try:
        if args.ray:
            n = runner.run_on_ray(study, args.ray, args.threads or 1, args.device, args.commit)
        elif args.lanes > 1 and not args.lane:
            argv = ["study", args.file, "--threads", str(args.threads)]
            for flag, value in (("--device", args.device), ("--results", args.results), ("--work", args.work),
                                ("--root", args.root)):
                argv += [flag, str(Path(value).resolve()) if flag != "--device" else value] if value else []
            argv += ["--commit"] * args.commit + ["--quiet"] * args.quiet
            for pattern in args.only:
                argv += ["--only", pattern]
            if deadline is not None:
                argv += ["--deadline", f"{deadline - time.time():.0f}"]
            return runner.run_lanes(study, args.lanes, argv)
        else:
            n = runner.run_lane(study, args.threads, args.device, args.commit, not args.quiet, deadline)
    except KeyboardInterrupt:
        print(f"\nstopped; the same command resumes: collafuse {shlex.join(args.argv)}", file=sys.stderr)
        return 130
    left = len(runner.pending(study))
    print(f"study {study.name}: {n} run(s) finished now, {left} pending; results: {study.results}")
    return 0


def cmd_flower(args) -> int:
    from .flower.launch import deploy_loopback, simulate

    load_config(args.config, args.overrides)  # bad input fails here, before any process starts
    if args.samples is not None and args.samples < 0:
        raise ConfigError(f"--samples = {args.samples} is invalid (allowed: an integer >= 0)")
    run = simulate if args.command == "flower-sim" else deploy_loopback
    try:
        m = run(Path(args.config), Path(args.out), args.overrides, samples=args.samples)
    except KeyboardInterrupt:
        print("\ninterrupted; every Flower process started was stopped. The same command resumes from the last "
              "round.", file=sys.stderr)
        return 130
    rs = m["round_seconds_this_session"]
    print(f"{m['rounds_done']} rounds over Flower ({sum(rs) / max(1, len(rs)):.1f} s per round this session), "
          f"samples finished on the clients: {m['samples_finished']}")
    for e in m["events"]:
        print(f"  note: {e}")
    return 0


def cmd_pki(args) -> int:
    from .flower.pki import make_ca, make_node_key, make_server_cert

    out = Path(args.out)
    nodes = [n for n in args.nodes.split(",") if n]
    bad = [n for n in nodes if not n.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise ConfigError(f"--nodes = {args.nodes!r} is invalid (allowed: names of letters, digits, '-' and '_')")
    if not (out / "ca.crt").is_file():
        make_ca(out)
        make_server_cert(out, args.host or ["127.0.0.1", "localhost"])
        print(f"CA: {out}/ca.crt (give to every site), SuperLink: {out}/server.pem + server.key")
    for n in nodes:
        _, pub = make_node_key(out, n)
        print(f"{n}: private key {out}/keys/{n} (stays on the site), public key {pub} (register on the SuperLink)")
    return 0


def cmd_export(args) -> int:
    from .export.writer import export_run

    party = int(args.party) if args.party.isdigit() else args.party
    info = export_run(Path(args.run_dir), Path(args.out), party, args.checkpoint)
    print(f"wrote {info['out']}/ ({', '.join(info['components'])}; {info['bytes'] / 2**20:.1f} MiB in "
          f"{info['seconds']:.1f} s); load it with CollaFusePipeline.from_pretrained('{info['out']}')")
    return 0


def cmd_export_client_data(args) -> int:
    from .data.partition import export_client_folders

    cfg = load_config(args.config, args.overrides)
    for d in export_client_folders(cfg.data, cfg.num_classes, cfg.seeds.data, Path(args.out)):
        print(d)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for a model hub
    args = _parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # quoted in reports
    try:
        commands = {"study": cmd_study, "sweep": cmd_sweep, "run": cmd_run, "sample": cmd_sample,
                    "evaluate": cmd_evaluate, "flower-sim": cmd_flower, "flower-deploy": cmd_flower,
                    "export-client-data": cmd_export_client_data, "export": cmd_export, "flower-pki": cmd_pki,
                    "secrets": cmd_secrets}
        return commands[args.command](args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
