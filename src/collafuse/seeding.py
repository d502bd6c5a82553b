"""Deterministic, independent random streams derived from a few configured seeds."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(base: int, *names: object) -> int:
    """A 63-bit seed from a base seed and names, e.g. ``derive_seed(seeds.noise, "client0")``.

    Hashing (not ``base + i``) keeps the streams of different nodes and purposes unrelated.
    """
    text = "/".join([str(base), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(base: int, *names: object) -> torch.Generator:
    """A CPU generator: the same stream on every device, so CPU and CUDA runs see the same noise."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(base, *names))
