"""What ``train.tensorboard`` costs per round with grids off: the same rounds trained twice in one process, without
and with the TensorBoard callback (collafuse.evaluation.telemetry), plus the time spent inside the callback itself.

Usage: ``.venv/bin/python benchmarks/tensorboard_overhead.py [CONFIG] [--rounds 4] [--set KEY=VALUE ...]``
(default configs/demo.toml). The bar is <= 2% of the round time. The on/off ratio of two runs carries the machine's
noise; the callback's own share is measured inside one run and is the tighter figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from collafuse.config import load_config
from collafuse.evaluation.telemetry import TrainingTelemetry
from collafuse.split.runner import Federation
from collafuse.split.seeding import ClientSecret


def train(cfg, out: Path, with_telemetry: bool) -> tuple[float, float]:
    secrets = {i: ClientSecret(bytes([i + 1]) * 32) for i in range(cfg.data.num_clients)}
    fed = Federation(cfg, secrets=secrets)
    fed.set_progress(False)
    tel = TrainingTelemetry(fed, out, grid_every=0) if with_telemetry else None
    t0 = time.perf_counter()
    fed.train(None, progress=False, on_round=tel)
    seconds = time.perf_counter() - t0
    if tel is not None:
        tel.close()
    return seconds, (tel.seconds if tel is not None else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/demo.toml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, [f"train.rounds={args.rounds}", *args.overrides])
    with tempfile.TemporaryDirectory() as tmp:
        off, _ = train(cfg, Path(tmp) / "off", False)
        on, inside = train(cfg, Path(tmp) / "on", True)
        files = sum(p.stat().st_size for p in (Path(tmp) / "on").rglob("*") if p.is_file())
    r = args.rounds
    print(f"{args.config}, {r} rounds, torch threads {torch.get_num_threads()}: round time without TensorBoard "
          f"{off / r:.2f} s, with it {on / r:.2f} s (ratio {on / off:.3f}x); inside the callback "
          f"{1000 * inside / r:.1f} ms per round = {100 * inside / on:.3f}% of the round (bar <= 2%); "
          f"event files {files / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
