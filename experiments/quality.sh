#!/usr/bin/env bash
# The Fashion-MNIST quality experiment (issue 10): configs/quality.toml at cut 200 (CollaFuse), cut 0 (GM, one global
# server model) and cut 1000 (ICM, independent client models), the same rounds and steps per node for all three.
#
#   nohup experiments/quality.sh > runs/quality/log.txt 2>&1 &
#
# Every stage resumes: run the same command again after an interruption (the runs checkpoint every round; evaluation
# caches its samples keyed by the checkpoint and the sampler settings). Stages:
#   1. benchmarks/convergence.py trains the three runs interleaved round by round (so the machine's other load slows
#      all alike), with an FID point (--n samples per client, the fast sampler) every --eval-every rounds;
#   2. collafuse evaluate: FID/KID per client vs 1,000 held-out images with 1,000 samples, the configured sampler;
#   3. experiments/quality_report.py writes results/fashion-mnist-quality/ (numbers, curve, sample grids).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quality}
RESULTS=${RESULTS:-results/fashion-mnist-quality}
PY=.venv/bin/python
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
$PY benchmarks/convergence.py --config configs/quality.toml --recipe "quality=" --cuts 200,0,1000 \
  --eval-every "${EVAL_EVERY:-30}" --n "${CURVE_N:-200}" --fast "${CURVE_SAMPLER:-ddim:50:1}" --grids 64 \
  --out "$OUT" --json "$OUT/curve.json" --plot "$OUT/curve.png"
for run in "$OUT"/quality-cut200 "$OUT"/quality-cut0 "$OUT"/quality-cut1000; do
  .venv/bin/collafuse evaluate "$run" --quiet --set eval.n_samples=1000 --set eval.n_real=1000
done
$PY experiments/quality_report.py "$OUT" "$RESULTS"
