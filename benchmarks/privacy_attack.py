"""The server as an attacker, measured: what it reconstructs from everything it holds, against the posterior-mean
bound, and what it would have reconstructed when the upload seed was shared.

Two parts, both printed as tables:

1. ``--cuts``: tiny in-process runs (the tests' config, T = 20, i.i.d. uniform images) at each cut. The attacker
   (tests/server_attacker.py) gets the server's files and uploads; the bound is the closed-form posterior mean.
2. ``--run DIR``: a trained run directory (e.g. runs/demo). Each client's real upload is attacked with the
   exact-seed attack, and so is the upload the same images would have had under the old scheme (noise from
   ``generator(3, node id, "upload")``, seeds.upload = 3): max pixel error and PSNR.

    .venv/bin/python benchmarks/privacy_attack.py --cuts 3,6,10 --run runs/demo
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from collafuse.evaluation.disclosure import exact_seed_attack, rescale_reconstruct  # noqa: E402
from collafuse.split.runner import load_run  # noqa: E402
from collafuse.split.seeding import generator  # noqa: E402
from conftest import synthetic_clients, tiny_config  # noqa: E402
from server_attacker import posterior_mean_iid, psnr, reconstructions, restored_server, train_run  # noqa: E402


def tiny_runs(cuts: list[int]) -> None:
    print("| cut | client | posterior-mean bound (dB) | exact seed | rescale | Tweedie, empirical Bayes | "
          "Tweedie, server model | exact seed max error |")
    print("|---|---|---|---|---|---|---|---|")
    for cut in cuts:
        with tempfile.TemporaryDirectory() as d:
            run = Path(d)
            cfg = tiny_config(split={"cut": cut}, train={"rounds": 2})
            data = synthetic_clients(cfg, n=64)
            fed = train_run(run, cfg, data)
            server = restored_server(run)
            abar = float(server.schedule.alpha_bar[cut])
            for c, rec in reconstructions(server, fed.server.uploads).items():
                x0 = data[c].train_x
                bound = psnr(posterior_mean_iid(fed.server.uploads[c][0], abar, torch.linspace(-1, 1, 4001)), x0)
                cells = " | ".join(f"{psnr(rec[k], x0):.2f}" for k in ("exact_seed", "rescale", "tweedie_gaussian",
                                                                       "tweedie_server"))
                err = float((rec["exact_seed"] - x0).abs().max())
                print(f"| {cut} | {c} | {bound:.2f} | {cells} | {err:.2f} |")


def attack_run(run_dir: Path) -> None:
    fed = load_run(run_dir)
    cfg = fed.cfg
    abar = float(fed.server.schedule.alpha_bar[cfg.cut])
    seeds = list(cfg.seeds.model_dump().values())
    print(f"\nrun {run_dir}: cut {cfg.cut}, abar_s = {abar:.4f}, shared seeds {seeds}")
    print("| client | images | upload | exact-seed stream chosen | max error | PSNR (dB) | rescale PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for c in fed.clients:
        x0 = c.data.train_x
        u_now, _ = c.upload()  # what this client sent (restored from its own checkpoint: the same bytes)
        eps_old = torch.randn(x0.shape, generator=generator(3, c.node_id, "upload"))
        u_old = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps_old  # Client.upload before client secrets
        for name, u in (("client secret (now)", u_now), ("shared seed 3 (before)", u_old)):
            x_hat, info = exact_seed_attack(u, abar, c.node_id, seeds)
            err = float((x_hat - x0).abs().max())
            print(f"| {c.index} | {len(x0)} | {name} | `{info['stream']}` | {err:.2e} | {psnr(x_hat, x0):.2f} | "
                  f"{psnr(rescale_reconstruct(u, abar), x0):.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuts", default="3,6,10", help="cuts of the tiny T = 20 runs ('' to skip)")
    p.add_argument("--run", type=Path, help="a trained run directory to attack (e.g. runs/demo)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.cuts:
        tiny_runs([int(c) for c in a.cuts.split(",")])
    if a.run:
        attack_run(a.run)


if __name__ == "__main__":
    main()
