#!/usr/bin/env bash
# Every run of issue 11 in one resumable queue, in the order that completes whole parts soonest on 2 cores:
# seed 0 of the cut sweep, its Inception FIDs, the clipped runs, seeds 1 and 2 (and the summary over seeds), then
# DDPM-1000 evaluations. Each step skips what is done, so after a crash or a kill the same command goes on.
#
#   nohup experiments/issue11_queue.sh >> runs/issue11-queue.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=0 experiments/seed_sweep.sh
KINDS=inception CUTS=0,200,1000 experiments/extra_evals.sh
experiments/clip_sweep.sh
SEEDS=0,1,2 experiments/seed_sweep.sh
KINDS=ddpm CUTS=${DDPM_CUTS:-0,200,1000} experiments/extra_evals.sh
echo "[issue11_queue] all done ($(date -u +%H:%M:%S))"
