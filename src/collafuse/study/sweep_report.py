"""The sweep's report: per-cut tables and plots of fidelity, disclosure, client compute and communication, a
Figure-4-style grid, and the paper's three hypotheses judged from the numbers (never asserted by hand)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import Config
from ..data.images import grid
from ..split.checkpoint import write_text_atomic


def _get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _exact_seed_cell(ds: list[dict]) -> str:
    """Mean PSNR of the exact-seed attack and how many clients' images it recovered exactly ("0/3": it failed)."""
    hits = [d["exact_seed_recovered"] for d in ds if d.get("exact_seed_recovered") is not None]
    if not hits:
        return "not run"
    vals = [d["psnr_exact_seed"] for d in ds if d.get("psnr_exact_seed") is not None]
    return f"{_fmt(sum(vals) / len(vals))}, {sum(map(bool, hits))}/{len(hits)}"


def algorithm_of(evaluation: dict) -> str:
    """"fedavg" or "collafuse", from what the evaluation records (FedAvg's disclosure is skipped, and says why)."""
    skipped = _get(evaluation, "disclosure", "skipped")
    return "fedavg" if isinstance(skipped, str) and skipped.startswith("fedavg") else "collafuse"


def summarize(evaluation: dict) -> dict:
    """The handful of numbers per cut that the plots and hypotheses use, from one evaluation.json."""
    fid = evaluation["fidelity"]["per_client"]
    dis = evaluation["disclosure"]
    comp = evaluation["compute"]["flops"]
    comm = evaluation.get("communication") or {}
    clients = sorted(fid)
    row = {"cut": evaluation["cut"], "rounds": evaluation.get("rounds"), "algorithm": algorithm_of(evaluation),
           "fidelity": {}, "disclosure": {},
           "compute": {}, "communication": {}}
    for c in clients:
        row["fidelity"][c] = {
            "kid_test": _get(fid[c], "vs_test", "kid_mean"), "fid_test": _get(fid[c], "vs_test", "fid"),
            "kid_train": _get(fid[c], "vs_train", "kid_mean"), "fid_train": _get(fid[c], "vs_train", "fid"),
            "label_tv": _get(fid[c], "label_mix", "tv_distance"),
            # share of samples the classifier assigns to the label they were requested for
            "label_agreement": _get(fid[c], "label_mix", "label_agreement"),
        }
        res = _get(dis, c, "results", default=None)
        row["disclosure"][c] = None if res is None else {
            "linkage_top1": _get(res, "linkage", "top1"),
            "psnr_rescale": _get(res, "reconstruction_rescale", "psnr"),
            # the strongest reconstruction the server has at this cut, whichever attack it is
            "psnr_best": max((r["psnr"] for k, r in res.items() if k.startswith("reconstruction_")
                              and r.get("psnr") is not None), default=None),
            "psnr_tweedie_server": _get(res, "reconstruction_tweedie_server", "psnr"),
            "ssim_tweedie_server": _get(res, "reconstruction_tweedie_server", "ssim"),
            "proxy_upload_mse": _get(res, "proxy_upload_mse", "mse"),
            # None for evaluations from before the attack existed
            "psnr_exact_seed": _get(res, "reconstruction_exact_seed", "psnr"),
            "exact_seed_recovered": _get(res, "reconstruction_exact_seed", "recovered"),
            # the upload's formal per-image epsilon (None at cut 0, and for evaluations from before the account)
            "epsilon": _get(dis, c, "formal", "epsilon"),
        }
        sampling = _get(comm, "per_client", c, "sampling", default={})
        row["communication"][c] = {
            "uploaded_bytes_training": _get(comm, "per_client", c, "training", "uploaded_bytes", default=0),
            "downloaded_bytes_training": _get(comm, "per_client", c, "training", "downloaded_bytes", default=0),
            # one set of views (the first round that uploads); the total above also counts a server's re-request
            # of the same views after it was restarted
            "upload_bytes_one_view": next((r["uploaded_bytes"] for r in _get(
                comm, "per_client", c, "training", "per_round", default=[]) if r["uploaded_bytes"]), 0),
            "bytes_per_generated_image": sampling.get("bytes_per_image"),
        }
    row["overall"] = {"kid_test": _get(evaluation, "fidelity", "overall_vs_test", "kid_mean"),
                      "fid_test": _get(evaluation, "fidelity", "overall_vs_test", "fid")}
    seconds = _get(evaluation, "compute", "measured_train_seconds", default={}) or {}
    row["compute"] = {
        "client_train_flops": _get(comp, "training", "client", "flops"),
        "client_share_train": _get(comp, "training", "client_share"),
        "client_sample_flops_per_image": _get(comp, "sampling_per_image", "client", "flops"),
        "client_share_sample": _get(comp, "sampling_per_image", "client_share"),
        "client_train_seconds": (sum(seconds.get(c, 0.0) for c in clients) / len(clients)) if seconds else None,
    }
    return row


def _monotone(values: list[float], decreasing: bool) -> bool:
    pairs = list(zip(values, values[1:]))
    return all((b <= a) if decreasing else (b >= a) for a, b in pairs)


def hypotheses(rows: list[dict], timesteps: int) -> dict:
    """H1: for every client some collaborative cut (0 <= cut < T) has lower KID (vs its held-out test images) than
    independent client models (cut = T). H2: linkage and the strongest reconstruction attack's PSNR fall as the cut
    grows (among cuts that upload anything). H3: client compute falls as the cut shrinks, judged on the client's
    FLOPs per generated image (its share of the denoising chain). Client *training* FLOPs are reported beside it: at
    a fixed budget of K steps per round a training step costs the same whatever t-range it samples, so they are
    flat for every cut > 0 and zero at cut 0."""
    by_cut = {r["cut"]: r for r in rows}
    out = {}
    if timesteps in by_cut and len(by_cut) > 1:
        icm = by_cut[timesteps]["fidelity"]
        verdict = {}
        for c, stats in icm.items():
            base = stats["kid_test"]
            collab = {cut: r["fidelity"][c]["kid_test"] for cut, r in by_cut.items() if cut < timesteps}
            best_cut = min(collab, key=lambda k: collab[k])
            verdict[c] = {"icm_kid": base, "best_cut": best_cut, "best_kid": collab[best_cut],
                          "holds": collab[best_cut] < base}
        out["H1"] = {"holds": all(v["holds"] for v in verdict.values()), "per_client": verdict}
    else:
        out["H1"] = {"holds": None, "why": f"needs cut = T = {timesteps} and at least one other cut"}
    uploading = [r for r in sorted(rows, key=lambda r: r["cut"]) if r["cut"] < timesteps]
    if len(uploading) >= 2:
        per_metric = {}
        for metric in ("linkage_top1", "psnr_best"):
            series = [sum(d[metric] for d in r["disclosure"].values()) / len(r["disclosure"]) for r in uploading]
            per_metric[metric] = {"cuts": [r["cut"] for r in uploading], "mean_over_clients": series,
                                  "decreasing": _monotone(series, decreasing=True)}
        out["H2"] = {"holds": all(m["decreasing"] for m in per_metric.values()), "per_metric": per_metric}
    else:
        out["H2"] = {"holds": None, "why": "needs at least two cuts below T"}
    ordered = sorted(rows, key=lambda r: r["cut"])
    flops = [r["compute"]["client_sample_flops_per_image"] for r in ordered]
    out["H3"] = {"holds": _monotone(flops, decreasing=False) and flops[0] < flops[-1] if len(flops) > 1 else None,
                 "cuts": [r["cut"] for r in ordered], "client_sample_flops_per_image": flops,
                 "client_train_flops": [r["compute"]["client_train_flops"] for r in ordered],
                 "client_train_seconds": [r["compute"]["client_train_seconds"] for r in ordered]}
    return out


def mark_baselines(ax, timesteps: int) -> None:
    """The cut axis of every sweep plot: GM (cut 0) and ICM (cut T) marked."""
    ax.axvline(0, color="grey", ls=":", lw=1)
    ax.axvline(timesteps, color="grey", ls="--", lw=1)
    ax.text(0, 1.01, " GM (cut 0)", transform=ax.get_xaxis_transform(), fontsize=7, color="grey")
    ax.text(timesteps, 1.01, f"ICM (cut {timesteps}) ", transform=ax.get_xaxis_transform(), fontsize=7,
            color="grey", ha="right")
    ax.set_xlabel("cut point t_zeta (client owns steps 1..t_zeta)")


def _plot(rows: list[dict], timesteps: int, path: Path, title: str, ylabel: str, series: dict[str, Callable],
          log: bool = False, baselines: dict[str, dict] | None = None, absent: str = "") -> Path:
    """One value per cut and series (``series``: name -> row -> value), the cut axis with GM and ICM marked, and each
    of ``baselines`` (label -> summary row of a run that has no cut, e.g. FedAvg) as a horizontal dash-dot line per
    series in that series' colour; a baseline with no value for any series is named in the corner with ``absent``
    (why it has none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ok(y) -> bool:
        return y is not None and not (isinstance(y, float) and math.isnan(y))

    cuts = [r["cut"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    colors = {}
    for name, get in series.items():
        pts = [(c, y) for c, y in zip(cuts, map(get, rows)) if ok(y)]
        if pts:
            (line,) = ax.plot(*zip(*pts), marker="o", label=name)
            colors[name] = line.get_color()
    for k, (label, row) in enumerate((baselines or {}).items()):
        drawn = False
        for name, get in series.items():
            y = get(row)
            if ok(y):
                ax.axhline(y, color=colors.get(name, "black"), ls="-.", lw=1.2)
                drawn = True
        if drawn:
            ax.plot([], [], color="black", ls="-.", lw=1.2, label=f"{label} (no cut; one line per series)")
        else:
            ax.text(0.99, 0.97 - 0.07 * k, f"{label}: {absent or 'no value'}", transform=ax.transAxes, ha="right",
                    va="top", fontsize=7, color="black")
    mark_baselines(ax, timesteps)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a series can be empty (e.g. no uploads when the only cut is T)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def figure4_grid(runs: dict[int, Path], out: Path, client: int = 0, per_row: int = 8) -> Path | None:
    """For each cut, one row of the server's hand-offs x_cut and one row of final samples (arXiv 2406.14429 Fig. 4).

    Each run's two rows are also kept in the run as ``figure4_client{client}.png``, a small file that travels with
    its committed results, so a report written from results alone (``sweep --report-only``) still has the grid."""
    from PIL import Image

    strips = []
    for cut in sorted(runs):
        strip_path = runs[cut] / f"figure4_client{client}.png"
        files = sorted((runs[cut] / "eval").glob(f"samples_client{client}_n*.safetensors"))
        if files:
            t = load_file(str(max(files, key=lambda p: p.stat().st_mtime)))  # the latest evaluation's samples
            grid(torch.cat([t["x_cut"][:per_row], t["x0"][:per_row]]), ncol=per_row).save(strip_path)
        if strip_path.is_file():
            strips.append(Image.open(strip_path).convert("L"))
    if not strips:
        return None
    canvas = Image.new("L", (max(s.width for s in strips), sum(s.height for s in strips)), 255)
    top = 0
    for strip in strips:
        canvas.paste(strip, (0, top))
        top += strip.height
    path = out / "figure4_grid.png"
    canvas.save(path)
    return path


def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


# What a FedAvg baseline row shows where CollaFuse's disclosure plots have an attack's result.
FEDAVG_DISCLOSURE = ("no image or noised view crosses; the server holds every client's weights every round "
                     "(weight inversion: not attacked here)")


def write_sweep_report(runs: dict[int, Path], out: Path, cfg: Config, command: str,
                       baselines: dict[str, Path] | None = None) -> Path:
    """Tables and plots of one sweep (cut -> evaluated run directory) in ``out``; ``baselines`` (label -> evaluated
    run directory of a run without a cut, e.g. a FedAvg run of the same seed and budget) are added to every table
    and drawn on every plot as horizontal lines."""
    T = cfg.diffusion.timesteps
    evaluations = {cut: json.loads((d / "evaluation.json").read_text()) for cut, d in sorted(runs.items())}
    rows = [summarize(e) for e in evaluations.values()]
    base_rows = {label: summarize(json.loads((d / "evaluation.json").read_text()))
                 for label, d in (baselines or {}).items()}
    verdicts = hypotheses(rows, T)
    clients = sorted(rows[0]["fidelity"])
    first = next(iter(evaluations.values()))
    extractor = first["extractor"]
    n = first["n_samples_per_client"]
    write_text_atomic(out / "metrics.json", json.dumps(
        {"command": command, "timesteps": T, "rows": rows, "hypotheses": verdicts,
         "runs": {str(c): str(d) for c, d in runs.items()}, "baselines": base_rows,
         "baseline_runs": {label: str(d) for label, d in (baselines or {}).items()}}, indent=1, allow_nan=False))

    def per_client(metric: Callable[[dict, str], object]) -> dict[str, Callable]:
        return {c: (lambda r, c=c: metric(r, c)) for c in clients}

    def plot(name: str, title: str, ylabel: str, series: dict[str, Callable], absent: str = "") -> Path:
        return _plot(rows, T, out / name, title, ylabel, series, baselines=base_rows, absent=absent)

    plots = {
        "fidelity_kid.png": plot("fidelity_kid.png",
                                 f"KID vs held-out test images ({n} samples/client, {extractor['name']} features)",
                                 "KID (lower is better)", per_client(lambda r, c: r["fidelity"][c]["kid_test"])),
        "fidelity_fid.png": plot("fidelity_fid.png", "FID vs held-out test images", "FID",
                                 per_client(lambda r, c: r["fidelity"][c]["fid_test"])),
        "disclosure_linkage.png": plot("disclosure_linkage.png", "Linkage attack on the uploads",
                                       "top-1 re-identification",
                                       per_client(lambda r, c: _get(r["disclosure"][c], "linkage_top1")),
                                       FEDAVG_DISCLOSURE),
        "disclosure_psnr.png": plot("disclosure_psnr.png",
                                    "Reconstruction from the uploads (the strongest attack at each cut)",
                                    "PSNR vs the true image (dB)",
                                    per_client(lambda r, c: _get(r["disclosure"][c], "psnr_best")), FEDAVG_DISCLOSURE),
        "compute.png": plot("compute.png", "Client compute (one client, exact FLOPs)", "client share of FLOPs", {
            "training share": lambda r: r["compute"]["client_share_train"],
            "sampling share": lambda r: r["compute"]["client_share_sample"]}),
        "communication.png": plot("communication.png", "Client upload for training (all rounds)",
                                  "bytes per client",
                                  per_client(lambda r, c: r["communication"][c]["uploaded_bytes_training"] or None)),
    }
    grid_path = figure4_grid(runs, out)

    L = [f"# CollaFuse cut-point sweep: {cfg.run.name}", "", f"Command: `{command}`", "",
         f"Cuts {[r['cut'] for r in rows]} of T = {T}; {cfg.data.num_clients} clients, partition "
         f"`{cfg.data.partition}`; training budget per run: {cfg.train.rounds} rounds x (S = {cfg.train.server_steps} "
         f"server + K = {cfg.train.client_steps} client steps), batch {cfg.train.batch_size}. "
         f"Fidelity: {n} samples per client, extractor `{extractor['name']}` "
         f"({_fmt(extractor.get('num_features'))} features"
         + (f", classifier test accuracy {_fmt(extractor.get('test_accuracy'))}" if extractor.get("test_accuracy")
            else "") + ").", "", "## Hypotheses, judged from these numbers", ""]
    for h, text in (("H1", "collaboration beats independent client models (some cut < T has lower KID, every "
                           "client)"),
                    ("H2", "disclosure falls as the cut grows (linkage and the strongest attack's PSNR)"),
                    ("H3", "client compute falls as the cut shrinks (client FLOPs per generated image; training "
                           "FLOPs at a fixed K are flat for cut > 0, see the table)")):
        holds = verdicts[h]["holds"]
        L.append(f"- **{h}** {text}: **{'held' if holds else 'did not hold' if holds is False else 'not testable'}**")
    L += ["", "## Fidelity (KID / FID vs each client's held-out test images)", "",
          "| cut | " + " | ".join(f"{c} KID | {c} FID" for c in clients) + " | all KID |",
          "|---|" + "---|---|" * len(clients) + "---|"]
    for r in rows:
        cells = " | ".join(f"{_fmt(r['fidelity'][c]['kid_test'])} | {_fmt(r['fidelity'][c]['fid_test'])}"
                           for c in clients)
        L.append(f"| {r['cut']} | {cells} | {_fmt(r['overall']['kid_test'])} |")
    for label, r in base_rows.items():
        cells = " | ".join(f"{_fmt(r['fidelity'][c]['kid_test'])} | {_fmt(r['fidelity'][c]['fid_test'])}"
                           for c in clients)
        L.append(f"| {label} | {cells} | {_fmt(r['overall']['kid_test'])} |")
    L += ["", "![](fidelity_kid.png)", "", "![](fidelity_fid.png)", "",
          "## Disclosure (honest-but-curious server; mean over clients)", "",
          "| cut | linkage top-1 | PSNR rescale (dB) | PSNR Tweedie, server model (dB) | SSIM Tweedie | upload MSE "
          "| exact-seed attack: PSNR (dB), recovered |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        ds = [d for d in r["disclosure"].values() if d]
        if not ds:
            L.append(f"| {r['cut']} | nothing crosses | | | | | |")
            continue

        def mean(k, ds=ds):
            vals = [d[k] for d in ds if d[k] is not None]
            return sum(vals) / len(vals) if vals else None

        L.append(f"| {r['cut']} | {_fmt(mean('linkage_top1'))} | {_fmt(mean('psnr_rescale'))} | "
                 f"{_fmt(mean('psnr_tweedie_server'))} | {_fmt(mean('ssim_tweedie_server'))} | "
                 f"{_fmt(mean('proxy_upload_mse'))} | {_exact_seed_cell(ds)} |")
    for label, r in base_rows.items():
        L.append(f"| {label} | {FEDAVG_DISCLOSURE if r['algorithm'] == 'fedavg' else 'see its own report'} "
                 "| | | | | |")
    L += ["", "![](disclosure_linkage.png)", "", "![](disclosure_psnr.png)", "",
          "## Client compute and communication", "",
          "| cut | client training FLOPs | one client's share (training) | client FLOPs / image | client share "
          "(sampling) | client train s (measured) | upload bytes / client | download bytes / client |",
          "|---|---|---|---|---|---|---|---|"]
    for name, r in [*((r["cut"], r) for r in rows), *base_rows.items()]:
        cp = r["compute"]
        up, down = (sum(r["communication"][c][k] or 0 for c in clients) / len(clients)
                    for k in ("uploaded_bytes_training", "downloaded_bytes_training"))
        L.append(f"| {name} | {_fmt(cp['client_train_flops'])} | {_fmt(cp['client_share_train'])} | "
                 f"{_fmt(cp['client_sample_flops_per_image'])} | {_fmt(cp['client_share_sample'])} | "
                 f"{_fmt(cp['client_train_seconds'])} | {_fmt(up)} | {_fmt(down)} |")
    L += ["", "![](compute.png)", "", "![](communication.png)", ""]
    if grid_path is not None:
        L += ["## Hand-offs and samples per cut (client 0; style of arXiv 2406.14429 Fig. 4)", "",
              "Rows in pairs, from the smallest cut: the server's hand-off x_cut, then the client's final images.", "",
              "![](figure4_grid.png)", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(L) + "\n")
    assert all(p.is_file() for p in plots.values())
    return path
