"""The upload's formal per-image (epsilon, delta) at each cut: unclipped, clipped to L2 norm C, and over K views.

For a config (default configs/demo.toml: Fashion-MNIST 28x28, cosine schedule, T = 1000) it prints, per cut, abar_s,
the upload's noise std sigma_s = sqrt((1 - abar_s) / abar_s) on the image scale, and epsilon at
delta = 1 / ``--train-images`` from `collafuse.evaluation.accounting` (dp_accounting's PLD accountant): for the raw
images (sensitivity 2 sqrt(d) = 56), for each ``--clip`` C (``split.upload_clip_norm``, sensitivity 2C), and for
``--views`` fresh views per image (``split.fresh_upload_noise`` over K rounds). A table, not a test.

    .venv/bin/python benchmarks/upload_epsilon.py
    .venv/bin/python benchmarks/upload_epsilon.py --cuts 200,500,900 --clip 1,4 --views 150
    .venv/bin/python benchmarks/upload_epsilon.py --config configs/quality.toml --train-images 24000 --norms
"""

from __future__ import annotations

import argparse
from pathlib import Path

from collafuse.config import load_config
from collafuse.evaluation.accounting import upload_privacy
from collafuse.split.diffusion import DiffusionSchedule

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.toml"))
    p.add_argument("--cuts", default="50,100,200,300,500,700,900,950,990,999",
                   help="comma-separated cuts (default: %(default)s)")
    p.add_argument("--clip", default="1,4", help="comma-separated clip norms C (default: %(default)s)")
    p.add_argument("--views", type=int, default=0, help="also K fresh views per image (0: skip; default: 0)")
    p.add_argument("--train-images", type=int, default=5000,
                   help="training images per client, delta = 1 / this (default: %(default)s, the demo's)")
    p.add_argument("--norms", action="store_true",
                   help="also print the clients' image L2 norms, to read the clip norms C against")
    a = p.parse_args()
    cfg = load_config(a.config)
    sched = DiffusionSchedule(cfg.diffusion)
    c, h, w = cfg.image_shape
    d = c * h * w
    clips = [float(x) for x in a.clip.split(",") if x]
    cols = ["eps raw"] + [f"eps C={x:g}" for x in clips] + ([f"eps raw, K={a.views}"] if a.views else [])
    print(f"{a.config}: T = {sched.T}, {cfg.diffusion.schedule} schedule, d = {d}, delta = 1/{a.train_images}")
    print("| cut | abar_s | sigma_s | " + " | ".join(cols) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for cut in (int(x) for x in a.cuts.split(",")):
        abar = float(sched.alpha_bar[cut])
        base = upload_privacy(abar, d, a.train_images)
        cells = [base["epsilon"]] + [upload_privacy(abar, d, a.train_images, clip_norm=x)["epsilon"] for x in clips]
        if a.views:
            cells.append(upload_privacy(abar, d, a.train_images, views=a.views)["epsilon"])
        shown = ["inf" if e is None else f"{e:.3g}" for e in cells]
        print(f"| {cut} | {abar:.3g} | {base['noise_std']:.3g} | " + " | ".join(shown) + " |", flush=True)
    if a.norms:
        import torch

        from collafuse.data.partition import load_client_datasets

        clients = load_client_datasets(cfg.data, cfg.num_classes, cfg.seeds.data)
        norms = torch.cat([cl.train_x.flatten(1).norm(dim=1) for cl in clients])
        q = torch.quantile(norms, torch.tensor([0.05, 0.5, 0.95]))
        print(f"image L2 norms over the clients' {len(norms)} training images (sqrt(d) = {d ** 0.5:.1f}): "
              f"5th / 50th / 95th percentile {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}, max {norms.max():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
