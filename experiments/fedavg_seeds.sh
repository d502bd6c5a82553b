#!/bin/bash
# Issue 12: the FedAvg baseline at the seed sweep's budget, seeds 0-2 in turn (resumable: a re-run skips what is done).
cd "$(dirname "$0")/.."
for s in 0 1 2; do
  HF_HUB_OFFLINE=1 .venv/bin/collafuse sweep configs/quality.toml --quiet --seeds $s --cuts 1000 --out runs/fedavg-seeds \
    --set split.algorithm=fedavg --set train.rounds=100 --set eval.n_samples=1000 --set eval.n_real=1000
done
echo ALLDONE
