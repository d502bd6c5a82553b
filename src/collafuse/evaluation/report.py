"""Run outputs: image grids, metrics.json, a loss plot and a Markdown report that embeds them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data.images import save_grid
from ..split.checkpoint import write_text_atomic
from ..split.models import count_params
from ..split.protocol import SERVER
from ..split.runner import Federation


def real_images(fed: Federation, client: int, n: int) -> torch.Tensor:
    """n of the client's own training images with the same class mix as its samples, for side-by-side viewing."""
    c = fed.clients[client]
    rows = []
    labels = c.sample_labels(n)
    for cls, count in zip(*torch.unique(labels, return_counts=True)):
        idx = torch.nonzero(c.data.train_y == cls).flatten()[: int(count)]
        rows.append(c.data.batch(idx))
    return torch.cat(rows)


def write_client_images(fed: Federation, client: int, n: int, out: Path, real: bool = True) -> dict:
    """samples_client{i}.png, cut_client{i}.png (the server's hand-offs), real_client{i}.png, and the tensors."""
    result = fed.sample(client, n)
    ncol = max(1, round(n ** 0.5))
    save_grid(result["x0"], out / f"samples_client{client}.png", ncol)
    save_grid(result["x_cut"], out / f"cut_client{client}.png", ncol)
    if real:
        save_grid(real_images(fed, client, n), out / f"real_client{client}.png", ncol)
    save_file({k: v.contiguous() for k, v in result.items()}, str(out / f"samples_client{client}.safetensors"))
    return result


def plot_losses(history: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    for node, losses in history["losses"].items():
        pts = [(i + 1, v) for i, v in enumerate(losses) if v is not None]
        if pts:
            ax.plot(*zip(*pts), label=node, lw=1.6 if node == SERVER else 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_metrics(fed: Federation, out: Path, sample_seconds: dict[str, float]) -> dict:
    h = fed.history.to_dict()
    final = {node: next((v for v in reversed(ls) if v is not None), None) for node, ls in h["losses"].items()}
    metrics = {
        "config_hash": fed.cfg.identity_hash(),
        "cut": fed.cfg.cut,
        "timesteps": fed.cfg.diffusion.timesteps,
        "rounds": h["rounds_done"],
        "params": {"server": count_params(fed.server.learner.model),
                   "client": count_params(fed.clients[0].learner.model)},
        # each client at its own values ([[clients]]; every client alike otherwise)
        "clients": {c.node_id: {"cut": c.cut, "params": count_params(c.learner.model),
                                "batch_size": c.cfg.train.batch_size, "client_steps": c.cfg.train.client_steps}
                    for c in fed.clients},
        "losses": h["losses"],
        "final_loss": final,
        "train_seconds": h["seconds"],
        "train_seconds_total": sum(h["seconds"].values()),
        # what trained which rounds (a resumed run has a segment per start): device, precision, CPU, threads
        "training_segments": h["segments"],
        "sample_seconds": sample_seconds,
        "message_log": fed.log.summary(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def _machine(seg: dict) -> str:
    """One training segment's machine in words: device (GPU name), CPU, threads, precision."""
    where = f"`{seg['device']}`" + (f" ({seg['gpu']})" if seg.get("gpu") else "")
    flags = ", ".join(seg.get("cpu_flags") or []) or "none of avx2/avx512f/amx"
    return (f"{where}, CPU {seg['cpu']} ({seg['logical_cpus']} logical; {flags}), {seg['torch_threads']} torch "
            f"threads, {seg['precision']}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def write_report(fed: Federation, out: Path, metrics: dict, command: str) -> Path:
    cfg = fed.cfg
    lines = [
        f"# CollaFuse run: {cfg.run.name}",
        "",
        f"Command: `{command}`",
        "",
        f"- cut t_zeta = {cfg.cut} of T = {cfg.diffusion.timesteps} ({cfg.diffusion.schedule} schedule): "
        f"server steps {cfg.cut + 1}..{cfg.diffusion.timesteps}, client steps 1..{cfg.cut}",
        f"- {len(fed.clients)} clients, partition `{cfg.data.partition}`, "
        f"train images per client: {[len(c.data.train_y) for c in fed.clients]}",
        f"- models: server {metrics['params']['server']:,} parameters, client {metrics['params']['client']:,}",
        f"- training: {metrics['rounds']} rounds x (K = {cfg.train.client_steps} client steps, "
        f"S = {cfg.train.server_steps} server steps), batch {cfg.train.batch_size}; "
        f"wall time {metrics['train_seconds_total']:.1f} s on `{cfg.run.device}`",
        *(["- heterogeneous federation: " + "; ".join(
            f"{node} cut {v['cut']}, {v['params']:,} parameters, batch {v['batch_size']}, K = {v['client_steps']}"
            for node, v in metrics["clients"].items()) + f" (the server's reference cut: {fed.server.cut})"]
          if cfg.heterogeneous else []),
        f"- sampling: {cfg.sample.sampler}"
        + (f" ({cfg.sample.ddim_steps} steps, grid anchored on the cut)" if cfg.sample.sampler != "ddpm" else "")
        + f", guidance scale {cfg.sample.guidance_scale}, EMA weights: {cfg.sample.use_ema}",
        *[f"- trained from round {seg['from_round']} on {_machine(seg)}" for seg in metrics["training_segments"]],
        "",
        "## Images",
        "",
        "Left: the client's real training images. Middle: the server's hand-off x_cut (what the server sends back). "
        "Right: the client's final samples, with labels drawn from the client's own class mix.",
        "",
        "| client | real | server hand-off x_cut | samples |",
        "|---|---|---|---|",
    ]
    for c in fed.clients:
        i = c.index
        lines.append(f"| {i} | ![](real_client{i}.png) | ![](cut_client{i}.png) | ![](samples_client{i}.png) |")
    lines += ["", "## Training loss", "", "![](losses.png)", "", "| node | final loss | train seconds |",
              "|---|---|---|"]
    for node, loss in metrics["final_loss"].items():
        shown = "-" if loss is None else f"{loss:.4f}"
        lines.append(f"| {node} | {shown} | {metrics['train_seconds'].get(node, 0.0):.1f} |")
    log = metrics["message_log"]
    lines += ["", "## What crossed (message_log.jsonl)", "",
              f"{log['messages']} messages; client -> server {_mb(log['client_to_server_bytes'])}, "
              f"server -> client {_mb(log['server_to_client_bytes'])} (array payload bytes).", "",
              "| kind | messages | bytes |", "|---|---|---|"]
    for kind, s in log["by_kind"].items():
        lines.append(f"| {kind} | {s['messages']} | {_mb(s['bytes'])} |")
    replayed, resent = log.get("replayed", {}), log.get("resent_uploads", {})
    if replayed.get("messages") or resent.get("messages"):
        lines += ["", "After restarts, apart from the counts above (each round is counted once): "
                  f"{resent['messages']} uploads re-sent with bytes the server already held "
                  f"({_mb(resent['bytes'])}), and {replayed['messages']} messages of rounds a crash cut off and that "
                  f"were done again ({_mb(replayed['bytes'])})."]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
