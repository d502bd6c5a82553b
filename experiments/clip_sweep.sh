#!/usr/bin/env bash
# Part 5 of issue 11: what a real guarantee costs. The seed sweep's recipe (configs/quality.toml at ROUNDS rounds,
# 1,000 samples per client against 1,000 held-out images) with `split.upload_clip_norm = C`: each image is scaled to
# L2 norm <= C before it is noised for the upload (sensitivity 2C instead of 56), the client's own model still trains
# on the raw images. Paired with the unclipped sweep: every run reuses that sweep's client secrets for the seed
# ($PAIRED/seed_K/client-secrets.toml), so model init, training noise and upload noise are the same draws and only
# the clipping differs.
#
#   nohup experiments/clip_sweep.sh >> runs/clip-sweep.log 2>&1 &
#
# Resumable like seed_sweep.sh: a run committed in $RESULTS is skipped, and each `collafuse sweep` skips or resumes
# what is done in $OUT. Each finished run's small files go to $RESULTS/clip_C/seed_K/cut_NNNN/. Client secrets stay
# on the machine that drew them: a run made where the paired sweep's secrets are missing draws its own (logged).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/clip-sweep}
PAIRED=${PAIRED:-runs/seed-sweep-r100}
RESULTS=${RESULTS:-results/fashion-mnist-seeds}
ROUNDS=${ROUNDS:-100}
SEED=${SEED:-0}
# C:cut pairs, chosen in pairs of about equal epsilon (delta = 1/24,000, benchmarks/upload_epsilon.py): C = 1 at
# cut 300 and C = 4 at cut 700 (21.8 and 23.4), C = 4 at cut 900 and C = 1 at cut 700 (5.29 and 4.08); the
# unclipped sweep's cut 990 (3.44) is the third way to buy a single-digit epsilon.
RUNS=${RUNS:-"1:300 4:700 4:900 1:700"}
SET=(--set "train.rounds=$ROUNDS" --set eval.n_samples=1000 --set eval.n_real=1000)
export HF_HUB_OFFLINE=1
secrets="$PAIRED/seed_$SEED/client-secrets.toml"
for pair in $RUNS; do
  clip=${pair%%:*} cut=${pair##*:}
  sweep_dir="$OUT/clip_$clip"
  dest=$(printf "%s/clip_%s/seed_%s/cut_%04d" "$RESULTS" "$clip" "$SEED" "$cut")
  [[ -f $dest/evaluation.json ]] && continue  # committed by an earlier machine
  mkdir -p "$sweep_dir/seed_$SEED"
  if [[ ! -f "$sweep_dir/seed_$SEED/client-secrets.toml" ]]; then
    if [[ -f "$secrets" ]]; then
      cp "$secrets" "$sweep_dir/seed_$SEED/client-secrets.toml"
    else  # the paired sweep ran on another machine, whose secrets stayed there
      echo "[clip_sweep] $secrets is missing: C $clip cut $cut draws its own client secrets (not paired)" >&2
    fi
  fi
  .venv/bin/collafuse sweep configs/quality.toml --quiet --seeds "$SEED" --cuts "$cut" --out "$sweep_dir" \
    "${SET[@]}" --set "split.upload_clip_norm=$clip"
  run=$(printf "%s/seed_%s/cut_%04d" "$sweep_dir" "$SEED" "$cut")
  mkdir -p "$dest"
  cp "$run"/evaluation.json "$run"/metrics.json "$run"/config.toml "$dest"/
  cp "$run"/samples_client*.png "$run"/cut_client*.png "$run"/figure4_client*.png "$dest"/ 2>/dev/null || true
  echo "[clip_sweep] done: C $clip seed $SEED cut $cut -> $dest ($(date -u +%H:%M:%S))"
done
# One summary per C over all its cuts, from the committed results (`--report-only`: nothing is trained), so runs made
# on different machines are summarised together: $RESULTS/clip_C/report.md and its seed's report with plots.
for clip in $(for pair in $RUNS; do echo "${pair%%:*}"; done | sort -un); do
  cuts=$(for pair in $RUNS; do if [[ ${pair%%:*} == "$clip" ]]; then echo "${pair##*:}"; fi; done | paste -sd,)
  .venv/bin/collafuse sweep configs/quality.toml --quiet --report-only --seeds "$SEED" --cuts "$cuts" \
    --out "$RESULTS/clip_$clip" "${SET[@]}" --set "split.upload_clip_norm=$clip"
  echo "[clip_sweep] summary: $RESULTS/clip_$clip/report.md"
done
