#!/bin/bash
# Does moving a study's frozen worktree to another commit change what it trains? Trains the same short runs (the
# quality recipe at n = 100, 2 rounds: cut 200, FedAvg and the large model alone) with each tree's own code and the
# same client secrets, then compares every tensor of the round-2 checkpoints, the loss curves and the samples.
#   experiments/same_training.sh /work/wt-study /work/main /tmp/same-training
set -euo pipefail
a=${1:?usage: same_training.sh TREE_A TREE_B OUT}; b=${2:?TREE_B}; out=${3:?OUT}
mkdir -p "$out"
py=$(cd "$b" && pwd)/.venv/bin/python
[ -f "$out/secrets.toml" ] || "$py" -c "
import secrets, sys
open(sys.argv[1], 'w').write(''.join(f'client{i} = \"{secrets.token_hex(32)}\"\n' for i in range(3)))" "$out/secrets.toml"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
for tree in "$a" "$b"; do
  for run in "cut_0200 split.cut=200" "fedavg split.algorithm=fedavg" \
             "alone_large split.cut=1000 client_model.block_out_channels=[32,64,64] client_model.mid_attention=true"; do
    set -- $run; key=$1; shift
    sets=(); for s in "$@"; do sets+=(--set "$s"); done
    (cd "$tree" && PYTHONPATH="$tree/src" "$py" -m collafuse run configs/quality.toml --quiet --out "$out/$(basename "$tree")/$key" \
       --client-secrets "$out/secrets.toml" --set train.rounds=2 --set data.max_train_per_client=100 \
       --set run.threads=1 "${sets[@]}")
  done
done
"$py" - "$out/$(basename "$a")" "$out/$(basename "$b")" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file
a, b = map(Path, sys.argv[1:])
same = True
for run in sorted(p.name for p in a.iterdir()):
    ckpt = "checkpoints/round_000002"
    files = sorted(p.name for p in (a / run / ckpt).glob("*.safetensors"))
    tensors = all(all((x == load_file(b / run / ckpt / f)[k]).all() for k, x in load_file(a / run / ckpt / f).items())
                  for f in files)
    losses = json.loads((a / run / "metrics.json").read_text())["losses"] == json.loads((b / run / "metrics.json").read_text())["losses"]
    samples = all((load_file(a / run / f"samples_client{i}.safetensors")["x0"] == load_file(b / run / f"samples_client{i}.safetensors")["x0"]).all()
                  for i in range(3))
    print(f"{run}: checkpoint tensors {'same' if tensors else 'DIFFER'} ({', '.join(files)}), "
          f"losses {'same' if losses else 'DIFFER'}, samples {'same' if samples else 'DIFFER'}")
    same &= bool(tensors and losses and samples)
sys.exit(0 if same else 1)
PY
