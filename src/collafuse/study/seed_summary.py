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
  strict fall beyond the intervals); refuted if some cut's lies wholly above the previous one's, or if both are
  the same value with no spread over the seeds (a measured standstill, e.g. linkage saturated at 1.0: it does not
  fall there); each step's outcome is kept (``steps``: falls, rises, flat or overlap);
- H3 (client compute falls as the cut shrinks): client FLOPs per generated image are exact, the same for every
  seed, so H3 is the single-seed verdict.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..split.checkpoint import write_text_atomic
from .sweep_report import FEDAVG_DISCLOSURE, hypotheses, mark_baselines, summarize


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


def _step(a: dict, b: dict) -> str:
    """From cut a's interval to the next cut b's: "falls" (b wholly below a), "rises" (wholly above), "flat" (one
    value, no spread over two or more seeds: measured equal) or "overlap" (not resolved by these seeds)."""
    if _below(b, a):
        return "falls"
    if _below(a, b):
        return "rises"
    if a["half_width"] == 0 and b["half_width"] == 0 and a["mean"] == b["mean"]:
        return "flat"
    return "overlap"


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
        entry = {"fid_test": {}, "kid_test": {}, "label_agreement": {}}
        for c in clients:
            for metric in entry:
                entry[metric][c] = over_seeds(cut, lambda r, c=c, m=metric: r["fidelity"][c].get(m))
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
    h2_steps = {}
    pairs = list(zip(uploading, uploading[1:]))
    for metric in ("linkage_top1", "psnr_best"):
        outcomes = [_step(per_cut[a][metric], per_cut[b][metric]) for a, b in pairs]
        h2[metric] = ("held" if outcomes and all(o == "falls" for o in outcomes)
                      else "refuted" if any(o in ("rises", "flat") for o in outcomes) else "not resolved")
        h2_steps[metric] = [{"from": a, "to": b, "outcome": o} for (a, b), o in zip(pairs, outcomes)]
    verdicts["H2"] = {"verdict": _combine(h2.values()), "per_metric": h2, "steps": h2_steps}
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


def exact_columns(rows: list[dict]) -> dict[int, dict]:
    """Per cut, the numbers that do not vary with the seed (FLOPs are counted, bytes are fixed by the shapes), from
    one seed's summary rows: client FLOPs per generated image and per training round, the client's share of each,
    bytes of one upload per client (every view once; a restarted server's re-request is not counted) and per
    generated image (means over clients)."""
    out = {}
    for r in rows:
        comp, comm = r["compute"], r["communication"]
        per_client = list(comm.values())
        train = comp.get("client_train_flops")
        out[r["cut"]] = {
            "client_flops_per_image": comp.get("client_sample_flops_per_image"),
            "client_share_sample": comp.get("client_share_sample"),
            "client_flops_per_round": None if train is None or not r.get("rounds") else train / r["rounds"],
            "client_share_train": comp.get("client_share_train"),
            "upload_bytes_per_client": (sum(c.get("upload_bytes_one_view") or 0 for c in per_client) / len(per_client)
                                        if per_client else None),
            "bytes_per_generated_image": next((c["bytes_per_generated_image"] for c in per_client
                                               if c["bytes_per_generated_image"] is not None), None),
            # everything a client sent and received while training, all rounds (FedAvg: the model, both ways)
            "upload_bytes_training": (sum(c.get("uploaded_bytes_training") or 0 for c in per_client) / len(per_client)
                                      if per_client else None),
            "download_bytes_training": (sum(c.get("downloaded_bytes_training") or 0 for c in per_client)
                                        / len(per_client) if per_client else None),
        }
    return out


def _verdict_detail(name: str, v: dict) -> str:
    if name == "H1" and "per_client" in v:
        return "; ".join(f"{c}: {x}" for c, x in v["per_client"].items())
    if name == "H2":
        labels = {"linkage_top1": "linkage", "psnr_best": "PSNR"}
        return "; ".join(f"{labels[m]}: {x} (" + ", ".join(f"{s['from']}→{s['to']} {s['outcome']}"
                                                          for s in v["steps"][m]) + ")"
                         for m, x in v["per_metric"].items())
    if name == "H3":
        return f"client FLOPs per image {v['client_sample_flops_per_image']} at cuts {v['cuts']}"
    return v.get("why", "")


def baseline_summary(runs_by_seed: dict[int, Path]) -> dict:
    """A baseline without a cut (e.g. FedAvg), one evaluated run per seed: per client the FID, KID and label
    agreement intervals over seeds, and its exact compute and communication (from the first seed)."""
    rows = {s: summarize(json.loads((d / "evaluation.json").read_text())) for s, d in sorted(runs_by_seed.items())}
    first = next(iter(rows.values()))
    clients = sorted(first["fidelity"])
    out = {"seeds": sorted(rows), "algorithm": first["algorithm"], "rounds": first["rounds"],
           "runs": {str(s): str(d) for s, d in sorted(runs_by_seed.items())}}
    for metric in ("fid_test", "kid_test", "label_agreement"):
        out[metric] = {c: interval([r["fidelity"][c].get(metric) for r in rows.values()]) for c in clients}
    out["exact"] = exact_columns([first])[first["cut"]]
    out["client_train_seconds"] = interval([r["compute"].get("client_train_seconds") for r in rows.values()])
    return out


def against_baseline(per_cut: dict, base: dict) -> dict[int, dict[str, str]]:
    """Per cut and client, CollaFuse's FID interval against the baseline's: "lower" (wholly below: better),
    "higher" (wholly above: worse) or "overlap" (not resolved by these seeds)."""
    out = {}
    for cut, e in sorted(per_cut.items()):
        out[cut] = {}
        for c, iv in e["fid_test"].items():
            b = base["fid_test"].get(c)
            out[cut][c] = ("-" if b is None else "lower" if _below(iv, b) else "higher" if _below(b, iv)
                           else "overlap")
    return out


def write_seed_summary(runs_by_seed: dict[int, dict[int, Path]], out: Path, timesteps: int, command: str,
                       baselines: dict[str, dict[int, Path]] | None = None) -> Path:
    """``runs_by_seed``: seed -> cut -> run dir, each evaluated. Writes metrics.json, report.md and the FID plot.
    ``baselines``: label -> seed -> one evaluated run without a cut (FedAvg at the same budget), added to every
    table and drawn on the plot as a horizontal band per client."""
    rows_by_seed = {s: [summarize(json.loads((d / "evaluation.json").read_text())) for _, d in sorted(runs.items())]
                    for s, runs in runs_by_seed.items()}
    per_cut, verdicts = judge(rows_by_seed, timesteps)
    exact = exact_columns(next(iter(rows_by_seed.values())))
    train_s = {cut: interval([r["compute"].get("client_train_seconds") for rows in rows_by_seed.values()
                              for r in rows if r["cut"] == cut]) for cut in per_cut}
    bases = {label: baseline_summary(runs) for label, runs in (baselines or {}).items()}
    versus = {label: against_baseline(per_cut, b) for label, b in bases.items()}
    write_text_atomic(out / "metrics.json", json.dumps(
        {"command": command, "timesteps": timesteps, "seeds": sorted(runs_by_seed), "per_cut": per_cut,
         "exact_per_cut": exact, "client_train_seconds": train_s, "hypotheses": verdicts, "baselines": bases,
         "against_baselines": {label: {str(k): v for k, v in x.items()} for label, x in versus.items()}},
        indent=1, allow_nan=False))
    clients = sorted(next(iter(per_cut.values()))["fid_test"])
    plot = _plot_fid(per_cut, clients, timesteps, out / "fidelity_fid.png", len(runs_by_seed), bases)

    def cell(iv: dict, digits: int = 4) -> str:
        if iv["mean"] is None:
            return "-"
        return f"{iv['mean']:.{digits}g}" + ("" if iv["half_width"] is None else f" ± {iv['half_width']:.2g}")

    def num(x, fmt=".3g") -> str:
        return "-" if x is None else format(x, fmt)

    def baseline(cut: int) -> str:
        return f"{cut} (GM)" if cut == 0 else f"{cut} (ICM)" if cut == timesteps else str(cut)

    header = " | ".join(f"FID {c} | KID {c}" for c in clients)
    lines = [f"# Cut sweep over {len(runs_by_seed)} seeds", "", f"    {command}", "",
             f"Mean ± 95% half-interval (Student t) over seeds {sorted(runs_by_seed)}; each seed's own report is in "
             "seed_K/report.md. Fidelity is against each client's held-out images.", "",
             f"![FID against the cut]({plot.name})", "", "## Fidelity", "",
             f"| cut | {header} | label agreement (" + ", ".join(clients) + ") |",
             "|---" * (2 * len(clients) + 2) + "|"]
    for cut, e in sorted(per_cut.items()):
        lines.append(f"| {baseline(cut)} | " + " | ".join(f"{cell(e['fid_test'][c])} | {cell(e['kid_test'][c], 3)}"
                                                          for c in clients)
                     + " | " + " / ".join(cell(e["label_agreement"][c], 2) for c in clients) + " |")
    for label, b in bases.items():
        lines.append(f"| {label} ({b['algorithm']}, seeds {b['seeds']}) | "
                     + " | ".join(f"{cell(b['fid_test'][c])} | {cell(b['kid_test'][c], 3)}" for c in clients)
                     + " | " + " / ".join(cell(b["label_agreement"][c], 2) for c in clients) + " |")
    lines += ["", "## Disclosure (mean over clients)", "",
              "| cut | linkage top-1 | PSNR, strongest attack (dB) | ε (per image, one view) |", "|---|---|---|---|"]
    for cut, e in sorted(per_cut.items()):
        if "linkage_top1" not in e:
            lines.append(f"| {baseline(cut)} | nothing uploaded | | |")
            continue
        eps = cell(e["epsilon"]) if e["epsilon"]["mean"] is not None else "none (the upload is the image)"
        psnr = "exact (x0 uploaded)" if cut == 0 else cell(e["psnr_best"])
        lines.append(f"| {baseline(cut)} | {cell(e['linkage_top1'])} | {psnr} | {eps} |")
    for label, b in bases.items():
        lines.append(f"| {label} | {FEDAVG_DISCLOSURE if b['algorithm'] == 'fedavg' else 'see its own report'} | | |")
    lines += ["", "## Client compute and communication (exact: the same for every seed)", "",
              "| cut | client FLOPs / image | client share (sampling) | client FLOPs / round | client share "
              "(training) | upload bytes / client (one view) | bytes up / down per client (training, as logged) "
              "| bytes / generated image | client train s (measured) |",
              "|---|---|---|---|---|---|---|---|---|"]
    table = [(baseline(cut), x, train_s[cut], True) for cut, x in sorted(exact.items())]
    table += [(label, b["exact"], b["client_train_seconds"], False) for label, b in bases.items()]
    for name, x, secs, views in table:
        lines.append(f"| {name} | {num(x['client_flops_per_image'])} | {num(x['client_share_sample'])} | "
                     f"{num(x['client_flops_per_round'])} | {num(x['client_share_train'])} | "
                     f"{num(x['upload_bytes_per_client']) if views else 'no view'} | "
                     f"{num(x['upload_bytes_training'])} / {num(x['download_bytes_training'])} | "
                     f"{num(x['bytes_per_generated_image'])} | {cell(secs)} |")
    lines += ["", "Bytes as logged are the first seed's: a run resumed after an interruption sends its one view again "
              "when the restarted server asks for it (the same view, bit for bit), so there the logged upload is a "
              "multiple of the one-view column; an uninterrupted CollaFuse run uploads one view per client in all."]
    lines += ["", "## The paper's claims, judged from the intervals", "", "| claim | verdict | detail |",
              "|---|---|---|"]
    for name, v in verdicts.items():
        lines.append(f"| {name} | **{v['verdict']}** | {_verdict_detail(name, v)} |")
    for label, x in versus.items():
        lines += ["", f"## CollaFuse against {label}", "",
                  f"Per cut and client, the cut's FID interval against {label}'s: lower (wholly below: better), "
                  "higher (wholly above: worse), overlap (not resolved by these seeds).", "",
                  "| cut | " + " | ".join(clients) + " |", "|---" * (len(clients) + 1) + "|"]
        for cut, per_client in x.items():
            lines.append(f"| {baseline(cut)} | " + " | ".join(per_client[c] for c in clients) + " |")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _plot_fid(per_cut: dict, clients: list[str], timesteps: int, path: Path, n_seeds: int,
              bases: dict[str, dict] | None = None) -> Path:
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
        for b in (bases or {}).values():  # a baseline without a cut: a horizontal line and band per client
            iv = b["fid_test"].get(c)
            if iv and iv["mean"] is not None:
                ax.axhline(iv["mean"], color=line.get_color(), ls="-.", lw=1.2)
                if iv["low"] is not None:
                    ax.axhspan(iv["low"], iv["high"], color=line.get_color(), alpha=0.08)
    for label in bases or {}:
        ax.plot([], [], color="black", ls="-.", lw=1.2, label=f"{label} (no cut), per client")
    mark_baselines(ax, timesteps)
    ax.set_ylabel("FID vs held-out images")
    ax.set_title(f"FID per client, mean and 95% interval over {n_seeds} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
