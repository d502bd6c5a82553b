"""``collafuse study STUDY.toml``: run a study's grid as a resumable queue (`collafuse.study.spec`).

Every run goes through the same four steps, each skipped when its output exists:

1. train into ``work/KEY`` (resumes from the last checkpoint; a finished one is not trained again);
2. each of its evaluations (``evaluation.json``, milestone checkpoints, other samplers), into ``work/KEY``;
3. copy the run's small files (configs, metrics, evaluations, reports, pictures, exported samples) to
   ``results/KEY`` at once, each file atomically; optionally commit them (``--commit``);
4. refresh the study's summary.

A run whose every evaluation is already in ``results/KEY`` is done and skipped, so a fresh clone with the committed
results resumes a study where it stopped. A ``results/KEY/config.toml`` made with another configuration stops the
study with one line: the results folder holds runs of another study.

Where runs go: ``lanes`` processes on one machine, each with ``threads`` torch threads, take the next unclaimed run
in priority order (a claim is a lock file under ``work/claims/``; a claim whose process is gone is taken over); a
``deadline`` stops every lane then (each run resumes from its last checkpoint next time). On a Ray cluster
(``ray_address``) every run is one Ray task of ``threads`` CPUs, and the driver writes the small files it returns.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..split.seeding import read_secrets_file, write_secrets_file
from .spec import Job, Study, seeded
from .sweep import _trained  # a run is trained when its metrics.json has all its rounds

# What a run's folder holds that is worth committing: everything at its top level with these endings (the
# checkpoints, the sample cache and the message log stay in work/). Files above MAX_SMALL_BYTES are left out.
SMALL_SUFFIXES = (".json", ".png", ".md", ".toml", ".safetensors")
MAX_SMALL_BYTES = 2 << 20
# Sections whose values make two runs the same run; [run], [eval] and [sample] may differ (device, threads, how it
# is scored), and these train keys too (precision resumes in either; checkpoints are bookkeeping).
_TRAIN_FREE = ("precision", "checkpoint_every", "keep_rounds")


def run_identity(cfg: Config) -> dict:
    """What must agree between a committed run and the study's run of the same key."""
    train = {k: v for k, v in cfg.train.model_dump().items() if k not in _TRAIN_FREE}
    return {"identity": cfg.identity_hash(), "train": train}


def _differences(a: dict, b: dict) -> list[str]:
    out = [] if a["identity"] == b["identity"] else ["data, diffusion, split, model or seed settings"]
    out += [f"train.{k} {a['train'].get(k)!r} vs {b['train'].get(k)!r}" for k in sorted(set(a["train"]) |
            set(b["train"])) if a["train"].get(k) != b["train"].get(k)]
    return out


def job_config(study: Study, job: Job, threads: int = 0, device: str | None = None) -> Config:
    base = load_config(study.config, study.spec.study.set)
    extra = [f"run.threads={threads}"] if threads else []
    extra += [f"run.device={json.dumps(device)}"] if device else []
    return load_config(study.config, [*seeded(study, job, base), *extra])


def check_results(study: Study, job: Job, cfg: Config) -> None:
    """Refuse a results folder whose run of this key was made with another configuration (one line)."""
    committed = study.results / job.key / "config.toml"
    if not committed.is_file():
        return
    try:
        theirs = load_config(committed)
    except ConfigError as e:
        raise ConfigError(f"results folder {study.results} holds {job.key} with a config this version cannot read "
                          f"({e}); allowed: the results of this study, or another --results folder") from None
    diff = _differences(run_identity(theirs), run_identity(cfg))
    if diff:
        raise ConfigError(f"results folder {study.results} holds {job.key} made with another config ({diff[0]}); "
                          f"allowed: the results of this study file, or another results folder")


def done(study: Study, job: Job) -> bool:
    """Every evaluation of the run is in the results folder."""
    return all((study.results / job.key / ev.output).is_file() for ev in job.evaluations)


def _evaluated(run_dir: Path, output: str, checkpoint: str) -> bool:
    path = run_dir / output
    return path.is_file() and json.loads(path.read_text()).get("checkpoint") == checkpoint


def seed_secrets(study: Study, seed: int, num_clients: int):
    """The clients' secrets of one seed, shared by every run of that seed (paired comparisons), drawn from OS
    entropy the first time. The study plays every client, so it holds them: never give this file to a server."""
    path = study.work / "secrets" / f"seed_{seed}.toml"
    with _locked(study.work / "secrets.lock"):
        return read_secrets_file(path) if path.exists() else write_secrets_file(path, num_clients)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_and_evaluate(study: Study, job: Job, threads: int = 0, device: str | None = None,
                       progress: bool = True) -> Path:
    """Steps 1 and 2 for one run, into ``work/KEY``; returns that folder."""
    from ..evaluation.evaluate import evaluate_run
    from ..evaluation.experiment import run_experiment

    cfg = job_config(study, job, threads, device)
    run_dir = study.work / job.key
    if not _trained(run_dir, cfg.train.rounds):
        secrets = seed_secrets(study, job.seed, cfg.data.num_clients)
        run_experiment(cfg, run_dir, resume=True, progress=progress,
                       command=f"collafuse study {study.file} (run {job.key})", secrets=secrets)
    device_set = [f"run.device={json.dumps(device)}"] if device else []
    threads_set = [f"run.threads={threads}"] if threads else []
    for ev in job.evaluations:
        checkpoint = f"round_{ev.checkpoint or cfg.train.rounds:06d}"
        if not _evaluated(run_dir, ev.output, checkpoint) and not (study.results / job.key / ev.output).is_file():
            evaluate_run(run_dir, [*ev.set, *device_set, *threads_set], progress=progress, output=ev.output,
                         checkpoint=None if ev.checkpoint is None else str(ev.checkpoint))
        if ev.export_samples:
            export_samples(run_dir, ev, cfg)
    return run_dir


def export_samples(run_dir: Path, ev, cfg: Config) -> list[Path]:
    """The evaluation's generated samples (from its cache: nothing is sampled again) as uint8 safetensors, one file
    per client (``samples_uint8_client{i}.safetensors``: ``images`` [N, C, H, W] uint8 and ``labels``), so that anyone
    can recompute the memorisation measures from the committed results."""
    import torch
    from safetensors.torch import save_file

    from ..data.images import to_uint8
    from ..evaluation.evaluate import generated_samples
    from ..split.runner import load_run

    fed = load_run(run_dir, ev.set, checkpoint=None if ev.checkpoint is None else str(ev.checkpoint))
    fed.set_progress(False)
    paths = []
    for c in fed.clients:
        path = run_dir / f"samples_uint8_client{c.index}.safetensors"
        if path.is_file():
            paths.append(path)
            continue
        s = generated_samples(fed, run_dir, c.index, fed.cfg.eval.n_samples)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"images": torch.from_numpy(to_uint8(s["x0"])).contiguous(), "labels": s["y"].contiguous()}, str(tmp),
                  metadata={"checkpoint": fed.restored_from.name, "n": str(len(s["x0"]))})
        tmp.replace(path)
        paths.append(path)
    return paths


def small_files(run_dir: Path) -> dict[str, bytes]:
    """The run's files worth committing: the top level's configs, metrics, evaluations, reports and pictures, and of
    its tensors only the exported uint8 samples (`export_samples`; the run's own float sample grids stay in work/)."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())
            if p.is_file() and p.suffix in SMALL_SUFFIXES and not p.name.endswith(".tmp")
            and (p.suffix != ".safetensors" or p.name.startswith("samples_uint8_"))
            and p.stat().st_size <= MAX_SMALL_BYTES}


def write_results(study: Study, job: Job, files: dict[str, bytes]) -> Path:
    """Step 3: the run's small files into ``results/KEY``, each atomically (a reader sees old or new, never half)."""
    out = study.results / job.key
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
    return out


def commit(study: Study, paths: list[Path], message: str) -> bool:
    """``git commit`` of exactly these paths in the repository that holds them (other staged work is left alone);
    False when there is nothing to commit or no repository."""
    repo = study.results
    while not repo.exists():
        repo = repo.parent
    with _locked(study.work / "git.lock"):
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode:
            return False
        root = Path(top.stdout.strip())
        rel = [str(p.resolve().relative_to(root.resolve())) for p in paths]
        subprocess.run(["git", "-C", str(root), "add", "--", *rel], check=True)
        staged = subprocess.run(["git", "-C", str(root), "diff", "--cached", "--quiet", "--", *rel])
        if staged.returncode == 0:
            return False
        for _ in range(20):  # the developer may be committing in the same repository: wait for their index lock
            r = subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", message, "--", *rel],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return True
            if "index.lock" not in r.stderr:
                raise RuntimeError(f"git commit of {rel} failed: {r.stderr.strip()}")
            time.sleep(3)
        return False


def _relative(path: Path) -> Path:
    """``path`` relative to the current directory when it lies below it, else as it is."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def refresh_report(study: Study) -> Path | None:
    """Step 4: the study's summary from what is in the results folder (`report` in the study file)."""
    kind = study.spec.study.report
    if kind == "none":
        return None
    if kind == "seeds":
        from .sweep import run_sweep

        s = study.spec.study
        results = _relative(study.results)  # the report names its runs as the committed tree does
        baselines = {label: results / d for label, d in s.report_baselines.items()} or None
        return run_sweep(study.config, sorted(s.report_cuts), results, [*s.set, *s.report_set], progress=False,
                         command=s.report_command, seeds=s.seeds, report_only=True, baselines=baselines)
    if kind == "heterogeneous":
        from .heterogeneous_report import write_heterogeneous_report

        return write_heterogeneous_report(study)
    from .scarce_report import write_scarce_report

    return write_scarce_report(study)


# -- the queue ---------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(study: Study, job: Job) -> Path | None:
    """A lock file for this run (its path), or None when a live process holds it."""
    path = study.work / "claims" / (job.key.replace("/", "__") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = -1
            if pid > 0 and _alive(pid):
                return None
            path.unlink(missing_ok=True)  # its process is gone: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {time.time():.0f}\n")
        return path
    return None


def run_one(study: Study, job: Job, threads: int = 0, device: str | None = None, commit_results: bool = False,
            progress: bool = True, log=print) -> bool:
    """Steps 1-4 for one run; False when it was done already or another process holds it."""
    if done(study, job):
        return False
    check_results(study, job, job_config(study, job, threads, device))
    lock = claim(study, job)
    if lock is None:
        return False
    try:
        t0 = time.perf_counter()
        log(f"[study {study.name}] {job.key}: start")
        run_dir = train_and_evaluate(study, job, threads, device, progress)
        out = write_results(study, job, small_files(run_dir))
        paths = [out]
        with _locked(study.work / "report.lock"):
            report = refresh_report(study)
        if report is not None:
            paths.append(study.results)
        if commit_results:
            commit(study, paths, f"study {study.name}: {job.key} ({time.perf_counter() - t0:.0f} s)")
        log(f"[study {study.name}] {job.key}: done in {time.perf_counter() - t0:.0f} s -> {out}")
        return True
    finally:
        lock.unlink(missing_ok=True)


def _interruptible() -> None:
    """Make SIGINT raise KeyboardInterrupt here even when this process was started in the background, where the
    shell set SIGINT to be ignored (and Python then keeps ignoring it): the deadline and the parent of the lanes
    stop a lane with SIGINT, so that the run in progress ends at its last checkpoint."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _deadline_timer(deadline: float | None) -> threading.Timer | None:
    """At ``deadline`` (epoch seconds) interrupt this process as Ctrl-C would: the run in progress keeps its last
    checkpoint."""
    _interruptible()
    if deadline is None:
        return None
    timer = threading.Timer(max(0.0, deadline - time.time()), lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    return timer


def run_lane(study: Study, threads: int = 0, device: str | None = None, commit_results: bool = False,
             progress: bool = True, deadline: float | None = None, log=print) -> int:
    """One lane: take the pending runs in priority order until none is left (or the deadline); returns how many it
    finished. Several lanes (processes) share a queue through their claims."""
    timer = _deadline_timer(deadline)
    finished = 0
    try:
        for job in study.queue:
            if deadline is not None and time.time() >= deadline:
                break
            finished += run_one(study, job, threads, device, commit_results, progress, log)
    finally:
        if timer is not None:
            timer.cancel()
    return finished


def pending(study: Study) -> list[Job]:
    return [j for j in study.queue if not done(study, j)]


def run_lanes(study: Study, lanes: int, argv: list[str], log=print) -> int:
    """``lanes`` lane processes (``collafuse study ... --lane``) over one queue; returns the worst exit code."""
    _interruptible()
    procs = []
    for i in range(lanes):
        cmd = [sys.executable, "-m", "collafuse", *argv, "--lane"]
        log(f"[study {study.name}] lane {i}: {shlex.join(cmd)}")
        procs.append(subprocess.Popen(cmd, start_new_session=True))
        time.sleep(2)  # lanes claim in turn, not in the same instant
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGINT)  # each lane stops as Ctrl-C stops a run: at its last checkpoint
        codes = [p.wait() for p in procs]
        raise
    return max(codes)


def run_on_ray(study: Study, address: str, threads: int = 1, device: str | None = None,
               commit_results: bool = False, log=print) -> int:
    """Every pending run as one Ray task of ``threads`` CPUs on the cluster at ``address``; the task trains and
    evaluates in ``work/KEY`` on its node (each node needs this repository, its data and its work folder at the same
    path) and returns the run's small files, which the driver writes to the results folder and commits. Returns how
    many runs finished."""
    import ray

    todo = pending(study)
    for job in todo:
        check_results(study, job, job_config(study, job, threads, device))
    if not todo:
        return 0
    ray.init(address=address, log_to_driver=False, include_dashboard=False, configure_logging=False)
    try:
        task = ray.remote(num_cpus=max(1, threads))(_ray_job)
        futures = {task.remote(str(study.file.resolve()), str(study.root.resolve()), str(study.results.resolve()),
                               str(study.work.resolve()), job.key, threads, device): job for job in todo}
        finished = 0
        while futures:
            ready, _ = ray.wait(list(futures), num_returns=1)
            job = futures.pop(ready[0])
            files = ray.get(ready[0])
            out = write_results(study, job, files)
            report = refresh_report(study)
            if commit_results:
                commit(study, [out] + ([study.results] if report else []), f"study {study.name}: {job.key} (ray)")
            log(f"[study {study.name}] {job.key}: done on ray -> {out}")
            finished += 1
        return finished
    finally:
        ray.shutdown()


def _ray_job(file: str, root: str, results: str, work: str, key: str, threads: int, device: str | None
             ) -> dict[str, bytes]:
    """A Ray task: train and evaluate one run where the task runs; its small files go back to the driver."""
    from .spec import load_study

    study = load_study(file, root)
    study.spec.study.results, study.spec.study.work = results, work
    job = next(j for j in study.jobs if j.key == key)
    return small_files(train_and_evaluate(study, job, threads, device, progress=False))
