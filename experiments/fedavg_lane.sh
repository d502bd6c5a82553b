#!/bin/bash
# Issue 12: one lane of the FedAvg baseline at the seed sweep's budget: SEEDS (space-separated) in turn, THREADS torch
# threads each (two lanes of one thread on 2 cores give more throughput than one run of two). Resumable: a re-run
# continues a run from its checkpoint and skips an evaluated one. FROZEN_SRC: a copy of src/ to run from, so that
# edits to the working tree cannot reach a lane mid-run.
cd "$(dirname "$0")/.."
for s in ${SEEDS:-0 1 2}; do
  PYTHONPATH=${FROZEN_SRC:-} HF_HUB_OFFLINE=1 .venv/bin/collafuse sweep configs/quality.toml --quiet --seeds "$s" --cuts 1000 --out runs/fedavg-seeds \
    --set split.algorithm=fedavg --set train.rounds=100 --set eval.n_samples=1000 --set eval.n_real=1000 \
    --set run.threads="${THREADS:-0}"
done
echo ALLDONE
