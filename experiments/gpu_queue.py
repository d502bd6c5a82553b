#!/usr/bin/env python3
"""Issues 11 and 12 on a lent GPU machine (one H200, 16 cores), in one call of the device tool.

What the CPU lanes (experiments/issue11_queue.sh) cannot do, then what they reach last, in this order, each job
skipped when its results are already committed under results/fashion-mnist-seeds/:

1. DDPM-1000 (part 3 of the issue): a GPU replicate of seed 1 at cuts 0, 200 and 1000 (gpu-replicate/seed_1/),
   trained and evaluated with the default sampler (`evaluation.json`) and with the full ancestral chain
   (`evaluation-ddpm.json`, sampled at batch 1000: at the default 128 two such evaluations did not end in 135 s).
   Checkpoints are not committed, so the CPU runs of these cuts cannot be re-sampled elsewhere; the replicate also
   measures how far a GPU run lands from the CPU run of the same seed;
2. the seed-sweep runs still missing (same recipe as experiments/seed_sweep.sh: configs/quality.toml at 100
   rounds, 1,000 samples per client against 1,000 held-out images), cuts 900 and 990 before 100 and 50;
3. C = 1 at cut 700 (part 5; `split.upload_clip_norm = 1`, seed 0, its own client secrets), then issue 12's FedAvg
   baseline for seeds 0, 1 and 2 (fedavg/seed_K/cut_1000/; on 2 CPU cores alone a round takes about 27 s, three
   clients x 8.6-9.2 s of local steps, so about 45 minutes a run plus 2.5 minutes of sampling; made on the CPU on
   2026-12-05 with experiments/fedavg_lane.sh, so this job is skipped once they are committed);
4. the rest of the DDPM-1000 grid: every cut x seed re-trained on the GPU and scored with both samplers, into
   gpu-replicate/seed_K/cut_NNNN/ like item 1, the baselines and cut 200 of seeds 0 and 2 first (what H1 compares),
   then the other cuts. About 2.5 minutes of the card per run: a 15-minute lease does 4-5 of the 27.

WORKERS jobs run at once, each a plain `python3 -m collafuse sweep ...` on `--device cuda`. A job that ends copies its
small files (evaluation*.json, metrics.json, config.toml, sample strips, its log) into the staging tree, laid out
like results/fashion-mnist-seeds/, and the tree is re-packed into $OUT/results.tgz at once (atomic rename), so a
call stopped at its limit still brings back every finished job; a failed job's log goes into the same tarball
(the device tool returns 8 files at most). No job starts after DEADLINE minus the longest job so far; at DEADLINE
the rest are killed. A smoke job (two rounds, 64 samples, every evaluation path) runs first beside the others: if
it fails, everything stops at once and its log is printed, so a CUDA bug costs seconds.

Measured on 2026-12-04 (one H200, torch 2.11 + CUDA 13): the GPU is the bottleneck, not the cores. 8 jobs at once
reached round 87 of 100 in 500 s (about 1.6 rounds/s over all jobs: one 100-round run per ~65 s of the GPU), were
killed by the deadline and, resumed from their checkpoints on the still-warm machine, ended 136 s later; an
evaluation then takes ~40 s. Fewer workers end runs sooner at the same throughput, hence WORKERS = 4: plan about
7 runs for a 15-minute lease. A second lease (WORKERS=6 DEADLINE=545 SKIP=clip1c700: the three DDPM replicates and
seeds 1 and 2 at cut 990 at once) ended four in 315-500 s; the fifth's DDPM-1000 evaluation, killed at the deadline,
took 58 s alone on the card. A DDPM-1000 evaluation at batch 1,000 costs 30-90 s of the GPU (3,000 images).

    device run (carry .whl .devdata; see results/fashion-mnist-seeds/README.md for how they are made):
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
      PYTHONPATH=/tmp/site:src XDG_CACHE_HOME=$PWD/.devdata/cache python3 experiments/gpu_queue.py

    here, as a dry run on the CPU: DEVICE=cpu TINY=1 WORKERS=2 OUT=/tmp/gq .venv/bin/python experiments/gpu_queue.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", "/tmp/gpu-out"))
WORK = Path(os.environ.get("WORK", "/tmp/gpu-work"))
STAGE = WORK / "stage"
DEVICE = os.environ.get("DEVICE", "cuda")
WORKERS = int(os.environ.get("WORKERS", "4"))
THREADS = os.environ.get("THREADS", "4")  # torch threads per job (16 cores)
RESULTS = ROOT / os.environ.get("RESULTS", "results/fashion-mnist-seeds")
DEADLINE = float(os.environ.get("DEADLINE", "470"))  # seconds after start
SKIP = set(filter(None, os.environ.get("SKIP", "").split(",")))  # job names left to another machine (e.g. clip1c700)
TINY = os.environ.get("TINY") == "1"  # a dry run: 2 rounds, 64 samples (checks the plumbing, not the numbers)
SMALL_FILES = ("evaluation.json", "evaluation-ddpm.json", "metrics.json", "config.toml")
STRIPS = ("samples_client", "cut_client", "figure4_client")

RECIPE = ["--set", "train.rounds=100", "--set", "eval.n_samples=1000", "--set", "eval.n_real=1000"]
TINY_RECIPE = ["--set", "train.rounds=2", "--set", "train.client_steps=2", "--set", "train.server_steps=2",
               "--set", "eval.n_samples=64", "--set", "eval.n_real=200", "--set", "eval.disclosure_n=64",
               "--set", "eval.distractors=500"]
# The DDPM-1000 evaluation is read for its fidelity section only: its disclosure section (the same uploads, attacked
# again) runs on fewer images and distractors, so it costs seconds, not minutes.
DDPM_DISCLOSURE = ["--set", "eval.disclosure_n=64", "--set", "eval.distractors=500"]


def job(name: str, dest: str, seed: int, cut: int, clip: float | None = None, ddpm: bool = False,
        smoke: bool = False, algorithm: str = "collafuse") -> dict:
    return {"name": name, "dest": dest, "seed": seed, "cut": cut, "clip": clip, "ddpm": ddpm, "smoke": smoke,
            "algorithm": algorithm}


def jobs() -> list[dict]:
    """The queue in priority order, without what is already committed in $RESULTS."""
    out = [job(f"rep{cut}", f"gpu-replicate/seed_1/cut_{cut:04d}", 1, cut, ddpm=True) for cut in (0, 200, 1000)]
    for cut in (900, 990, 100, 50):
        out += [job(f"s{s}c{cut}", f"seed_{s}/cut_{cut:04d}", s, cut) for s in (1, 2)]
    out.append(job("clip1c700", "clip_1/seed_0/cut_0700", 0, 700, clip=1.0))
    # Issue 12: the FedAvg baseline at the sweep's budget and seeds (its cut resolves to T, hence cut_1000).
    out += [job(f"fedavg-s{s}", f"fedavg/seed_{s}/cut_1000", s, 1000, algorithm="fedavg") for s in (0, 1, 2)]
    for cut in (1000, 0, 200, 500, 900, 300, 100, 700, 50, 990):
        out += [job(f"ddpm-s{s}c{cut}", f"gpu-replicate/seed_{s}/cut_{cut:04d}", s, cut, ddpm=True) for s in (0, 2, 1)]
    def committed(j: dict) -> bool:
        if not j["ddpm"]:
            return (RESULTS / j["dest"] / "evaluation.json").is_file()
        # a DDPM-1000 job whose run was re-trained to be sampled (the first training's files stay beside it)
        return any((RESULTS / j["dest"] / sub / "evaluation-ddpm.json").is_file() for sub in (".", "ddpm-run"))
    todo = [j for j in out if j["name"] not in SKIP and not committed(j)]
    return [job("smoke", "smoke", 9, 500, clip=1.0, ddpm=True, smoke=True), *todo]


def commands(j: dict) -> list[list[str]]:
    py = [sys.executable, "-m", "collafuse"]
    recipe = TINY_RECIPE if (TINY or j["smoke"]) else RECIPE
    sweep_dir = WORK / "runs" / j["name"]
    sets = [*recipe, "--set", f"run.threads={THREADS}"]
    if j["clip"] is not None:
        sets += ["--set", f"split.upload_clip_norm={j['clip']}"]
    if j["algorithm"] != "collafuse":
        sets += ["--set", f"split.algorithm={j['algorithm']}"]
    cmds = [[*py, "sweep", "configs/quality.toml", "--quiet", "--seeds", str(j["seed"]), "--cuts", str(j["cut"]),
             "--out", str(sweep_dir), "--device", DEVICE, *sets]]
    if j["ddpm"]:
        n = "64" if (TINY or j["smoke"]) else "1000"
        cmds.append([*py, "evaluate", str(run_dir(j)), "--quiet", "--device", DEVICE, "--output",
                     "evaluation-ddpm.json", "--set", "eval.n_real=1000", "--set", "sample.sampler=ddpm",
                     "--set", f"eval.n_samples={n}", "--set", f"sample.batch_size={n}", *DDPM_DISCLOSURE])
    return cmds


def run_dir(j: dict) -> Path:
    return WORK / "runs" / j["name"] / f"seed_{j['seed']}" / f"cut_{j['cut']:04d}"


lock = threading.Lock()  # the queue and the tarball
state = {"failed": False, "longest": 0.0, "procs": {}}
t_start = time.time()


def log(msg: str) -> None:
    line = f"[gpu_queue {time.time() - t_start:6.1f}s] {msg}"
    print(line, flush=True)
    with open(OUT / "queue.log", "a") as f:
        f.write(line + "\n")


def pack() -> None:
    """Re-pack the staging tree into $OUT/results.tgz (written aside, then renamed: never half a file)."""
    with lock:
        tmp = OUT / ".results.tgz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(STAGE, arcname=".")
        os.replace(tmp, OUT / "results.tgz")


def stage(j: dict, seconds: float, logfile: Path) -> None:
    src, dest = run_dir(j), STAGE / j["dest"]
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in SMALL_FILES or (p.name.startswith(STRIPS) and p.suffix == ".png"):
            shutil.copy2(p, dest / p.name)
    shutil.copy2(logfile, dest / "gpu-job.log")
    (dest / "gpu-job.seconds").write_text(f"{seconds:.1f}\n")
    pack()


def worker(queue: list[dict]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    while True:
        with lock:
            if not queue or state["failed"]:
                return
            elapsed = time.time() - t_start
            if not queue[0]["smoke"] and elapsed + max(state["longest"], 240.0) > DEADLINE:
                log(f"not starting {[q['name'] for q in queue]}: {elapsed:.0f} s gone, longest job "
                    f"{state['longest']:.0f} s, deadline {DEADLINE:.0f} s")
                queue.clear()
                return
            j = queue.pop(0)
        logfile = WORK / "logs" / f"{j['name']}.log"
        t0 = time.time()
        log(f"start {j['name']}")
        ok = True
        with open(logfile, "w") as f:
            for cmd in commands(j):
                f.write("$ " + " ".join(cmd) + "\n")
                f.flush()
                p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                     start_new_session=True)
                state["procs"][j["name"]] = p
                if p.wait() != 0:
                    ok = False
                    break
        state["procs"].pop(j["name"], None)
        took = time.time() - t0
        if not ok:
            log(f"FAILED {j['name']} after {took:.0f} s; log tail:\n" + logfile.read_text()[-6000:])
            (STAGE / "failed").mkdir(exist_ok=True)
            shutil.copy2(logfile, STAGE / "failed" / f"{j['name']}.log")
            pack()
            if j["smoke"]:
                state["failed"] = True
                kill_all()
            continue
        if not j["smoke"]:
            state["longest"] = max(state["longest"], took)
        stage(j, took, logfile)
        log(f"done {j['name']} in {took:.0f} s -> {j['dest']}")


def kill_all() -> None:
    for p in list(state["procs"].values()):
        try:
            os.killpg(p.pid, 9)
        except ProcessLookupError:
            pass


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for d in (STAGE, WORK / "logs", WORK / "runs"):
        d.mkdir(parents=True, exist_ok=True)
    queue = jobs()
    log(f"{len(queue)} jobs, {WORKERS} workers, device {DEVICE}, deadline {DEADLINE:.0f} s, tiny {TINY}")
    threads = [threading.Thread(target=worker, args=(queue,), daemon=True) for _ in range(WORKERS)]
    for t in threads:
        t.start()
        time.sleep(0.5)  # staggered: the first imports and CUDA contexts do not all land at once
    while any(t.is_alive() for t in threads):
        if time.time() - t_start > DEADLINE:
            log(f"deadline: killing {sorted(state['procs'])}")
            kill_all()
            break
        time.sleep(2)
    for t in threads:
        t.join(timeout=10)
    pack()
    log("packed " + str(OUT / "results.tgz"))
    return 1 if state["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
