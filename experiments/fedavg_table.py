#!/usr/bin/env python3
"""Issue 12: CollaFuse against FedAvg against GM and ICM, point by point, from a seed sweep's summary.

Reads the ``metrics.json`` that ``collafuse sweep --report-only --seeds ... --baseline FedAvg=DIR`` wrote and prints
one markdown table: per-client FID (mean ± 95% Student-t half-interval over seeds), the exact client FLOPs per
training round and per generated image, the bytes each client sends and receives per training round, and what the
server holds. Nothing is computed here that the summary did not measure.

    .venv/bin/python experiments/fedavg_table.py results/fashion-mnist-seeds --cuts 0,200,300,1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(iv: dict) -> str:
    if iv.get("half_width") is None:
        return f"{iv['mean']:.2f}"
    return f"{iv['mean']:.2f} ± {iv['half_width']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="the sweep directory holding the summary's metrics.json")
    ap.add_argument("--cuts", default="0,200,1000", help="CollaFuse cuts to list (default: GM, 200, ICM)")
    ap.add_argument("--baseline", default="FedAvg", help="the --baseline label the summary was written with")
    a = ap.parse_args()
    m = json.loads((a.sweep / "metrics.json").read_text())
    if a.baseline not in m.get("baselines", {}):
        raise SystemExit(f"--baseline = {a.baseline!r} is invalid (allowed: {sorted(m.get('baselines', {}))})")
    T = m["timesteps"]
    clients = sorted(m["baselines"][a.baseline]["fid_test"])
    rounds = m["baselines"][a.baseline]["rounds"]
    print(f"| run | seeds | FID {' / '.join(clients)} | client FLOPs / round | client FLOPs / image "
          f"| client bytes over the {rounds} training rounds, up / down (mean per client) | what the server holds |")
    print("|---|---|---|---|---|---|---|")
    for cut in [int(c) for c in a.cuts.split(",")]:
        e, x = m["per_cut"][str(cut)], m["exact_per_cut"][str(cut)]
        name = "GM (cut 0)" if cut == 0 else "ICM (cut T)" if cut == T else f"CollaFuse, cut {cut}"
        n = e["fid_test"][clients[0]]["n"]
        up = "0 / 0" if cut == T else f"{x['upload_bytes_per_client']:,.0f} (one view, once) / 0"
        held = ("nothing" if cut == T else "every training image itself (x0) and its label" if cut == 0
                else "one noised view of every training image at the cut, and its label")
        print(f"| {name} | {n} | {' / '.join(cell(e['fid_test'][c]) for c in clients)} | "
              f"{x['client_flops_per_round']:.3g} | {x['client_flops_per_image']:.3g} | {up} | {held} |")
    b = m["baselines"][a.baseline]
    x = b["exact"]
    print(f"| {a.baseline} | {len(b['seeds'])} | {' / '.join(cell(b['fid_test'][c]) for c in clients)} | "
          f"{x['client_flops_per_round']:.3g} | {x['client_flops_per_image']:.3g} | "
          f"{x['upload_bytes_training']:,.0f} / {x['download_bytes_training']:,.0f} (the model, "
          f"{x['upload_bytes_per_client']:,.0f} B, each way every round, and once more down after the last) | "
          "every client's full weights after every round, and its image count |")


if __name__ == "__main__":
    main()
