"""A cut sweep over several seeds: per cut and client the mean and a 95% interval over seeds, and the paper's claims
judged from the intervals (issue 11).

Each seed is a sweep of its own (``DIR/seed_K/``, with its own report); this module reads their evaluations and
writes ``DIR/metrics.json``, ``DIR/report.md`` and ``DIR/fidelity_fid.png`` (FID against the cut with interval
bands). The interval is Student's t: mean +- t_{0.975, n-1} s / sqrt(n) over the n seeds (s: the sample std).

Verdicts, each "held", "refuted" or "not resolved" (at this budget and this many seeds):

- H1 (collaboration beats independent client models): per client, held if some cut < T has its FID interval wholly
  below the interval at cut T, refuted if every cut < T has its interval wholly above it;
- H2 (disclosure falls as the cut grows): for linkage top-1 and the strongest reconstruction attack's PSNR (mean
  over clients) among the cuts that upload, held if each cut's interval lies wholly below the previous cut's (a
  strict fall beyond the intervals), refuted if some cut's lies wholly above the previous one's;
- H3 (client compute falls as the cut shrinks): client FLOPs per generated image are exact, the same for every
  seed, so H3 is the single-seed verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .checkpoint import write_text_atomic
from .sweep_report import hypotheses, mark_baselines, summarize


def interval(values: list[float], level: float = 0.95) -> dict:
    """Mean and the Student-t interval half-width over ``values`` (None entries dropped); width is None for n < 2."""
    from scipy.stats import t as student_t

    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "half_width": None, "low": None, "high": None}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "half_width": None, "low": None, "high": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "half_width": half, "low": mean - half, "high": mean + half}


def _below(a: dict, b: dict) -> bool | None:
    """a's interval wholly below b's; None when either has no interval."""
    if a["high"] is None or b["low"] is None:
        return None
    return a["high"] < b["low"]


def judge(rows_by_seed: dict[int, list[dict]], timesteps: int) -> tuple[dict, dict]:
    """Per-cut intervals and the three verdicts from the seeds' summary rows (`sweep_report.summarize`)."""
    cuts = sorted({r["cut"] for rows in rows_by_seed.values() for r in rows})
    by = {s: {r["cut"]: r for r in rows} for s, rows in rows_by_seed.items()}
    clients = sorted(next(iter(rows_by_seed.values()))[0]["fidelity"])

    def over_seeds(cut: int, get) -> dict:
        return interval([get(by[s][cut]) for s in by if cut in by[s]])

    def mean_disclosure(metric):
        return lambda r: (sum(d[metric] for d in r["disclosure"].values()) / len(r["disclosure"])
                          if all(r["disclosure"].values()) else None)

    per_cut = {}
    for cut in cuts:
        entry = {"fid_test": {}, "kid_test": {}}
        for c in clients:
            entry["fid_test"][c] = over_seeds(cut, lambda r, c=c: r["fidelity"][c]["fid_test"])
            entry["kid_test"][c] = over_seeds(cut, lambda r, c=c: r["fidelity"][c]["kid_test"])
        if cut < timesteps:
            for metric in ("linkage_top1", "psnr_best"):
                entry[metric] = over_seeds(cut, mean_disclosure(metric))
            entry["epsilon"] = over_seeds(cut, lambda r: next(iter(r["disclosure"].values()))["epsilon"])
        per_cut[cut] = entry

    verdicts = {}
    if timesteps in per_cut and len(cuts) > 1:
        h1 = {}
        for c in clients:
            icm = per_cut[timesteps]["fid_test"][c]
            below = [_below(per_cut[k]["fid_test"][c], icm) for k in cuts if k < timesteps]
            above = [_below(icm, per_cut[k]["fid_test"][c]) for k in cuts if k < timesteps]
            h1[c] = "held" if any(below) else "refuted" if above and all(above) else "not resolved"
        verdicts["H1"] = {"verdict": _combine(h1.values()), "per_client": h1}
    else:
        verdicts["H1"] = {"verdict": "not resolved", "why": f"needs cut = T = {timesteps} and another cut"}
    uploading = [k for k in cuts if k < timesteps]
    h2 = {}
    for metric in ("linkage_top1", "psnr_best"):
        steps = list(zip(uploading, uploading[1:]))
        falls = [_below(per_cut[b][metric], per_cut[a][metric]) for a, b in steps]
        rises = [_below(per_cut[a][metric], per_cut[b][metric]) for a, b in steps]
        h2[metric] = ("held" if steps and all(falls) else "refuted" if any(rises) else "not resolved")
    verdicts["H2"] = {"verdict": _combine(h2.values()), "per_metric": h2}
    first = next(iter(rows_by_seed.values()))
    h3 = hypotheses(first, timesteps)["H3"]
    verdicts["H3"] = {"verdict": {True: "held", False: "refuted", None: "not resolved"}[h3["holds"]], **h3}
    return per_cut, verdicts


def _combine(parts) -> str:
    parts = list(parts)
    if parts and all(p == "held" for p in parts):
        return "held"
    if any(p == "refuted" for p in parts):
        return "refuted"
    return "not resolved"


def write_seed_summary(runs_by_seed: dict[int, dict[int, Path]], out: Path, timesteps: int, command: str) -> Path:
    """``runs_by_seed``: seed -> cut -> run dir, each evaluated. Writes metrics.json, report.md and the FID plot."""
    rows_by_seed = {s: [summarize(json.loads((d / "evaluation.json").read_text())) for _, d in sorted(runs.items())]
                    for s, runs in runs_by_seed.items()}
    per_cut, verdicts = judge(rows_by_seed, timesteps)
    write_text_atomic(out / "metrics.json", json.dumps(
        {"command": command, "timesteps": timesteps, "seeds": sorted(runs_by_seed), "per_cut": per_cut,
         "hypotheses": verdicts}, indent=1, allow_nan=False))
    clients = sorted(next(iter(per_cut.values()))["fid_test"])
    plot = _plot_fid(per_cut, clients, timesteps, out / "fidelity_fid.png", len(runs_by_seed))

    def cell(iv: dict, digits: int = 4) -> str:
        if iv["mean"] is None:
            return "-"
        return f"{iv['mean']:.{digits}g}" + ("" if iv["half_width"] is None else f" ± {iv['half_width']:.2g}")

    lines = [f"# Cut sweep over {len(runs_by_seed)} seeds", "", f"    {command}", "",
             f"Mean ± 95% half-interval (Student t) over seeds {sorted(runs_by_seed)}; each seed's own report is in "
             "seed_K/report.md.", "", f"![FID against the cut]({plot.name})", "",
             "| cut | " + " | ".join(f"FID {c}" for c in clients)
             + " | linkage top-1 | PSNR, strongest attack (dB) | ε |",
             "|---" * (len(clients) + 4) + "|"]
    for cut, e in sorted(per_cut.items()):
        dis = [cell(e[m]) if m in e else "nothing uploaded" for m in ("linkage_top1", "psnr_best", "epsilon")]
        lines.append(f"| {cut} | " + " | ".join(cell(e["fid_test"][c]) for c in clients) + " | " + " | ".join(dis)
                     + " |")
    lines += ["", "| claim | verdict | detail |", "|---|---|---|"]
    for name, v in verdicts.items():
        detail = v.get("per_client") or v.get("per_metric") or v.get("why") or ""
        if name == "H3":
            detail = f"client FLOPs per image {v['client_sample_flops_per_image']} at cuts {v['cuts']}"
        lines.append(f"| {name} | **{v['verdict']}** | {detail} |")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _plot_fid(per_cut: dict, clients: list[str], timesteps: int, path: Path, n_seeds: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    cuts = sorted(per_cut)
    for c in clients:
        ivs = [per_cut[k]["fid_test"][c] for k in cuts]
        pts = [(k, iv) for k, iv in zip(cuts, ivs) if iv["mean"] is not None]
        xs = [k for k, _ in pts]
        (line,) = ax.plot(xs, [iv["mean"] for _, iv in pts], marker="o", label=c)
        banded = [(k, iv) for k, iv in pts if iv["low"] is not None]
        if banded:
            ax.fill_between([k for k, _ in banded], [iv["low"] for _, iv in banded],
                            [iv["high"] for _, iv in banded], color=line.get_color(), alpha=0.2)
    mark_baselines(ax, timesteps)
    ax.set_ylabel("FID vs held-out images")
    ax.set_title(f"FID per client, mean and 95% interval over {n_seeds} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
