#!/usr/bin/env bash
# What is left of issue 11 on a 2-core CPU machine, in one resumable queue:
#   1. the seed-sweep runs of seeds 1 and 2 not yet committed, in two lanes (one seed each, one thread each: 1.24x
#      the throughput of one run at two threads), cut by cut in CUTS order, each run committed as it ends and the
#      summary over seeds 0-2 refreshed from the committed results (experiments/seed_sweep.sh);
#   2. the last clipped run, C = 1 at cut 700 (experiments/clip_sweep.sh);
#   3. DDPM-1000 evaluations of cuts 0, 200 and 1000 of DDPM_SEED (default 1). They need that seed's checkpoints on
#      this machine (checkpoints are not committed) and about an hour each here; on a lent GPU,
#      experiments/gpu_queue.py trains and scores them in minutes (gpu-replicate/seed_1/).
# Everything already committed under results/fashion-mnist-seeds/ is skipped (earlier machines made seed 0, the
# Inception FIDs, the FID floors, three clipped runs and, on an H200, eight runs: results/fashion-mnist-seeds/
# README.md), so after a crash, a kill or a change of machine the same command goes on.
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
KINDS=ddpm SEED=${DDPM_SEED:-1} CUTS=0,200,1000 experiments/extra_evals.sh
echo "[issue11_queue] all done ($(date -u +%H:%M:%S))"
