#!/usr/bin/env bash
# The multi-seed cut sweep of issue 11: configs/quality.toml at ROUNDS rounds (default 100: there the cut-0 run is
# within 1.5x of the quality run's FID, results/fashion-mnist-seeds/README.md), every cut x seed, 1,000 samples per
# client against 1,000 held-out images (the default sampler, DPM-Solver++ 25 steps).
#
#   nohup experiments/seed_sweep.sh > runs/seed-sweep.log 2>&1 &
#
# Resumable: one `collafuse sweep --seeds K --cuts C` per run, in order, each skipping what is done; after each
# finished run its small files (evaluation.json, metrics.json, config.toml, sample grids) are copied to
# $RESULTS/seed_K/cut_NNNN/ so they can be committed as they finish. The last call covers every seed and cut
# and writes the summary over seeds ($OUT/report.md, metrics.json, fidelity_fid.png), copied to $RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/seed-sweep-r100}
RESULTS=${RESULTS:-results/fashion-mnist-seeds}
ROUNDS=${ROUNDS:-100}
SEEDS=${SEEDS:-0,1,2}
CUTS=${CUTS:-0,50,100,200,300,500,700,900,990,1000}  # 900 and 990: where the upload's epsilon gets small
SET=(--set "train.rounds=$ROUNDS" --set eval.n_samples=1000 --set eval.n_real=1000)
export HF_HUB_OFFLINE=1
mkdir -p "$OUT" "$RESULTS"
for seed in ${SEEDS//,/ }; do
  for cut in ${CUTS//,/ }; do
    .venv/bin/collafuse sweep configs/quality.toml --quiet --seeds "$seed" --cuts "$cut" --out "$OUT" "${SET[@]}"
    run=$(printf "%s/seed_%s/cut_%04d" "$OUT" "$seed" "$cut")
    dest=$(printf "%s/seed_%s/cut_%04d" "$RESULTS" "$seed" "$cut")
    mkdir -p "$dest"
    cp "$run"/evaluation.json "$run"/metrics.json "$run"/config.toml "$dest"/
    cp "$run"/samples_client*.png "$run"/cut_client*.png "$dest"/ 2>/dev/null || true
    echo "[seed_sweep] done: seed $seed cut $cut -> $dest ($(date -u +%H:%M:%S))"
  done
done
.venv/bin/collafuse sweep configs/quality.toml --quiet --seeds "$SEEDS" --cuts "$CUTS" --out "$OUT" "${SET[@]}"
cp "$OUT"/report.md "$OUT"/metrics.json "$OUT"/fidelity_fid.png "$RESULTS"/
for seed in ${SEEDS//,/ }; do  # each seed's own report over every cut, with its plots and Figure-4 grid
  cp "$OUT/seed_$seed"/report.md "$OUT/seed_$seed"/metrics.json "$OUT/seed_$seed"/*.png "$RESULTS/seed_$seed"/
done
echo "[seed_sweep] summary: $RESULTS/report.md"
