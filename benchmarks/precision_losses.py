"""Does bf16 train like fp32? Loss curves of the same run in both precisions, beside the run-to-run noise.

Three runs of one config (default configs/demo.toml), each through ``collafuse run`` (resumable: run the same
command again after an interruption):

- ``fp32``: ``train.precision = "fp32"`` with client secrets A;
- ``bf16``: ``train.precision = "bf16"`` with the same secrets A (same data order, noise and init: only the
  precision differs);
- ``fp32-other``: fp32 with secrets B (other init, batches and noise): how far two fp32 runs lie apart.

Plots every node's per-round loss for the three runs, and prints per node the mean absolute gap between bf16 and
fp32 next to the gap between the two fp32 runs, over the last half of the rounds.

    .venv/bin/python benchmarks/precision_losses.py --out runs/precision --plot results/precision/losses.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    p.add_argument("--out", type=Path, default=Path("runs/precision"))
    p.add_argument("--plot", type=Path, default=REPO / "results" / "precision" / "losses.png")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for all runs")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from collafuse.config import load_config
    from collafuse.split.seeding import write_secrets_file

    n_clients = load_config(a.config, a.overrides).data.num_clients
    secrets = {}
    for name in ("A", "B"):
        secrets[name] = a.out / f"secrets_{name}.toml"
        if not secrets[name].exists():
            write_secrets_file(secrets[name], n_clients)
    runs = {"fp32": ("fp32", "A"), "bf16": ("bf16", "A"), "fp32-other": ("fp32", "B")}
    for name, (precision, key) in runs.items():
        cmd = [sys.executable, "-m", "collafuse", "run", a.config, "--out", str(a.out / name), "--resume", "--quiet",
               "--client-secrets", str(secrets[key]), "--set", f"train.precision={precision}",
               *[x for o in a.overrides for x in ("--set", o)]]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = {n: json.loads((a.out / n / "metrics.json").read_text()) for n in runs}
    nodes = [k for k, v in hist["fp32"]["losses"].items() if any(x is not None for x in v)]
    for n in runs:
        print(f"{n}: train seconds " + ", ".join(f"{k} {v:.0f}" for k, v in hist[n]["train_seconds"].items()))
    fig, axes = plt.subplots(1, len(nodes), figsize=(4 * len(nodes), 3.2), squeeze=False)
    print(f"\n{'node':<8} {'|bf16 - fp32|':>14} {'|fp32 B - fp32 A|':>18}  (mean over the last half of the rounds)")
    for ax, node in zip(axes[0], nodes):
        curves = {n: hist[n]["losses"][node] for n in runs}
        for n, style in (("fp32", "-"), ("bf16", "--"), ("fp32-other", ":")):
            ax.plot(range(1, len(curves[n]) + 1), curves[n], style, label=n)
        ax.set_title(node)
        ax.set_xlabel("round")
        ax.set_ylabel("mean training loss")
        half = len(curves["fp32"]) // 2

        def gap(x, y, half=half):
            pairs = [(u, v) for u, v in zip(x[half:], y[half:]) if u is not None and v is not None]
            return sum(abs(u - v) for u, v in pairs) / len(pairs)

        print(f"{node:<8} {gap(curves['bf16'], curves['fp32']):14.4f} "
              f"{gap(curves['fp32-other'], curves['fp32']):18.4f}")
    axes[0][0].legend()
    fig.suptitle("bf16 autocast vs fp32: same secrets (fp32, bf16) and other secrets (fp32-other)")
    fig.tight_layout()
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.plot, dpi=110)
    print(f"\nplot: {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
