"""Every attack's score per cut, from the evaluations of a (multi-seed) sweep: the numbers behind the
threat model in docs/evaluation.md. Mean over clients, then over the seeds found; the seed count is printed per row.

    .venv/bin/python experiments/disclosure_table.py runs/seed-sweep-r100
    .venv/bin/python experiments/disclosure_table.py results/fashion-mnist-seeds   # the committed copies

Columns: linkage top-1 among the pool (and among same-label candidates only), reconstruction PSNR (dB) of each
attack on one view (rescaling, empirical-Bayes Tweedie, Tweedie with the server's model, the exact-seed attack)
beside guessing the per-pixel mean image, the averaging attack if views were re-drawn K times (best of rescale and
Tweedie), and the upload's per-image ε.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ATTACKS = {"rescale": "reconstruction_rescale", "tweedie": "reconstruction_tweedie_gaussian",
           "server model": "reconstruction_tweedie_server", "exact seed": "reconstruction_exact_seed"}


def per_client_mean(ev: dict, get) -> float | None:
    vals = [get(v) for k, v in ev["disclosure"].items() if k.startswith("client")]
    vals = [x for x in vals if x is not None]
    return statistics.fmean(vals) if vals else None


def res(name: str, key: str):
    """A getter of one attack's score from a client's disclosure entry (None where the attack did not run)."""
    return lambda c: ((c.get("results") or {}).get(name) or {}).get(key)


def row(ev: dict, ks: list[int]) -> dict:
    out = {"linkage": per_client_mean(ev, res("linkage", "top1")),
           "same-label": per_client_mean(ev, res("linkage_same_label", "top1"))}
    for label, name in ATTACKS.items():
        out[label] = per_client_mean(ev, res(name, "psnr"))
    # the best image-independent guess, the per-pixel mean of x0 (an oracle baseline, the same for every attack)
    out["mean image"] = per_client_mean(ev, lambda c: (res("reconstruction_rescale", "chance")(c) or {}).get("psnr"))
    for k in ks:
        out[f"K={k}"] = per_client_mean(ev, lambda c, k=k: max(
            (x for x in (res(f"averaging_k{k}_rescale", "psnr")(c), res(f"averaging_k{k}_tweedie", "psnr")(c))
             if x is not None), default=None))
    out["ε"] = per_client_mean(ev, lambda c: (c.get("formal") or {}).get("epsilon"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="a sweep directory with seed_K/cut_NNNN/evaluation.json (or cut_NNNN/)")
    p.add_argument("--ks", default="4,16,64", help="averaging attack's K values (default: %(default)s)")
    a = p.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    files = sorted(a.sweep.glob("seed_*/cut_*/evaluation.json")) or sorted(a.sweep.glob("cut_*/evaluation.json"))
    by_cut: dict[int, list[dict]] = {}
    for f in files:
        ev = json.loads(f.read_text())
        if ev["disclosure"].get("skipped"):
            continue
        by_cut.setdefault(ev["cut"], []).append(row(ev, ks))
    cols = ["linkage", "same-label", *ATTACKS, "mean image", *(f"K={k}" for k in ks), "ε"]
    print("| cut | seeds | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for cut, rows in sorted(by_cut.items()):
        cells = []
        for c in cols:
            vals = [r[c] for r in rows if r[c] is not None]
            cells.append("-" if not vals else format(statistics.fmean(vals), ".3g" if c == "ε" else ".4g"))
        print(f"| {cut} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
