"""Tiny fixtures: a seconds-long config, synthetic client data, and a tiny Fashion-MNIST-format IDX folder."""

from __future__ import annotations

import copy
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from threads, and a second thread per process makes them crawl whenever the two cores
# are shared (thread oversubscription): one thread everywhere in the tests, subprocesses included.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"

from collafuse.config import Config, config_from_dict  # noqa: E402
from collafuse.data.partition import ClientData  # noqa: E402
from collafuse.split.seeding import ClientSecret  # noqa: E402

TINY = {
    "data": {"num_clients": 2, "max_train_per_client": 48, "max_test_per_client": 16},
    "diffusion": {"timesteps": 20},
    "split": {"cut": 6},
    "server_model": {"block_out_channels": [8, 16], "norm_num_groups": 4, "mid_attention": False},
    "client_model": {"block_out_channels": [8, 16], "norm_num_groups": 4, "mid_attention": False},
    "train": {"rounds": 2, "client_steps": 2, "server_steps": 2, "batch_size": 8},
    "sample": {"ddim_steps": 5, "n_per_client": 4, "batch_size": 4},
}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def tiny_config(**sections) -> Config:
    """The tiny config, with per-section overrides: ``tiny_config(split={"cut": 0})``."""
    return config_from_dict(merge(TINY, sections))


def fixed_secrets(n: int = 3) -> dict[int, ClientSecret]:
    """Explicit client secrets (reproducible runs): tests that compare two runs bit for bit give both the same ones.
    By default every client draws its own from OS entropy, and two runs differ."""
    return {i: ClientSecret(bytes([i + 1]) * 32) for i in range(n)}


def kill_9_then_resume(toml: Path, tmp_path: Path, rounds: int = 12, clients: int = 2) -> tuple[dict, dict]:
    """``collafuse run`` killed with SIGKILL after round 3, then ``--resume``d, and the same run straight: the final
    checkpoint's tensors of both, by node. Both get the same explicit client secrets (by default each run draws its
    own, and two runs differ)."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    def final_state(out: Path) -> dict:
        latest = (out / "checkpoints" / "LATEST").read_text().strip()
        return {name: load_file(str(out / "checkpoints" / latest / f"{name}.safetensors"))
                for name in ("server", *(f"client{i}" for i in range(clients)))}

    secrets = write_secrets(tmp_path / "secrets.toml", clients)
    cmd = [sys.executable, "-m", "collafuse", "run", str(toml), "--quiet", "--set", f"train.rounds={rounds}",
           "--client-secrets", str(secrets)]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        latest = killed / "checkpoints" / "LATEST"
        if latest.exists() and int(latest.read_text().strip()[6:]) >= 3:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = int((killed / "checkpoints" / "LATEST").read_text().strip()[6:])
    assert 3 <= done_before < rounds, "the run should have been killed mid-way"
    assert subprocess.run([*cmd, "--out", str(killed), "--resume"], capture_output=True).returncode == 0
    straight = tmp_path / "straight"
    assert subprocess.run([*cmd, "--out", str(straight)], capture_output=True).returncode == 0
    return final_state(killed), final_state(straight)


def write_secrets(path: Path, n: int = 3) -> Path:
    """``fixed_secrets`` as the client-side TOML file that ``collafuse run --client-secrets`` reads."""
    path.write_text("".join(f'client{i} = "{s.hex()}"\n' for i, s in fixed_secrets(n).items()))
    return path


def synthetic_clients(cfg: Config, n: int = 24, seed: int = 0) -> list[ClientData]:
    """Random images in [-1, 1]; client i holds classes of its class group, so the data is non-IID."""
    g = torch.Generator().manual_seed(seed)
    groups = np.array_split(np.arange(cfg.num_classes), cfg.data.num_clients)
    out = []
    for i, classes in enumerate(groups):
        y = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
        x = torch.rand((n, *cfg.image_shape), generator=g) * 2 - 1
        yt = torch.tensor(classes)[torch.randint(0, len(classes), (n // 2,), generator=g)]
        xt = torch.rand((n // 2, *cfg.image_shape), generator=g) * 2 - 1
        out.append(ClientData(i, x, y, xt, yt))
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (gzip), the format of MNIST / Fashion-MNIST."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_dataset(tmp_path) -> Path:
    """A tiny dataset in the exact Fashion-MNIST layout: 10 classes, 12 train and 4 test images each."""
    rng = np.random.default_rng(0)
    root = tmp_path / "fmnist"
    root.mkdir()
    for split, per_class in (("train", 12), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 256, (len(labels), 28, 28))
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One feature-extractor cache for the session: the classifier is keyed by the sha256 of its data, and every
    tiny IDX folder holds the same images, so it is trained once instead of once per test."""
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture
def sweep_toml(tmp_path, idx_dataset, feature_cache) -> Path:
    """The tiny config on the tiny IDX folder, with an evaluation that takes seconds, as a TOML file."""
    extra = {"data": {"root": str(idx_dataset)},
             "eval": {"n_samples": 8, "n_real": 16, "disclosure_n": 8, "distractors": 40, "averaging_ks": [1, 4],
                      "cache_dir": str(feature_cache), "energy_steps": 1}}
    path = tmp_path / "sweep.toml"
    path.write_text(tomli_w.dumps(merge(TINY, extra)))
    return path
