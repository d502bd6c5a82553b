#!/usr/bin/env bash
# Issue 11's sweep on a 2-core CPU machine, in one resumable queue:
#   1. the seed-sweep runs of seeds 1 and 2 not yet committed, in two lanes (one seed each, one thread each: 1.24x
#      the throughput of one run at two threads), cut by cut in CUTS order, each run committed as it ends and the
#      summary over seeds 0-2 refreshed from the committed results (experiments/seed_sweep.sh);
#   2. the clipped runs (experiments/clip_sweep.sh).
# DDPM-1000 evaluations are not in it: they need a run's checkpoints (not committed) and hours per run here; on a
# lent GPU, experiments/gpu_queue.py re-trains and scores them (gpu-replicate/seed_K/, 2.5 minutes of an H200 each).
# A single run's DDPM-1000 on this machine: KINDS=ddpm SEED=K CUTS=... experiments/extra_evals.sh.
# Everything already committed under results/fashion-mnist-seeds/ is skipped (as of this writing every run of the
# sweep and of the clipped variants is, made on several machines: results/fashion-mnist-seeds/README.md), so after
# a crash, a kill or a change of machine the same command goes on.
#
#   nohup experiments/issue11_queue.sh >> runs/issue11-queue.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
lane() { SEEDS=$1 SUMMARY_SEEDS=0,1,2 THREADS=1 COMMIT=${COMMIT:-1} experiments/seed_sweep.sh >> "runs/seed-sweep-$1.log" 2>&1; }
lane 1 & one=$!
lane 2 & two=$!
wait $one && wait $two
experiments/clip_sweep.sh
echo "[issue11_queue] all done ($(date -u +%H:%M:%S))"
