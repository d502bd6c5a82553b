"""The server's upload pool on disk (split.upload_pool = "disk") against the in-memory pool, in one process.

What is measured
----------------
1. CelebA-64 scale: synthetic uploads of ``--images`` (default 200,000) noised views of 3x64x64 float32 from
   ``--clients`` clients (9.8 GB in all), handed to ``Server.handle`` one upload message at a time, as the
   transport delivers them; then ``--steps`` training steps of the configs/celeba64.toml server model reading its
   batches from the stored pool; then a restart: a new server reopens and verifies the stored pool. Reported: the
   server's peak RSS above the baseline (the process after the server model was built and had taken one training
   step on a random batch, so model, Adam, EMA and activations are in the baseline), split into anonymous and
   file-backed pages, the upload, verification and step times. Bar: peak <= 2 GB above the baseline.
   The peak includes the one upload in flight (images / clients x 48 KiB: 983 MB at the defaults): a transport
   holds a message whole, and that is the floor of any pool.
2. The demo's scale: the configs/demo.toml server (3 clients x 5,000 Fashion-MNIST-sized views) takes
   ``--demo-steps`` steps per block from each pool, alternating in ``--blocks`` blocks after a warm-up, the same
   RNG state for both; reported: the median steps/s of each and the ratio disk / memory. Bar: >= 0.95x.

How to run
----------
    .venv/bin/python benchmarks/upload_pool.py                      # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/upload_pool.py --images 20000 --clients 4 --dir /tmp/pool   # a quick look

It needs ``--images`` x 48 KiB of free disk under ``--dir`` (the pool is deleted at the end). It is a measurement,
not a test: it prints the numbers and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from collafuse.config import config_from_dict, load_config
from collafuse.split.protocol import Message
from collafuse.split.server import Server

ROOT = Path(__file__).resolve().parents[1]


def rss() -> dict[str, int]:
    """This process's current and peak resident set (bytes), and the anonymous / file-backed parts."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def celeba_scale(args) -> None:
    cfg = config_from_dict({
        "data": {"dataset": "cifar10", "image_size": 64, "channels": 3, "num_clients": args.clients},
        "diffusion": {"timesteps": 1000, "schedule": "cosine"},
        "split": {"cut": 200, "max_upload_images": args.images},
        "server_model": {"block_out_channels": [64, 128, 256, 256], "norm_num_groups": 32},
        "train": {"batch_size": args.batch, "precision": "fp32"},
        "run": {"threads": args.threads},
    })
    torch.set_num_threads(args.threads)
    state = Path(tempfile.mkdtemp(prefix="collafuse-pool-", dir=args.dir))
    try:
        server = Server(cfg, state_dir=state)
        shape = cfg.image_shape
        g = torch.Generator().manual_seed(0)
        warm = torch.randn((args.batch, *shape), generator=g)
        for _ in range(2):  # the second step allocates what the first did not (Adam's moments, the EMA's shadow)
            server.learner.step(warm, torch.randint(0, 999, (args.batch,)), torch.zeros(args.batch, dtype=torch.int64),
                                torch.randn_like(warm), None)
        gc.collect()
        reset_peak()
        base = rss()
        per_client = args.images // args.clients
        upload_s, upload_peak = 0.0, 0
        for k in range(args.clients):
            x = torch.randn((per_client, *shape), generator=g)  # the message as the transport hands it over
            y = torch.randint(0, 10, (per_client,), generator=g)
            t0 = time.perf_counter()
            server.handle(Message("upload", f"client{k}", "server", {"x_cut": x, "y": y}, {"round": 1, "cut": 200}))
            upload_s += time.perf_counter() - t0
            del x, y
            gc.collect()
            upload_peak = max(upload_peak, rss()["VmHWM"])
        after_uploads = rss()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            server.train_step()
        step_s = (time.perf_counter() - t0) / args.steps
        after = rss()
        del server
        gc.collect()
        t0 = time.perf_counter()
        again = Server(cfg, state_dir=state)
        found = again.uploads.reopen(set(range(args.clients)))
        reopen_s = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in state.rglob("*") if p.is_file())
        print(f"CelebA-64 scale: {args.clients} clients x {per_client:,} views of {shape} float32 = "
              f"{gb(args.images * 4 * shape[0] * shape[1] * shape[2])}; stored pool {gb(disk)} in {state}")
        print(f"  baseline (server model + one step): RSS {gb(base['VmRSS'])}")
        print(f"  peak RSS above the baseline: during the uploads {gb(upload_peak - base['VmRSS'])}, over the whole "
              f"run {gb(after['VmHWM'] - base['VmRSS'])} (bar: <= 2 GB)")
        print(f"  after the uploads: RSS {gb(after_uploads['VmRSS'])} (anonymous {gb(after_uploads['RssAnon'])}, "
              f"file-backed {gb(after_uploads['RssFile'])}); after {args.steps} training steps: RSS "
              f"{gb(after['VmRSS'])} (anonymous {gb(after['RssAnon'])}, file-backed {gb(after['RssFile'])})")
        total = args.images * 4 * shape[0] * shape[1] * shape[2]
        print(f"  checking + storing the uploads (Server.handle): {upload_s:.1f} s ({gb(total / upload_s)}/s); "
              f"a training step (batch {args.batch}) from the stored pool: {step_s:.2f} s; "
              f"restart: reopened and verified {len(found)} clients in {reopen_s:.1f} s")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def demo_scale(args) -> None:
    base = load_config(ROOT / "configs" / "demo.toml", [f"run.threads={args.threads}"])
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    n = base.data.max_train_per_client
    ups = {k: (torch.randn((n, *base.image_shape), generator=g), torch.randint(4 * k, 4 * k + 3, (n,), generator=g))
           for k in range(base.data.num_clients)}
    state = Path(tempfile.mkdtemp(prefix="collafuse-pool-demo-", dir=args.dir))
    servers = {}
    try:
        for name, pool in (("memory", "memory"), ("disk", "disk")):
            cfg = load_config(ROOT / "configs" / "demo.toml", [f"run.threads={args.threads}",
                                                               f"split.upload_pool={pool}"])
            s = Server(cfg, state_dir=state / name)
            for k, (x, y) in ups.items():
                s.receive_upload(k, x, y, 200)
            servers[name] = s
        assert servers["disk"].uploads.on_disk and not servers["memory"].uploads.on_disk
        rates = {name: [] for name in servers}
        for s in servers.values():  # warm-up
            for _ in range(3):
                s.train_step()
        for block in range(args.blocks):
            order = list(servers) if block % 2 == 0 else list(reversed(servers))
            for name in order:
                s = servers[name]
                t0 = time.perf_counter()
                for _ in range(args.demo_steps):
                    s.train_step()
                rates[name].append(args.demo_steps / (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"demo scale ({base.data.num_clients} x {n:,} views of {base.image_shape}, batch "
              f"{base.train.batch_size}, {args.blocks} blocks of {args.demo_steps} steps, alternating): "
              f"memory {med['memory']:.2f} steps/s, disk {med['disk']:.2f} steps/s, disk / memory = "
              f"{med['disk'] / med['memory']:.3f}x (bar: >= 0.95x)")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--steps", type=int, default=2, help="training steps from the CelebA-scale pool")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--demo-steps", type=int, default=10)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p.add_argument("--dir", default=None, help="where the pools are written (default: the system's temp dir)")
    p.add_argument("--skip-celeba", action="store_true")
    args = p.parse_args()
    if not args.skip_celeba:
        celeba_scale(args)
    demo_scale(args)


if __name__ == "__main__":
    main()
