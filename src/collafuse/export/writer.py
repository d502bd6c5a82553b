"""``collafuse export``: a trained run as a folder diffusers users recognise (layout: `collafuse.export.pipeline`).

Each party exports only what it holds: ``party="server"`` writes the server's model and no client's, ``party=1``
writes client 1's model and no other; ``"all"`` (one machine, the researcher's case) writes every node. The weights
are those the project samples with (the EMA copy when ``sample.use_ema``), cast to nothing: fp32 as trained.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import diffusers
from diffusers import DDPMScheduler

from ..config import ConfigError
from ..split.runner import Federation, load_run
from .pipeline import CONFIG_NAME, CollaFusePipeline


def _parties(fed: Federation, party: str | int) -> tuple[bool, list[int]]:
    n = fed.cfg.data.num_clients
    if party == "all":
        return True, list(range(n))
    if party == "server":
        return True, []
    if isinstance(party, int) or (isinstance(party, str) and party.isdigit()):
        if 0 <= int(party) < n:
            return False, [int(party)]
    raise ConfigError(f"party = {party!r} is invalid (allowed: 'all', 'server' or a client index 0..{n - 1})")


def client_classes(fed: Federation) -> dict[int, list[int]]:
    """The classes each client may ask the server for: those it uploaded (the server's record; before any upload,
    those its data holds), plus ``sample.shared_labels``: the server's own rule (`Server.check_sample_labels`)."""
    shared = set(fed.cfg.sample.shared_labels)
    recorded = fed.server.client_labels or {}
    out = {}
    for c in fed.clients:
        held = recorded.get(c.index) or {int(v) for v in c.data.train_y.unique()}
        out[c.index] = sorted(set(held) | shared)
    return out


def _evaluation(run_dir: Path) -> dict | None:
    path = run_dir / "evaluation.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _command(run_dir: Path) -> str:
    report = run_dir / "report.md"
    if report.is_file():
        for line in report.read_text().splitlines():
            if line.startswith("Command: `"):
                return line[len("Command: `"):].rstrip("`")
    return "(not recorded: the run directory has no report.md)"


def model_card(fed: Federation, run_dir: Path, server: bool, clients: list[int], classes: dict[int, list[int]],
               command: str) -> str:
    """README.md of the export: what it holds, the cut, each client's classes, the run's FID, epsilon and linkage
    figures (from ``evaluation.json`` when the run was evaluated), how to load it and what a client can do alone."""
    cfg = fed.cfg
    ev = _evaluation(run_dir)
    holds = (["the server's model"] if server else []) + [f"client {i}'s model" for i in clients]
    lines = [
        "---", "library_name: diffusers", "tags: [collafuse, split-diffusion, federated-learning]", "---", "",
        f"# CollaFuse federation `{cfg.run.name}`", "",
        f"A collaborative diffusion model (CollaFuse, arXiv 2406.14429) of {cfg.data.num_clients} clients on "
        f"`{cfg.data.dataset}` ({cfg.image_shape[0]}x{cfg.image_shape[1]}x{cfg.image_shape[2]}), trained "
        f"{fed.history.rounds_done} round{'s' if fed.history.rounds_done != 1 else ''}. The server runs the "
        f"denoising steps T = {cfg.diffusion.timesteps} ... t_zeta + 1, each client its own steps t_zeta ... 1.", "",
        f"This export holds {', '.join(holds)}.", "",
        "| client | cut t_zeta | classes | FID (held-out) | KID | epsilon (upload, formal) | linkage top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in fed.clients:
        fid = kid = eps = link = "not evaluated"
        if ev is not None:
            vs = ev["fidelity"]["per_client"].get(c.node_id, {}).get("vs_test") or {}
            fid = f"{vs['fid']:.2f}" if "fid" in vs else fid
            kid = f"{vs['kid_mean']:.4f}" if "kid_mean" in vs else kid
            d = ev.get("disclosure", {}).get(c.node_id, {})
            if "formal" in d:
                eps = f"{d['formal']['epsilon']:.3g} (delta {d['formal']['delta']:.2g})"
            if "linkage" in d.get("results", {}):
                r = d["results"]["linkage"]
                link = f"{r['top1']:.3f} (chance {r['chance']:.2g})"
        lines.append(f"| {c.index} | {cfg.client_cut(c.index)} | {classes[c.index]} | {fid} | {kid} | {eps} | "
                     f"{link} |")
    if ev is None:
        lines += ["", "The run had no `evaluation.json` when it was exported: `collafuse evaluate RUN`, then export "
                  "again, fills the table."]
    else:
        lines += ["", f"Figures from `evaluation.json` ({ev['n_samples_per_client']} samples per client, extractor "
                  f"`{ev['extractor']['name']}`, {ev['checkpoint']})."]
    lines += [
        "", f"Sampler: `{cfg.sample.sampler}`, {cfg.sample.ddim_steps} steps, guidance {cfg.sample.guidance_scale}, "
        f"precision `{cfg.train.precision}`; all of it in `{CONFIG_NAME}`.", "",
        "Made by:", "", f"    {command}", "",
        "## Use", "",
        "```python",
        "import torch",
        "from collafuse.export import CollaFusePipeline",
        "",
        "pipe = CollaFusePipeline.from_pretrained(\"THIS_FOLDER\")",
        f"images = pipe(client={clients[0] if clients else 0}, class_labels=[...], num_inference_steps=25,",
        "              generator=torch.Generator().manual_seed(0)).images  # PIL images",
        "```", "",
        "With the same seed, batch size and settings the images equal `collafuse sample RUN --client I --seed S`.", "",
        "## What a party can do with its own export", "",
        "- The server's export alone holds no client's steps: it can draw hand-offs x_{t_zeta}, not images.",
        "- A client's export alone can only finish hand-offs: `pipe.finish(client, x_cut, class_labels)` takes the "
        "server's x_{t_zeta} to images. It can draw from x_T itself only where its cut is T (it trained alone).",
        "- Neither holds the other's data, nor the client's secret: the noise of the uploads cannot be rebuilt.",
    ]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | Path, out: str | Path, party: str | int = "all", checkpoint: str | None = None
               ) -> dict:
    """Write ``out`` (a new folder) from the run directory's latest checkpoint (or ``checkpoint``).

    Args:
        run_dir (`str` or `Path`): a directory written by ``collafuse run``.
        out (`str` or `Path`): the export folder; must not exist (written beside it, then renamed in one step).
        party (`str` or `int`, defaults to ``"all"``): ``"all"``, ``"server"`` or a client index.
        checkpoint (`str`, *optional*): a kept checkpoint (``round_000025``) instead of the latest.

    Returns:
        `dict`: ``out``, ``bytes`` (the folder's size), ``seconds`` and the components written.
    """
    t0 = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise ConfigError(f"--out = '{out}' exists (allowed: a folder that does not exist yet)")
    fed = load_run(run_dir, checkpoint=checkpoint)
    server, clients = _parties(fed, party)
    cfg = fed.cfg
    classes = client_classes(fed)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        index = {"_class_name": CollaFusePipeline.__name__, "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", "DDPMScheduler"]}
        DDPMScheduler(**fed.server.schedule.scheduler_kwargs).save_pretrained(tmp / "scheduler")
        if server:
            fed.server.learner.sampling_model(cfg.sample.use_ema).save_pretrained(tmp / "server")
            index["server"] = ["diffusers", "UNet2DModel"]
        for i in clients:
            fed.clients[i].learner.sampling_model(cfg.sample.use_ema).save_pretrained(tmp / f"client_{i}")
            index[f"client_{i}"] = ["diffusers", "UNet2DModel"]
        index["client_classes"] = {str(i): classes[i] for i in clients}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / CONFIG_NAME).write_text(cfg.to_toml())
        (tmp / "README.md").write_text(model_card(fed, run_dir, server, clients, classes, _command(run_dir)))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "bytes": size, "seconds": time.perf_counter() - t0,
            "components": [k for k in index if not k.startswith("_") and k != "client_classes"]}
