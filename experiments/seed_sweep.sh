#!/usr/bin/env bash
# The multi-seed cut sweep of issue 11: configs/quality.toml at ROUNDS rounds (default 100: there the cut-0 run is
# within 1.5x of the quality run's FID, results/fashion-mnist-seeds/README.md), every cut x seed, 1,000 samples per
# client against 1,000 held-out images (the default sampler, DPM-Solver++ 25 steps).
#
#   nohup experiments/seed_sweep.sh > runs/seed-sweep.log 2>&1 &
#
# Two lanes on 2 cores, one seed each at one thread (1.24x the throughput of one run at two threads, measured in
# results/fashion-mnist-seeds/README.md), the summary over every seed after each run, each run committed:
#
#   for s in 1 2; do SEEDS=$s SUMMARY_SEEDS=0,1,2 THREADS=1 COMMIT=1 \
#     nohup experiments/seed_sweep.sh > runs/seed-sweep-$s.log 2>&1 & done
#
# Resumable across machines: a run whose small files are already in $RESULTS/seed_K/cut_NNNN/ (committed by an
# earlier machine) is skipped; the others go through `collafuse sweep --seeds K --cuts C`, which skips or resumes
# what is done in $OUT. After each finished run its small files (evaluation.json, metrics.json, config.toml,
# sample grids) are copied to $RESULTS/seed_K/cut_NNNN/ so they can be committed as they finish.
# The loop is cut by cut, every seed of a cut before the next cut, in the order CUTS lists them: the baselines and
# the best cut first, so that a part-finished sweep already has intervals where the verdicts need them.
# At the end `collafuse sweep --report-only` writes the summary over seeds from $RESULTS itself (report.md,
# metrics.json, fidelity_fid.png, and each seed's report in seed_K/), whichever machine made each run.
# Client secrets stay on the machine that drew them ($OUT/seed_K/client-secrets.toml, never committed): runs of one
# seed made on two machines differ in their clients' draws, which the summary (intervals per cut, not paired
# differences) does not rely on.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/seed-sweep-r100}
RESULTS=${RESULTS:-results/fashion-mnist-seeds}
ROUNDS=${ROUNDS:-100}
SEEDS=${SEEDS:-0,1,2}
CUTS=${CUTS:-0,1000,200,900,990,500,700,300,100,50}  # 900 and 990: where the upload's epsilon gets small
SUMMARY_SEEDS=${SUMMARY_SEEDS:-$SEEDS}  # the seeds the summary covers (other lanes may run the others)
SUMMARY_CUTS=${SUMMARY_CUTS:-$CUTS}     # the cuts it covers (a lane may run a few of them, in its own order)
THREADS=${THREADS:-}  # torch threads per run (empty: torch's default, one per core)
COMMIT=${COMMIT:-0}   # 1: git-commit each finished run's results and the refreshed summary
SET=(--set "train.rounds=$ROUNDS" --set eval.n_samples=1000 --set eval.n_real=1000)
export HF_HUB_OFFLINE=1
if [[ -n $THREADS ]]; then
  export OMP_NUM_THREADS=$THREADS  # the evaluation's sampling and feature extraction too
  SET+=(--set "run.threads=$THREADS")
fi
mkdir -p "$OUT" "$RESULTS"
summarise() {  # from the committed results alone, whichever machine made each run
  .venv/bin/collafuse sweep configs/quality.toml --quiet --report-only --seeds "$SUMMARY_SEEDS" \
    --cuts "$SUMMARY_CUTS" --out "$RESULTS" "${SET[@]}" > /dev/null
}
commit() {  # only the named paths (git commit --only), whatever else is staged; a busy index is retried
  [[ $COMMIT == 1 ]] || return 0
  for _ in 1 2 3 4 5; do
    git add -- "$@" || { sleep 7; continue; }
    # Nothing new under these paths: the other lane's commit already took this run (it commits seed_*/ too).
    git diff --quiet HEAD -- "$@" && return 0
    git commit -q --only -m "$MESSAGE" -- "$@" && return 0
    sleep 7
  done
  echo "[seed_sweep] could not commit $* (commit it by hand)" >&2
}
for cut in ${CUTS//,/ }; do
  for seed in ${SEEDS//,/ }; do
    run=$(printf "%s/seed_%s/cut_%04d" "$OUT" "$seed" "$cut")
    dest=$(printf "%s/seed_%s/cut_%04d" "$RESULTS" "$seed" "$cut")
    [[ -f $dest/evaluation.json ]] && continue  # committed by an earlier machine
    .venv/bin/collafuse sweep configs/quality.toml --quiet --seeds "$seed" --cuts "$cut" --out "$OUT" "${SET[@]}"
    mkdir -p "$dest"
    cp "$run"/evaluation.json "$run"/metrics.json "$run"/config.toml "$dest"/
    cp "$run"/samples_client*.png "$run"/cut_client*.png "$run"/figure4_client*.png "$dest"/ 2>/dev/null || true
    echo "[seed_sweep] done: seed $seed cut $cut -> $dest ($(date -u +%H:%M:%S))"
    summarise
    fid=$(python3 -c "import json,sys; e=json.load(open(sys.argv[1]))['fidelity']['per_client']; \
print(' / '.join(f\"{v['vs_test']['fid']:.2f}\" for _, v in sorted(e.items())))" "$dest/evaluation.json")
    MESSAGE="Issue 11: seed $seed cut $cut finished (FID $fid); summary over seeds $SUMMARY_SEEDS refreshed"
    commit "$dest" "$RESULTS/report.md" "$RESULTS/metrics.json" "$RESULTS/fidelity_fid.png" "$RESULTS"/seed_*/
  done
done
summarise
echo "[seed_sweep] summary: $RESULTS/report.md"
