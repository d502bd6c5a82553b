#!/bin/bash
# Issue 13, item 6: does a refactor change behaviour? Runs ./run demo's job (configs/demo.toml) twice with the same
# seeds and the same client secrets: once with src/ as it was at REV (default ef2588b, the flat layout before the
# subpackages) and once with the working tree's src/, then compares the sha256 of every checkpoint, sample and
# picture, and the message logs with their wall-clock times left out. Prints IDENTICAL or the files that differ.
# About 4 minutes per demo on 2 cores; run it alone, not beside training.
#
#   experiments/demo_identity.sh [REV] [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:-ef2588b}
work=${2:-$(mktemp -d /tmp/demo-identity.XXXXXX)}
mkdir -p "$work/src-$rev"
git archive "$rev" src | tar -x -C "$work/src-$rev"
export HF_HUB_OFFLINE=1
# The client secrets normally come from each client's own entropy; a shared file makes the two runs comparable.
.venv/bin/collafuse secrets --clients 3 --out "$work/secrets.toml"
PYTHONPATH="$work/src-$rev/src" .venv/bin/collafuse run configs/demo.toml --out "$work/before" --quiet \
  --client-secrets "$work/secrets.toml"
.venv/bin/collafuse run configs/demo.toml --out "$work/after" --quiet --client-secrets "$work/secrets.toml"
for side in before after; do
  (cd "$work/$side" && find . \( -name "*.safetensors" -o -name "*.png" -o -name config.toml \) | sort \
     | xargs sha256sum) > "$work/$side.sha256"
done
echo "files compared: $(wc -l < "$work/after.sha256") (checkpoints, samples, pictures, config.toml)"
.venv/bin/python - "$work" <<'EOF'
import json, sys
work = sys.argv[1]
def log(side):  # every message record but its wall-clock time
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in open(f"{work}/{side}/message_log.jsonl")]
before, after = log("before"), log("after")
print(f"messages: {len(before)} before, {len(after)} after, {'equal' if before == after else 'DIFFERENT'} but for times")
sys.exit(before != after)
EOF
if diff "$work/before.sha256" "$work/after.sha256"; then echo "IDENTICAL ($work)"; else echo "DIFFERENT ($work)"; exit 1; fi
