"""The summary of a study over data settings (issue 28): when does collaboration pay?

Reads every run's evaluations from the study's results folder (``results/KEY/evaluation*.json``). The study's axes
are a *setting* axis (the first axis of ``study.path`` that is not ``config``: per-client data sizes, unequal
clients, more clients) and the ``config`` axis (cut 0, cut 200, cut 1000, FedAvg, the large model alone, ...).

For every setting, client and configuration it reports, over seeds (Student-t 95% intervals, `seed_summary.interval`):

- FID against the client's held-out images at the last checkpoint, FID against its training images, the copy share
  and the nearest-neighbour ratio (`collafuse.evaluation.memorisation`);
- paired differences FID(config) - FID(alone), seed by seed, for both "alone" settings (the client's small model
  over the whole chain, cut T; and the server's architecture trained alone), judged three ways:
  - *final*: both at their last checkpoint (the same number of rounds);
  - *equal compute*: each curve (FID against total training FLOPs over its evaluated checkpoints) interpolated
    linearly in log FLOPs at the smaller of the two budgets, so neither side wins by having spent more;
  - *best point*: each at its checkpoint of lowest FID against the client's validation images (its training pool
    left out by the data-size cap; never the FID reference set);
  classified "gain" (interval wholly below 0), "loss" (wholly above 0) or "not resolved" (one seed: "one seed");
- the copy-share gap, config minus alone, paired the same way.

Writes ``metrics.json``, ``report.md`` and per client ``fid_vs_n_clientK.png``, and ``fid_vs_flops.png`` for the
smallest data size.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from ..split.checkpoint import write_text_atomic
from .seed_summary import interval

ALONE = {"cut_1000": "alone (small model)", "alone_large": "alone (large model)"}


def _size_of(overrides: list[str]) -> int | None:
    """The uniform per-client size a setting's overrides give (None for a list of sizes or none)."""
    for o in overrides:
        m = re.fullmatch(r"\s*data\.max_train_per_client\s*=\s*(\d+)\s*", o)
        if m:
            return int(m.group(1))
    return None


def _point(ev: dict, client: str) -> dict:
    f = ev["fidelity"]["per_client"][client]
    mem = (ev.get("memorisation") or {}).get(client) or {}
    to = ev["compute"].get("training_to_checkpoint") or {}
    return {"rounds": ev["rounds"], "fid_test": (f.get("vs_test") or {}).get("fid"),
            "fid_train": (f.get("vs_train") or {}).get("fid"), "fid_val": (f.get("vs_val") or {}).get("fid"),
            "copy_share": mem.get("copy_share"), "nn_ratio": mem.get("nn_ratio_median"),
            "flops": to.get("total_flops"), "client_flops": to.get("client_flops"),
            "server_flops": to.get("server_flops")}


def load_runs(study) -> dict:
    """setting -> config -> seed -> {"final": point per client, "curve": [points per client by round]}."""
    axes = [a for a in re.findall(r"{(\w+)}", study.spec.study.path) if a not in ("seed", "config")]
    setting_axis = axes[0] if axes else None
    out: dict = {}
    entries = [(study.results / job.key, job.key, job.seed, job.variants.get(setting_axis, "all") if setting_axis
                else "all", job.variants.get("config", "run")) for job in study.jobs]
    for setting, configs in study.spec.study.report_extra.items():  # committed runs of other studies
        for config, template in configs.items():
            for seed in study.spec.study.seeds:
                path = study.root / template.format(seed=seed)
                entries.append((path, os.path.relpath(path, study.results), seed, setting, config))
    for run, key, seed, setting, config in entries:
        files = sorted(run.glob("evaluation*.json")) if run.is_dir() else []
        # the curve: the last checkpoint and the milestones, all with the study's sampler and extractor
        evs = [json.loads(p.read_text()) for p in files if re.fullmatch(r"evaluation(_r\d+)?\.json", p.name)]
        final = run / "evaluation.json"
        if not final.is_file():
            continue
        final_ev = json.loads(final.read_text())
        clients = sorted(final_ev["fidelity"]["per_client"])
        curve = {c: sorted((_point(e, c) for e in evs), key=lambda p: p["rounds"]) for c in clients}
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        seconds = metrics.get("train_seconds_total")
        out.setdefault(setting, {}).setdefault(config, {})[seed] = {
            "final": {c: _point(final_ev, c) for c in clients}, "curve": curve, "key": key,
            # wall time per round as measured (it depends on the machine and on what shared it: see the README)
            "seconds_per_round": None if not seconds or not metrics.get("rounds") else seconds / metrics["rounds"]}
    return out


def _at_flops(curve: list[dict], flops: float) -> float | None:
    """FID (held-out) at ``flops`` on a curve, linear in log FLOPs between its points; None outside its range."""
    pts = [(p["flops"], p["fid_test"]) for p in curve if p["flops"] and p["fid_test"] is not None]
    if not pts or flops < pts[0][0] * (1 - 1e-9) or flops > pts[-1][0] * (1 + 1e-9):
        return None
    for (f0, y0), (f1, y1) in zip(pts, pts[1:]):
        if f0 <= flops <= f1:
            w = 0.0 if f1 == f0 else (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return y0 + w * (y1 - y0)
    return pts[-1][1] if math.isclose(flops, pts[-1][0], rel_tol=1e-9) else pts[0][1]


def _best(curve: list[dict]) -> dict | None:
    """The point of lowest validation FID (None when the run has no validation images)."""
    pts = [p for p in curve if p["fid_val"] is not None and p["fid_test"] is not None]
    return min(pts, key=lambda p: p["fid_val"]) if pts else None


def paired_difference(a: dict, b: dict, client: str, how: str) -> float | None:
    """FID(a) - FID(b) of one seed, one client: ``how`` in final, equal_compute, best."""
    if how == "final":
        x, y = a["final"][client]["fid_test"], b["final"][client]["fid_test"]
    elif how == "equal_compute":
        ca, cb = a["curve"][client], b["curve"][client]
        budget = min(max((p["flops"] or 0) for p in ca), max((p["flops"] or 0) for p in cb))
        x, y = _at_flops(ca, budget), _at_flops(cb, budget)
    elif how == "best":
        pa, pb = _best(a["curve"][client]), _best(b["curve"][client])
        x, y = (pa or {}).get("fid_test"), (pb or {}).get("fid_test")
    else:
        raise ValueError(f"how = {how!r} is invalid (allowed: final, equal_compute, best)")
    return None if x is None or y is None else x - y


def verdict(iv: dict) -> str:
    if iv["n"] == 0:
        return "-"
    if iv["n"] == 1:
        return "one seed"
    if iv["high"] < 0:
        return "gain"
    if iv["low"] > 0:
        return "loss"
    return "not resolved"


def summarise(runs: dict) -> dict:
    summary: dict = {}
    for setting, configs in runs.items():
        s = summary.setdefault(setting, {"configs": {}, "versus_alone": {}})
        for config, seeds in configs.items():
            clients = sorted(next(iter(seeds.values()))["final"])
            s["configs"][config] = {
                c: {m: interval([seeds[k]["final"][c][m] for k in seeds]) for m in
                    ("fid_test", "fid_train", "fid_val", "copy_share", "nn_ratio")} | {
                    "seeds": sorted(seeds), "runs": [seeds[k]["key"] for k in sorted(seeds)],
                    # seed by seed, not an interval: wall time is the machine's (and whatever shared it), not a
                    # quantity that varies over seeds (the results README says which machine made which run)
                    "seconds_per_round": [seeds[k]["seconds_per_round"] for k in sorted(seeds)]}
                for c in clients}
        for alone in ALONE:
            if alone not in configs:
                continue
            for config, seeds in configs.items():
                if config in ALONE:
                    continue
                common = sorted(set(seeds) & set(configs[alone]))
                if not common:
                    continue
                clients = sorted(seeds[common[0]]["final"])
                entry = {}
                for c in clients:
                    e = {}
                    for how in ("final", "equal_compute", "best"):
                        diffs = [paired_difference(seeds[k], configs[alone][k], c, how) for k in common]
                        iv = interval([d for d in diffs if d is not None])
                        e[how] = iv | {"verdict": verdict(iv), "per_seed": diffs}
                    pairs = [(seeds[k]["final"][c]["copy_share"], configs[alone][k]["final"][c]["copy_share"])
                             for k in common]
                    gaps = [a - b for a, b in pairs if a is not None and b is not None]  # runs made before the measure: none
                    iv = interval(gaps)
                    e["copy_share_gap"] = iv | {"verdict": {"gain": "copies less", "loss": "copies more"}.get(
                        verdict(iv), verdict(iv))}
                    entry[c] = e
                s["versus_alone"].setdefault(alone, {})[config] = entry
    return summary


def recommend(summary: dict, setting: str, client: str) -> dict:
    """The user's answer for one data setting and client: the configuration with the lowest mean held-out FID at
    the last checkpoint, and whether its paired difference against every "alone" setting is a resolved gain.
    ``advice``: "join: CONFIG" (a resolved gain against both alone settings), "stay alone: CONFIG" (an alone setting
    is best and no collaboration gains against it), or "not resolved (best mean: CONFIG)"."""
    s = summary[setting]
    means = {cfg: e[client]["fid_test"]["mean"] for cfg, e in s["configs"].items()
             if client in e and e[client]["fid_test"]["mean"] is not None}
    if not means:
        return {"advice": "-", "config": None}
    best = min(means, key=means.get)
    alone = [a for a in ALONE if a in s["configs"]]
    out = {"config": best, "fid": means[best], "copy_share": s["configs"][best][client]["copy_share"]["mean"],
           "runs": s["configs"][best][client]["runs"]}
    if best in ALONE:
        gains = [s["versus_alone"].get(best, {}).get(cfg, {}).get(client, {}).get("final", {}).get("verdict")
                 for cfg in s["configs"] if cfg not in ALONE]
        out["advice"] = (f"stay alone: {best}" if gains and all(g in ("loss", "not resolved") for g in gains)
                         and any(g == "loss" for g in gains) else f"not resolved (best mean: {best})")
        return out
    versus = {a: s["versus_alone"].get(a, {}).get(best, {}).get(client, {}) for a in alone}
    out["gain_vs_alone"] = {a: v.get("final", {}).get("mean") for a, v in versus.items()}
    if len(alone) < len(ALONE):  # "join" is an answer only against both alternatives a site has
        missing = ", ".join(ALONE[a] for a in ALONE if a not in alone)
        out["advice"] = f"not resolved (best mean: {best}; {missing} not measured)"
        return out
    resolved = all(v.get("final", {}).get("verdict") == "gain" for v in versus.values())
    out["advice"] = f"join: {best}" if resolved else f"not resolved (best mean: {best})"
    return out


def curve_rows(configs: dict) -> list[dict]:
    """The training curves of one setting's runs, a row per run and evaluated checkpoint in round order:
    ``{"config", "seed", "key", "rounds", "flops", "fid_test", "fid_val", "copy_share"}``, the last three a list
    over the clients (sorted by name). ``configs`` is one setting of `load_runs`. Runs with one point only (made
    before the milestones) give no rows: they have no curve."""
    rows = []
    for config, seeds in sorted(configs.items()):
        for seed, run in sorted(seeds.items()):
            curves = [run["curve"][c] for c in sorted(run["curve"])]  # the same evaluation files for every client
            if not curves or len(curves[0]) < 2:
                continue
            for pts in zip(*curves):  # one checkpoint, every client
                rows.append({"config": config, "seed": seed, "key": run["key"], "rounds": pts[0]["rounds"],
                             "flops": pts[0]["flops"], **{m: [p[m] for p in pts]
                                                          for m in ("fid_test", "fid_val", "copy_share")}})
    return rows


def _label(key: str) -> str:
    """A run's link text: its seed folder (``seed_0``), else its key."""
    return next((part for part in key.split("/") if part.startswith("seed_")), key)


def _cell(iv: dict, digits: int = 3) -> str:
    if not iv or iv.get("mean") is None:
        return "-"
    return f"{iv['mean']:.{digits}g}" + ("" if iv["half_width"] is None else f" ± {iv['half_width']:.2g}")


def n_axis(study, settings) -> dict[str, int]:
    """The settings that are points of the FID-against-n plots, with their per-client size n: those with one
    uniform size, except a setting that also changes ``train.rounds`` (item 3's longer training of one n is the
    same n trained longer, not a new point)."""
    sizes = {}
    for setting in settings:
        job = next((j for j in study.jobs if setting in j.variants.values()), None)
        n = _size_of(job.overrides) if job else None
        own = job.overrides[len(study.spec.study.set):] if job else []  # the setting's and its block's overrides
        if n and not any(re.match(r"\s*train\.rounds\s*=", o) for o in own):
            sizes[setting] = n
    return sizes


def _plots(study, runs: dict, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    sizes = n_axis(study, runs)
    paths = []
    clients = sorted({c for s in summary.values() for cfg in s["configs"].values() for c in cfg})
    configs = sorted({cfg for s in summary.values() for cfg in s["configs"]})
    if len(sizes) >= 1:
        for c in clients:
            fig, ax = plt.subplots(figsize=(6, 4))
            for config in configs:
                xs, ys, lo, hi = [], [], [], []
                for setting, n in sorted(sizes.items(), key=lambda kv: kv[1]):
                    iv = summary[setting]["configs"].get(config, {}).get(c, {}).get("fid_test")
                    if iv and iv["mean"] is not None:
                        xs.append(n)
                        ys.append(iv["mean"])
                        lo.append(iv["low"] if iv["low"] is not None else iv["mean"])
                        hi.append(iv["high"] if iv["high"] is not None else iv["mean"])
                if xs:
                    (line,) = ax.plot(xs, ys, marker="o", label=config)
                    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
                    # where joining pays (a resolved gain against the large model alone at equal compute) and
                    # where the model copies (most samples nearer one training image than a third of the next)
                    for setting, n in sizes.items():
                        v = (summary[setting]["versus_alone"].get("alone_large", {}).get(config, {}).get(c, {})
                             .get("equal_compute", {}).get("verdict"))
                        e = summary[setting]["configs"].get(config, {}).get(c)
                        if v == "gain" and e:
                            ax.plot(n, e["fid_test"]["mean"], marker="*", ms=14, color=line.get_color(), ls="")
                        if e and (e["copy_share"]["mean"] or 0) > 0.5:
                            ax.plot(n, e["fid_test"]["mean"], marker="x", ms=11, color="k", ls="")
            ax.set(xscale="log", xlabel="training images per client (n)", ylabel="FID vs held-out (lower is better)",
                   title=f"{c}: FID against n, 95% bands over seeds\n* joining pays (vs large alone, equal "
                         "compute); x copy share > 0.5")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = study.results / f"fid_vs_n_{c}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
        smallest = min(sizes, key=sizes.get)
        fig, axes = plt.subplots(1, len(clients), figsize=(4.2 * len(clients), 3.8), squeeze=False)
        for ax, c in zip(axes[0], clients):
            for config, seeds in sorted(runs[smallest].items()):
                for k, r in sorted(seeds.items()):
                    pts = [(p["flops"], p["fid_test"]) for p in r["curve"][c] if p["flops"] and p["fid_test"]]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=config if k == min(seeds) else None,
                                color=f"C{configs.index(config) % 10}", alpha=0.8)
            ax.set(xscale="log", xlabel="total training FLOPs", ylabel="FID vs held-out", title=f"{c}, {smallest}")
            # about one decade: label 1, 2 and 5 x 10^k only (the default labels every minor tick, overlapping)
            ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:.0e}".replace("e+", "e")))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = study.results / "fid_vs_flops.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_scarce_report(study) -> Path:
    out = study.results
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(study)
    summary = summarise(runs)
    seeds = sorted({k for s in runs.values() for cfg in s.values() for k in cfg})
    answers = {setting: {c: recommend(summary, setting, c) for c in sorted(
        {c for e in summary[setting]["configs"].values() for c in e})} for setting in summary}
    write_text_atomic(out / "metrics.json", json.dumps(
        {"study": study.name, "seeds": seeds, "sizes": {s: _size_of(next((j.overrides for j in study.jobs
                                                                          if s in j.variants.values()), []))
                                                          for s in runs},
         "settings": summary,
         "answers": answers},
        indent=1, allow_nan=False))
    plots = _plots(study, runs, summary) if runs else []
    keys = {r["key"] for s in runs.values() for seeds_ in s.values() for r in seeds_.values()}
    total, own = len(keys), len(keys & {job.key for job in study.jobs})
    lines = [f"# Study {study.name}", "", f"    collafuse study {study.file} --report-only", "",
             f"{own} of the study file's {len(study.jobs)} runs finished"
             + (f", beside {total - own} runs of other studies (`report_extra`)" if total > own else "")
             + f"; seeds {seeds}. FID is against each client's held-out images "
             "(classifier features); mean ± 95% half-interval (Student t) over seeds.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += ["## The user's answer", "",
              "Per data setting and client: the configuration with the lowest mean held-out FID at the last "
              "checkpoint; \"join\" only where its paired difference against both alone settings is a resolved gain "
              "(95% interval wholly below 0).", "",
              "| setting | client | advice | FID | gain vs alone, small / large model | copy share | runs |",
              "|---|---|---|---|---|---|---|"]
    for setting, per_client in answers.items():
        for c, a in per_client.items():
            if a["config"] is None:
                continue
            gains = a.get("gain_vs_alone", {})
            gain = " / ".join("-" if gains.get(k) is None else f"{gains[k]:+.3g}" for k in ALONE)
            links = ", ".join(f"[{_label(k)}]({k}/)" for k in a["runs"])
            copy = "-" if a["copy_share"] is None else f"{a['copy_share']:.2f}"
            lines.append(f"| {setting} | {c} | {a['advice']} | {a['fid']:.3g} | {gain} | {copy} | {links} |")
    lines.append("")
    for setting, s in runs.items():
        summ = summary[setting]
        extra = ([f"Runs of another study (`report_extra`): {', '.join(sorted(study.spec.study.report_extra[setting]))}."
                  " They predate the milestones and the memorisation measure (final point only), and runs of one"
                  " seed made on different machines drew different client secrets: their differences are paired"
                  " by seed number, not by draws.", ""] if setting in study.spec.study.report_extra else [])
        lines += [f"## {setting}", "", *extra, "| config | client | seeds | FID held-out | FID train | copy share | "
                  "NN ratio | s / round, by seed | runs |", "|---|---|---|---|---|---|---|---|---|"]
        for config, per_client in sorted(summ["configs"].items()):
            for c, e in per_client.items():
                links = ", ".join(f"[{_label(k)}]({k}/)" for k in e["runs"])
                lines.append(f"| {config} | {c} | {len(e['seeds'])} | {_cell(e['fid_test'])} | "
                             f"{_cell(e['fid_train'])} | {_cell(e['copy_share'], 2)} | {_cell(e['nn_ratio'], 2)} | "
                             f"{' / '.join('-' if v is None else f'{v:.3g}' for v in e['seconds_per_round'])} | "
                             f"{links} |")
        for alone, versus in summ["versus_alone"].items():
            lines += ["", f"Paired FID(config) - FID({ALONE[alone]}), by seed; verdict from the 95% interval. "
                      "Equal compute interpolates both curves at the smaller of their last budgets; \"-\" there "
                      "means the curves share no budget (one run's first scored point costs more than the other's "
                      "whole run):", "",
                      "| config | client | final | equal compute | best point (validation) | copy-share gap |",
                      "|---|---|---|---|---|---|"]
            for config, per_client in sorted(versus.items()):
                for c, e in per_client.items():
                    lines.append(f"| {config} | {c} | " + " | ".join(
                        f"{_cell(e[h])} ({e[h]['verdict']})" for h in ("final", "equal_compute", "best"))
                        + f" | {_cell(e['copy_share_gap'], 2)} ({e['copy_share_gap']['verdict']}) |")
        rows = curve_rows(s)
        if rows:
            fmt = lambda xs, d: " / ".join("-" if x is None else f"{x:.{d}g}" for x in xs)  # noqa: E731
            lines += ["", "Training curves, run by run (each evaluated checkpoint; FID per client, in client order):",
                      "",
                      "| config | seed | round | training FLOPs | FID held-out | FID validation | copy share |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['config']} | [{r['seed']}]({r['key']}/) | {r['rounds']} | "
                      f"{'-' if r['flops'] is None else format(r['flops'], '.3g')} | {fmt(r['fid_test'], 3)} | "
                      f"{fmt(r['fid_val'], 3)} | {fmt(r['copy_share'], 2)} |" for r in rows]
        lines.append("")
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
