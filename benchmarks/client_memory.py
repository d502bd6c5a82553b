"""The bytes a config's clients hold for their images: stored as uint8 (issue 30) against the float32 copies every
client held before, read from the loaded tensors themselves.

Usage: ``.venv/bin/python benchmarks/client_memory.py [CONFIG ...]`` (default configs/quality.toml). Each client
converts one training batch at a time (``ClientData.batch``); evaluation converts its images when it reads them.
"""

from __future__ import annotations

import argparse

from collafuse.config import load_config
from collafuse.data.partition import load_client_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=["configs/quality.toml"])
    for path in parser.parse_args().configs:
        cfg = load_config(path, [])
        clients = load_client_datasets(cfg.data, cfg.num_classes, cfg.seeds.data)
        held = [t for c in clients for t in (c.train_images, c.test_images, c.val_images) if t is not None]
        stored, as_float = sum(t.nbytes for t in held), sum(4 * t.numel() for t in held)
        print(f"{path}: {sum(len(c.train_y) for c in clients)} training images in {len(clients)} clients; "
              f"held as {clients[0].train_images.dtype}: {stored / 2**20:.1f} MiB, as float32: "
              f"{as_float / 2**20:.1f} MiB ({as_float / stored:.2f}x)")


if __name__ == "__main__":
    main()
