#!/bin/bash
# Issue 12: one lane of the FedAvg baseline at the seed sweep's budget: SEEDS (space-separated) in turn, THREADS torch
# threads each (0: torch's default). On the 2-core Intel Xeon one lane at the default 2 threads is the faster choice:
# a client's 20 local steps took 8.6-9.2 s there, and 16-30 s in each of two lanes of one thread (message_log.jsonl
# times, 2026-12-05; on the AMD EPYC of issue 11 two lanes were 1.24x faster than one). Resumable: a re-run
# continues a run from its checkpoint and skips an evaluated one. FROZEN_SRC: a copy of src/ to run from, so that
# edits to the working tree cannot reach a lane mid-run.
cd "$(dirname "$0")/.."
for s in ${SEEDS:-0 1 2}; do
  PYTHONPATH=${FROZEN_SRC:-} HF_HUB_OFFLINE=1 .venv/bin/collafuse sweep configs/quality.toml --quiet --seeds "$s" --cuts 1000 --out runs/fedavg-seeds \
    --set split.algorithm=fedavg --set train.rounds=100 --set eval.n_samples=1000 --set eval.n_real=1000 \
    --set run.threads="${THREADS:-0}"
done
echo ALLDONE
