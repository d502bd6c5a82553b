#!/usr/bin/env bash
# What is left of issue 11, in one resumable queue, in the order that completes whole parts soonest on 2 cores:
#   1. seeds 1 and 2 of the cut sweep, in two lanes (one seed each, one thread each: 1.24x the throughput of one run
#      at two threads), cut by cut with the baselines and the best cut first, each run committed as it ends and the
#      summary over seeds 0-2 refreshed from the committed results (experiments/seed_sweep.sh);
#   2. the last clipped run, C = 1 at cut 700 (experiments/clip_sweep.sh);
#   3. DDPM-1000 evaluations of cuts 0, 200 and 1000 of DDPM_SEED (default 1; its checkpoints must be on this
#      machine: checkpoints are not committed).
# Everything already committed under results/fashion-mnist-seeds/ is skipped (seed 0, its Inception FIDs and cut 990
# re-score, the FID floors and the first three clipped runs were made by earlier machines: commands in
# results/fashion-mnist-seeds/README.md), so after a crash, a kill or a change of machine the same command goes on.
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
