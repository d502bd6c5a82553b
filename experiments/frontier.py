"""The privacy-utility frontier of one or more multi-seed sweeps: FID against the upload's epsilon, and FID against
linkage, one point per cut (mean over clients and seeds, 95% intervals as error bars), both baselines marked.

Each argument is a sweep directory written by ``collafuse sweep --seeds`` (its ``metrics.json``), optionally
labelled ``LABEL=DIR``; pass the unclipped sweep first and any clipped ones (``--set split.upload_clip_norm=C``)
after it. GM (cut 0) has no epsilon (the upload is the image) and ICM (cut T) no upload; both are drawn as
horizontal lines at their FID, as is each baseline the summary holds (``--baseline``, e.g. FedAvg: no view crosses,
so it has neither epsilon nor linkage).

    .venv/bin/python experiments/frontier.py "no clipping=runs/seed-sweep" "C = 1=runs/seed-sweep-clip1" \\
        --out results/fashion-mnist-seeds/frontier.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def mean_over_clients(entry: dict, key: str) -> tuple[float | None, float | None]:
    """Mean of the clients' means, and the mean of their half-widths (a summary error bar, not a joint interval)."""
    ivs = list(entry[key].values())
    means = [iv["mean"] for iv in ivs if iv["mean"] is not None]
    halves = [iv["half_width"] for iv in ivs if iv["half_width"] is not None]
    return (sum(means) / len(means) if means else None, sum(halves) / len(halves) if halves else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", help="[LABEL=]DIR of a multi-seed sweep")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    a = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_eps, ax_link) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for k, spec in enumerate(a.sweeps):
        label, _, path = spec.rpartition("=")
        metrics = json.loads((Path(path) / "metrics.json").read_text())
        T = metrics["timesteps"]
        label = label or Path(path).name
        color = f"C{k}"
        first_cut = min(int(c) for c in metrics["per_cut"] if 0 < int(c) < T)  # the point that carries the label
        for name, b in (metrics.get("baselines") or {}).items() if k == 0 else ():
            fid, _ = mean_over_clients(b, "fid_test")
            for ax in (ax_eps, ax_link):
                ax.axhline(fid, color="black", ls="-.", lw=1)
                ax.text(0.99, fid, f"{name} ", fontsize=7, color="black", transform=ax.get_yaxis_transform(),
                        ha="right", va="bottom")
        for cut_text, e in sorted(metrics["per_cut"].items(), key=lambda kv: int(kv[0])):
            cut = int(cut_text)
            fid, fid_err = mean_over_clients(e, "fid_test")
            if fid is None:
                continue
            if cut in (0, T):
                if k == 0:  # the baselines do not depend on clipping: draw them once
                    for ax in (ax_eps, ax_link):
                        ax.axhline(fid, color="grey", ls=":" if cut == 0 else "--", lw=1)
                        # GM's label under its line, ICM's over its own: the two FIDs are close
                        ax.text(0.01, fid, f" {'GM (cut 0)' if cut == 0 else f'ICM (cut {T})'}", fontsize=7,
                                color="grey", transform=ax.get_yaxis_transform(),
                                va="top" if cut == 0 else "bottom")
                continue
            eps, link = e["epsilon"]["mean"], e["linkage_top1"]["mean"]
            for ax, x, x_err in ((ax_eps, eps, None), (ax_link, link, e["linkage_top1"]["half_width"])):
                if x is None or (isinstance(x, float) and math.isnan(x)):
                    continue
                ax.errorbar(x, fid, yerr=fid_err, xerr=x_err, fmt="o", color=color, ms=4, capsize=2,
                            label=label if cut == first_cut else None)
                ax.annotate(str(cut), (x, fid), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
    ax_eps.set_xscale("log")
    ax_eps.set_xlabel("upload's per-image ε (δ = 1/training images; log scale)")
    ax_link.set_xlabel("linkage top-1 (re-identification among the pool)")
    for ax in (ax_eps, ax_link):
        ax.set_yscale("log")  # a clipped run that fails sits an order of magnitude above the rest
        ax.set_ylabel("FID vs held-out, mean over clients (log)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle("Privacy-utility frontier: one point per cut, labelled; mean and 95% interval over seeds",
                 fontsize=10)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out)
    print(f"frontier: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
