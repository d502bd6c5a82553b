#!/usr/bin/env bash
# The Fashion-MNIST quality experiment (issue 10): configs/quality.toml at cut 200 (CollaFuse), cut 0 (GM, one global
# server model), cut 1000 (ICM, independent client models) and cut 500, the same rounds and steps per node for all.
#
#   nohup experiments/quality.sh > runs/quality/log.txt 2>&1 &
#
# Every stage resumes: run the same command again after an interruption (the runs checkpoint every round; a finished
# stage is skipped; the sampler tables are written after every sampler). Stages:
#   1. benchmarks/convergence.py trains the runs interleaved round by round (so the machine's other load slows all
#      alike), with an FID point (--n samples per client, the fast sampler) every --eval-every rounds;
#   2. collafuse evaluate: FID/KID per client vs 1,000 held-out images with 1,000 samples, the configured sampler;
#   3. experiments/quality_report.py writes results/fashion-mnist-quality/ (numbers, curve, sample grids);
#   4. benchmarks/sampler_fid.py: the samplers against DDPM-1000 at cuts 0, 200 and 500 (SAMPLER_N samples per
#      client), then experiments/sampler_report.py draws results/samplers/quality.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quality}
RESULTS=${RESULTS:-results/fashion-mnist-quality}
SAMPLERS=${SAMPLERS:-results/samplers}
SPECS=${SPECS:-ddpm:1000:0,ddim:25:1,ddim:50:1,ddim:100:1,ddim:50:0,dpmsolver:25:0,dpmsolver:50:0,dpmsolver:100:0}
PY=.venv/bin/python
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
$PY benchmarks/convergence.py --config configs/quality.toml --recipe "quality=" --cuts 200,0,1000,500 \
  --eval-every "${EVAL_EVERY:-30}" --n "${CURVE_N:-200}" --fast "${CURVE_SAMPLER:-ddim:50:1}" --grids 64 \
  --out "$OUT" --json "$OUT/curve.json" --plot "$OUT/curve.png"
for cut in 200 0 1000 500; do
  run="$OUT/quality-cut$cut"
  [ -f "$run/evaluation.json" ] && continue  # evaluated already (its samples are cached in $run/eval/ as well)
  .venv/bin/collafuse evaluate "$run" --quiet --set eval.n_samples=1000 --set eval.n_real=1000
done
$PY experiments/quality_report.py "$OUT" "$RESULTS"
for cut in 0 200 500; do
  $PY benchmarks/sampler_fid.py "$OUT/quality-cut$cut" --n "${SAMPLER_N:-200}" --specs "$SPECS" \
    --json "$SAMPLERS/quality_cut$cut.json"
done
$PY experiments/sampler_report.py "$SAMPLERS"/quality_cut*.json --plot "$SAMPLERS/quality.png"
