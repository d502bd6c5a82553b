"""Atomic, verifiable per-round checkpoints.

Layout: ``DIR/round_000012/{server,client0,...}.safetensors`` plus ``state.json`` (round, config hash, history,
sha256 of every node file), and ``DIR/LATEST`` naming the newest complete round. A round directory is written
under a temporary name, fsynced and renamed; LATEST is replaced atomically after that. A crash at any point leaves
the previous checkpoint intact and LATEST pointing at it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

NodeState = tuple[dict[str, torch.Tensor], dict]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or belongs to another configuration."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never a partial one.

    ``mode`` (e.g. 0o600 for a secret) is set on the temporary file before any byte is written."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    if mode is not None:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask and ignored for an existing file
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(ckpt_dir: Path, round_: int, nodes: dict[str, NodeState], run_state: dict, keep: int = 2,
                    keep_rounds: tuple[int, ...] | list[int] = ()) -> Path:
    """Write the state of every node and the run for a completed round; keep the newest ``keep`` rounds and every
    round in ``keep_rounds`` (milestones that are evaluated later, ``train.keep_rounds``)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"round_{round_:06d}"
    tmp = ckpt_dir / f".tmp_round_{round_:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for name, (tensors, meta) in nodes.items():
        path = tmp / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[name] = _sha256(path)
    state = {"round": round_, "files": files, **run_state}
    with (tmp / "state.json").open("w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # left by a crash between this rename and the LATEST update of an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    write_text_atomic(ckpt_dir / "LATEST", final.name + "\n")
    milestones = {f"round_{r:06d}" for r in keep_rounds}
    rounds = sorted(p for p in ckpt_dir.glob("round_*") if p.is_dir() and p.name not in milestones)
    for old in rounds[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def named_checkpoint(ckpt_dir: Path, name: str | None = None) -> Path | None:
    """The checkpoint ``name`` (``round_000025`` or just ``25``) under ``ckpt_dir``; the latest when ``name`` is None.
    Raises ``CheckpointError`` naming the checkpoints there when it does not exist."""
    if name is None:
        return latest_checkpoint(ckpt_dir)
    text = str(name).strip()
    path = ckpt_dir / (f"round_{int(text):06d}" if text.isdigit() else text)
    if not (path / "state.json").is_file():
        have = sorted(p.name for p in ckpt_dir.glob("round_*") if p.is_dir())
        raise CheckpointError(f"checkpoint = {name!r} is invalid (allowed: one of {', '.join(have) or 'none'} under "
                              f"{ckpt_dir}; keep more with train.keep_rounds)")
    return path


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint directory, or None when there is none."""
    pointer = ckpt_dir / "LATEST"
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist: the checkpoint is corrupt")
    return path


def load_checkpoint(path: Path, expected_hash: str | None = None) -> tuple[dict[str, NodeState], dict]:
    """Read and verify a checkpoint directory. Raises ``CheckpointError`` with the reason; writes nothing."""
    try:
        state = json.loads((path / "state.json").read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: cannot read state.json ({e})") from None
    if expected_hash is not None and state.get("config_hash") != expected_hash:
        raise CheckpointError(
            f"checkpoint {path} was written by a different configuration (hash {state.get('config_hash')}, "
            f"this config {expected_hash}); data, diffusion, split, model and seed settings must match to resume"
        )
    nodes = {}
    for name, digest in files.items():
        file = path / f"{name}.safetensors"
        if not file.is_file() or _sha256(file) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {file.name} is missing or fails its sha256 check")
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = json.loads(f.metadata()["meta"])
            nodes[name] = (load_file(str(file)), meta)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {file.name} ({e})") from None
    return nodes, state
