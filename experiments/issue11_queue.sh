#!/usr/bin/env bash
# Every run of issue 11 in one resumable queue, in the order that completes whole parts soonest on 2 cores:
# seed 0 of the cut sweep, its Inception FIDs, seed 0's cut 990 scored again on the fixed DPM-Solver grid, the
# Inception FID floor, the clipped runs, seeds 1 and 2 (and the summary over seeds), then DDPM-1000 evaluations.
# Each step skips what is done, so after a crash or a kill the same command goes on.
#
#   nohup experiments/issue11_queue.sh >> runs/issue11-queue.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=0 experiments/seed_sweep.sh
KINDS=inception CUTS=0,200,1000 experiments/extra_evals.sh
# Seed 0's cut 990 was scored when DPM-Solver's stride shrank for a short server segment (the client ran 99 steps,
# not ICM's 25). An evaluation.json without the "sampler_grid" entry predates the fix: keep it beside the new one.
stale=runs/seed-sweep-r100/seed_0/cut_0990
if [[ -f $stale/evaluation.json ]] && ! grep -q '"sampler_grid"' "$stale/evaluation.json"; then
  mv "$stale/evaluation.json" "$stale/evaluation-shrunk-grid.json"
  mkdir -p results/fashion-mnist-seeds/seed_0/cut_0990
  cp "$stale/evaluation-shrunk-grid.json" results/fashion-mnist-seeds/seed_0/cut_0990/
  SEEDS=0 experiments/seed_sweep.sh
fi
# The real-data floor under Inception features, to read the Inception FIDs against (one subset: ~10 min here).
floor=results/fashion-mnist-seeds/fid_floor_inception.json
[[ -f $floor ]] || HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fid_floor.py --config configs/quality.toml --n 1000 \
  --n-real 1000 --extractor inception --repeats 1 --json "$floor"
# Clipped runs scored before the averaging what-if drew its views of the clipped images (their evaluation.json has
# no "views_of") are scored again; the samples are cached, so only the disclosure section is recomputed.
for ev in runs/clip-sweep/clip_*/seed_*/cut_*/evaluation.json; do
  [[ -f $ev ]] && ! grep -q '"views_of"' "$ev" && rm "$ev"
done
experiments/clip_sweep.sh
SEEDS=0,1,2 experiments/seed_sweep.sh
KINDS=ddpm CUTS=${DDPM_CUTS:-0,200,1000} experiments/extra_evals.sh
echo "[issue11_queue] all done ($(date -u +%H:%M:%S))"
