"""The summary of a heterogeneous federation against homogeneous ones (issue 29): each client's point on the
fidelity, compute and privacy trade-off, when every client chooses its own cut and model.

Reads the study's own runs (``results/KEY/evaluation.json``; the axis named in ``study.path`` besides ``seed`` is
the federation) and the homogeneous runs that ``study.report_extra`` names (committed runs of another study, e.g.
``results/fashion-mnist-seeds/seed_{seed}/cut_0200``), paired by seed number. For every client and federation, over
seeds (Student-t 95% intervals, `seed_summary.interval`):

- the client's cut, its model's parameters, FID against its held-out images;
- its compute: client FLOPs per generated image (its sampling steps) and per training round;
- what it discloses: the formal epsilon of its upload and the linkage attack's top-1 rate; its uploaded bytes;
- the paired difference FID(federation) - FID(reference), seed by seed, against the first ``report_extra`` entry
  (the homogeneous federation at cut 200), classified gain / loss / not resolved.

Where a run was also scored with DDPM (issue 29, item 5: the fast sampler near each client's cut), the sampler
check: per client, the FID of every evaluation with as many samples beside DDPM's, their ratio against the bar
(within 10% of DDPM), and the network evaluations per image that each sampler puts on the server and on the client.

Writes ``metrics.json``, ``report.md``, ``fidelity_compute.png`` and ``fidelity_epsilon.png`` (one marker per
client and federation, interval bars on FID).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..split.checkpoint import write_text_atomic
from .scarce_report import verdict
from .seed_summary import interval


def client_point(ev: dict, client: str) -> dict:
    """One client's numbers from an evaluation.json, from the per-client sections where the run has them
    (heterogeneous runs) and from the run-wide ones otherwise (a homogeneous run: every client alike)."""
    fid = ((ev["fidelity"]["per_client"][client].get("vs_test")) or {}).get("fid")
    per = ((ev.get("compute") or {}).get("per_client") or {}).get(client)
    flops = ev["compute"]["flops"]
    if per is not None:
        params, sample_flops = per["client_params"], per["sampling_per_image"]["client"]["flops"]
        round_flops = per["train_flops_per_round"]
    else:
        params = flops["per_step"]["client"]["params"]
        sample_flops = flops["sampling_per_image"]["client"]["flops"]
        trains = flops["training"]["client"]["trains"]
        round_flops = flops["config"]["client_steps"] * flops["per_step"]["client"]["train_step"] if trains else 0
    dis = (ev.get("disclosure") or {}).get(client) or {}
    comm = ((ev.get("communication") or {}).get("per_client") or {}).get(client) or {}
    cut = ((ev.get("clients") or {}).get(client) or {}).get("cut", ev["cut"])
    return {"cut": cut, "params": params, "fid_test": fid, "client_sample_flops_per_image": sample_flops,
            "client_train_flops_per_round": round_flops, "epsilon": (dis.get("formal") or {}).get("epsilon"),
            "linkage_top1": ((dis.get("results") or {}).get("linkage") or {}).get("top1"),
            "uploaded_bytes": comm.get("uploaded_bytes")}


def load_runs(study) -> dict:
    """federation -> seed -> client -> point; the study's runs, then the ``report_extra`` references."""
    axes = [a for a in re.findall(r"{(\w+)}", study.spec.study.path) if a != "seed"]
    entries = [(study.results / job.key, job.seed, job.variants.get(axes[0], "run") if axes else "run")
               for job in study.jobs]
    for _, configs in study.spec.study.report_extra.items():
        for label, template in configs.items():
            entries += [(study.root / template.format(seed=s), s, label) for s in study.spec.study.seeds]
    out: dict = {}
    for run, seed, label in entries:
        final = run / "evaluation.json"
        if final.is_file():
            ev = json.loads(final.read_text())
            out.setdefault(label, {})[seed] = {c: client_point(ev, c) for c in sorted(ev["fidelity"]["per_client"])}
    return out


def _sampling_steps(ev: dict, client: str) -> tuple[int, int]:
    """Network evaluations per generated image on the server and on the client: the client's own grid where the
    run has per-client sections, the run-wide one otherwise."""
    per = ((ev.get("compute") or {}).get("per_client") or {}).get(client)
    steps = per["sampling_per_image"] if per is not None else ev["compute"]["flops"]["sampling_per_image"]
    return steps["server"]["steps"], steps["client"]["steps"]


def sampler_check(study, tolerance: float = 0.10) -> dict:
    """run key -> the sampler check of that run, for every run with a DDPM evaluation (``sampler_grid.sampler`` is
    "ddpm"): each other evaluation of the same checkpoint and sample count, per client its FID against held-out
    images, its server and client steps per image, and FID / FID(DDPM), which meets the bar at <= 1 + tolerance
    (a sampler better than DDPM meets it too). Runs without a DDPM evaluation are left out."""
    out: dict = {}
    for job in study.jobs:
        evs = {}
        for spec in job.evaluations:
            path = study.results / job.key / spec.output
            if path.is_file():
                evs[spec.output] = json.loads(path.read_text())
        for ref_name, ref in evs.items():
            if (ref.get("sampler_grid") or {}).get("sampler") != "ddpm":
                continue
            same = [name for name, ev in evs.items()
                    if ev.get("n_samples_per_client") == ref.get("n_samples_per_client")
                    and ev.get("checkpoint") == ref.get("checkpoint")]
            same.sort(key=lambda name: name != ref_name)  # DDPM first
            clients = {}
            for c in sorted(ref["fidelity"]["per_client"]):
                points = {name: client_point(evs[name], c) for name in same}  # the DDPM one among them
                ref_fid = points[ref_name]["fid_test"]
                rows = {}
                for name in same:
                    fid = points[name]["fid_test"]
                    server_steps, client_steps = _sampling_steps(evs[name], c)
                    ratio = fid / ref_fid if fid is not None and ref_fid else None
                    rows[name] = {"sampler": evs[name]["sampler_grid"]["sampler"], "fid_test": fid,
                                  "server_steps_per_image": server_steps, "client_steps_per_image": client_steps,
                                  "fid_over_ddpm": ratio,
                                  "within_bar": None if ratio is None else ratio <= 1 + tolerance}
                clients[c] = {"cut": points[ref_name]["cut"], "evaluations": rows}
            out[job.key] = {"reference": ref_name, "n_samples_per_client": ref.get("n_samples_per_client"),
                            "checkpoint": ref.get("checkpoint"), "tolerance": tolerance, "clients": clients}
            break  # one DDPM reference per run
    return out


def summarise(runs: dict, reference: str | None) -> dict:
    """Per federation and client: intervals of every number over seeds, and the paired FID difference against
    ``reference`` (None: no reference measured)."""
    out: dict = {}
    for label, seeds in runs.items():
        clients = sorted({c for per in seeds.values() for c in per})
        out[label] = {}
        for c in clients:
            pts = [seeds[s][c] for s in sorted(seeds) if c in seeds[s]]
            row = {k: interval([p[k] for p in pts if p[k] is not None])
                   for k in ("fid_test", "client_sample_flops_per_image", "client_train_flops_per_round", "epsilon",
                             "linkage_top1", "uploaded_bytes")}
            row["cut"], row["params"], row["seeds"] = pts[0]["cut"], pts[0]["params"], sorted(seeds)
            if reference is not None and label != reference and reference in runs:
                diffs = [seeds[s][c]["fid_test"] - runs[reference][s][c]["fid_test"]
                         for s in sorted(seeds) if s in runs[reference] and c in runs[reference][s]
                         and seeds[s][c]["fid_test"] is not None and runs[reference][s][c]["fid_test"] is not None]
                iv = interval(diffs)
                row["fid_minus_reference"] = {**iv, "verdict": verdict(iv), "reference": reference}
            out[label][c] = row
    return out


def _cell(iv: dict | None, fmt: str = "{:.1f}") -> str:
    if not iv or iv.get("n", 0) == 0:
        return "-"
    if iv["n"] == 1 or iv["half_width"] == 0:  # one seed, or the same value on every seed
        return fmt.format(iv["mean"])
    return f"{fmt.format(iv['mean'])} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]"


def _plots(study, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    markers = "osD^v<>p*"
    for name, key, xlabel, log in (("fidelity_compute.png", "client_sample_flops_per_image",
                                    "client FLOPs per generated image", True),
                                   ("fidelity_epsilon.png", "epsilon", "epsilon of the upload (formal)", True)):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m, (label, clients) in zip(markers, summary.items()):
            for c, row in clients.items():
                x, y = row[key], row["fid_test"]
                if not x.get("n") or not y.get("n") or not x["mean"] or x["mean"] <= 0:
                    continue
                err = None if y["n"] < 2 else [[y["mean"] - y["low"]], [y["high"] - y["mean"]]]
                ax.errorbar([x["mean"]], [y["mean"]], yerr=err, marker=m, ls="none", capsize=3,
                            color=f"C{int(c[6:]) % 10}", label=f"{label}: {c} (cut {row['cut']})")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID against held-out images (lower is better)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = study.results / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def write_heterogeneous_report(study) -> Path:
    runs = load_runs(study)
    extra = [label for configs in study.spec.study.report_extra.values() for label in configs]
    reference = extra[0] if extra else None
    summary = summarise(runs, reference)
    study.results.mkdir(parents=True, exist_ok=True)
    plots = _plots(study, summary) if summary else []
    check = sampler_check(study)
    metrics = {"study": study.name, "seeds": study.spec.study.seeds, "reference": reference, "federations": summary,
               "sampler_check": check}
    write_text_atomic(study.results / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False))
    lines = [f"# {study.name}: every client at its own cut and model", "",
             f"Made by `collafuse study {study.file} --report-only` from the evaluations in this folder"
             + (f" and the reference runs {', '.join(extra)}" if extra else "") + ". Intervals: 95% over seeds "
             "(Student t); paired differences are seed by seed.", ""]
    if not summary:
        lines += ["No run has finished yet."]
    for label, clients in summary.items():
        lines += [f"## {label}", "", "| client | cut | client params | FID held-out | client FLOPs per image | "
                  "client FLOPs per round | epsilon | linkage top-1 | uploaded MB | FID minus reference |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c, row in clients.items():
            d = row.get("fid_minus_reference")
            diff = "-" if d is None else f"{_cell(d, '{:+.1f}')} ({d['verdict']})"
            mb = row["uploaded_bytes"]
            # in MB; with one seed there are no bounds to scale
            mb = {**mb, **{k: mb[k] / 1e6 for k in ("mean", "low", "high") if mb.get(k) is not None}}
            lines.append(f"| {c} | {row['cut']} | {row['params']:,} | {_cell(row['fid_test'])} | "
                         f"{_cell(row['client_sample_flops_per_image'], '{:.3g}')} | "
                         f"{_cell(row['client_train_flops_per_round'], '{:.3g}')} | "
                         f"{_cell(row['epsilon'], '{:.3g}')} | "
                         f"{_cell(row['linkage_top1'], '{:.3f}')} | {_cell(mb, '{:.2f}')} | {diff} |")
        lines.append("")
    for key, run in check.items():
        tol = f"{run['tolerance']:.0%}"
        lines += [f"## Sampler check: {key}", "",
                  f"{run['n_samples_per_client']:,} samples per client at {run['checkpoint']}, each evaluation against "
                  f"{run['reference']} (DDPM); the bar is FID within {tol} of DDPM's. Network evaluations per image "
                  "are the sampler's steps on each side of the client's cut.", "",
                  "| client | cut | evaluation | sampler | server steps per image | client steps per image | "
                  f"FID held-out | FID / DDPM | within {tol} |", "|---|---|---|---|---|---|---|---|---|"]
        for c, row in run["clients"].items():
            for name, e in row["evaluations"].items():
                fid = "-" if e["fid_test"] is None else f"{e['fid_test']:.1f}"
                ratio = "-" if e["fid_over_ddpm"] is None else f"{e['fid_over_ddpm']:.3f}"
                bar = ("-" if e["within_bar"] is None or name == run["reference"]
                       else "yes" if e["within_bar"] else "no")
                lines.append(f"| {c} | {row['cut']} | {name} | {e['sampler']} | {e['server_steps_per_image']} | "
                             f"{e['client_steps_per_image']} | {fid} | {ratio} | {bar} |")
        lines.append("")
    lines += [f"![]({p.name})" for p in plots]
    path = study.results / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
