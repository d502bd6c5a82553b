"""One picture and one table from benchmarks/sampler_fid.py's JSON files: each sampler's mean FID relative to DDPM-1000
against its network evaluations per image, one line per cut (issue 10, part 3: at most 100 evaluations, within 10%).

    .venv/bin/python experiments/sampler_report.py results/samplers/quality_cut*.json \
        --plot results/samplers/quality.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def repeat_means(row: dict) -> list[float]:
    """Mean-over-clients FID of each of the row's draws (tables from before repeats hold one)."""
    return [sum(f.values()) / len(f) for f in row.get("repeats", [row["fid"]])]


def mean_fid(row: dict) -> float:
    return statistics.mean(repeat_means(row))


def spread(row: dict) -> float:
    means = repeat_means(row)
    return statistics.stdev(means) if len(means) > 1 else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", type=Path, nargs="+", help="sampler_fid.py --json files (one per run)")
    p.add_argument("--plot", type=Path, required=True)
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed FID excess over DDPM (default: %(default)s)")
    a = p.parse_args()
    tables = sorted((json.loads(t.read_text()) for t in a.tables), key=lambda t: t["cut"])

    specs = list(dict.fromkeys((r["sampler"], r["steps"], r["eta"]) for t in tables for r in t["rows"]))
    print(f"mean classifier FID over clients and draws (± std over draws), and / DDPM-1000's; same run and client "
          f"streams; limit 1 + {a.tolerance:g}")
    print("| sampler | eta | NFE | " + " | ".join(f"cut {t['cut']} (n={t['n']})" for t in tables) + " |")
    print("|---|---|---|" + "---|" * len(tables))
    for kind, steps, eta in specs:
        cells, nfe = [], "-"
        for t in tables:
            ref = next(mean_fid(r) for r in t["rows"] if r["sampler"] == "ddpm")
            row = next((r for r in t["rows"] if (r["sampler"], r["steps"], r["eta"]) == (kind, steps, eta)), None)
            sd = f" ± {spread(row):.1f}" if row and len(repeat_means(row)) > 1 else ""
            cells.append(f"{mean_fid(row):.1f}{sd} ({mean_fid(row) / ref:.2f}x)" if row else "-")
            nfe = row["network_evaluations"] if row else nfe
        print(f"| {kind}-{steps if kind != 'ddpm' else 1000} | {eta:g} | {nfe} | " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, t in enumerate(tables):
        ref = next(mean_fid(r) for r in t["rows"] if r["sampler"] == "ddpm")
        for kind, eta, style, label in (("ddim", 1.0, "o-", "DDIM eta 1"), ("ddim", 0.0, "x--", "DDIM eta 0"),
                                        ("dpmsolver", 0.0, "s:", "DPM-Solver++ 2M SDE")):
            rows = sorted((r for r in t["rows"] if r["sampler"] == kind and (kind != "ddim" or r["eta"] == eta)),
                          key=lambda r: r["network_evaluations"])
            if rows:
                ax.errorbar([r["network_evaluations"] for r in rows], [mean_fid(r) / ref for r in rows],
                            yerr=[spread(r) / ref for r in rows], fmt=style, capsize=3, color=f"C{i}",
                            label=f"cut {t['cut']}, {label}")
    ax.axhline(1.0, color="k", lw=1, label="DDPM-1000 (1000 NFE)")
    ax.axhline(1 + a.tolerance, color="k", ls=":", lw=1, label=f"DDPM + {a.tolerance:.0%}")
    ax.axvline(100, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    nfes = sorted({r["network_evaluations"] for t in tables for r in t["rows"] if r["sampler"] != "ddpm"})
    ax.set_xticks(nfes, [str(v) for v in nfes])
    ax.minorticks_off()
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("mean FID / DDPM-1000's (bars: ± std over draws)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.plot, dpi=110)
    print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
