"""The server as an attacker, for the privacy tests (split/test_privacy.py in process, flower/test_flower_adapter.py
over Flower).

It is given everything the server process holds or can derive: its run directory (config.toml, its own
checkpoint files, state.json, the message log, metrics), the shared run config, and the uploads it received. It
is not given what lives on the clients (their checkpoint files, state directories, secrets files).

The yardstick is independent of the code under test: for images whose pixels are i.i.d. with a known prior on a
finite support, the posterior mean E[x0 | u] has a closed form (a weighted average over the support), and no
estimator of x0 from u has a smaller expected squared error. An attack that beats that bound by more than the
sampling slack has information beyond the one noised view: a secret leaked.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.evaluation.disclosure import (
    exact_seed_attack,
    gaussian_eps_fn,
    gaussian_prior_from_uploads,
    rescale_reconstruct,
    server_eps_fn,
    tweedie_reconstruct,
)
from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint, write_text_atomic
from collafuse.split.protocol import SERVER
from collafuse.split.runner import Federation
from collafuse.split.server import Server
from collafuse.split.transport import MessageLog


def train_run(run_dir: Path, cfg, data) -> Federation:
    """An in-process run written like ``collafuse run`` does (config.toml, message log, per-round checkpoints)."""
    fed = Federation(cfg, data, log=MessageLog(Path(run_dir) / "message_log.jsonl"))
    write_text_atomic(Path(run_dir) / "config.toml", cfg.to_toml())
    fed.train(Path(run_dir) / "checkpoints", progress=False)
    return fed


def server_side_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory that the server holds: all of it except the clients' own state (their
    checkpoint files in process, ``nodes/`` state directories in a Flower simulation)."""
    out = {}
    for p in sorted(Path(run_dir).rglob("*")):
        rel = p.relative_to(run_dir)
        client_side = rel.parts[0] == "nodes" or (rel.parts[0] == "checkpoints" and p.name.startswith("client"))
        if p.is_file() and not client_side:
            out[str(rel)] = p.read_bytes()
    return out


def restored_server(run_dir: Path) -> Server:
    """The server rebuilt from its own files: the shared config and its checkpoint."""
    cfg = load_config(Path(run_dir) / "config.toml")
    nodes, _ = load_checkpoint(latest_checkpoint(Path(run_dir) / "checkpoints"))
    server = Server(cfg)
    server.load_state(*nodes[SERVER])
    return server


def reconstructions(server: Server, uploads: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, dict]:
    """Every attack the server can run on each client's upload: name -> reconstruction of x0 ([N, C, H, W])."""
    cfg = server.cfg
    abar = float(server.schedule.alpha_bar[cfg.cut])
    seeds = list(cfg.seeds.model_dump().values())
    out = {}
    for c, (u, y) in uploads.items():
        u = u.float().cpu()
        mu, var = gaussian_prior_from_uploads(u, abar)
        out[c] = {
            "exact_seed": exact_seed_attack(u, abar, f"client{c}", seeds)[0],
            "rescale": rescale_reconstruct(u, abar),
            "tweedie_gaussian": tweedie_reconstruct(u, abar, gaussian_eps_fn(abar, mu, var)),
            "tweedie_server": tweedie_reconstruct(u, abar, server_eps_fn(server, c), y),
        }
    return out


def posterior_mean_iid(u: torch.Tensor, abar: float, support: torch.Tensor) -> torch.Tensor:
    """E[x0 | u] for u = sqrt(abar) x0 + sqrt(1 - abar) eps with pixels i.i.d. uniform on ``support``:
    sum_k x_k N(u; sqrt(abar) x_k, 1 - abar) / sum_k N(u; sqrt(abar) x_k, 1 - abar), per pixel."""
    s = support.double()
    logw = -(u.double().unsqueeze(-1) - math.sqrt(abar) * s) ** 2 / (2 * (1 - abar))
    return (torch.softmax(logw, dim=-1) * s).sum(-1).float()


def psnr(x_hat: torch.Tensor, x0: torch.Tensor) -> float:
    """Mean over images of 10 log10(range^2 / MSE), range 2 (images in [-1, 1]); written out, not a library call."""
    mse = ((x_hat.double() - x0.double()) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-20))).mean())


def secret_appears_in(files: dict[str, bytes], secret_bytes: bytes) -> list[str]:
    """Files holding the secret, raw or as hex."""
    needles = (secret_bytes, secret_bytes.hex().encode())
    return [name for name, data in files.items() if any(n in data for n in needles)]
