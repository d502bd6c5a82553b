"""The server's upload pool: every client's one noised view x_cut (and its labels), from which the server draws its
training batches. In memory (on the server's device), or on disk in the server's own state directory.

On disk, a client's upload is a folder ``DIR/client<k>/`` of shards: ``x_00000.npy`` (float32 [<= shard, C, H, W])
and ``y_00000.npy`` (int64), with ``manifest.json`` (the run's config hash, the client's cut, the image count, and
the sha256 of every shard). A folder is written under a temporary name, fsynced and renamed, so a crash leaves the
old upload or the new one, never a mix. The shards are memory-mapped read-only: a training batch reads only its own
rows, and the resident memory is the pages touched, which the kernel may drop (they are file-backed), not the pool.

After a restart (``reopen``, called when the server restores a checkpoint), every stored upload whose shards all
verify is used again and its client is not asked to upload; one that fails is discarded with a log line and its
client uploads again. A pool is reopened only on a resume: a run that starts from nothing asks every client.

What this changes for privacy: nothing the server learns. It keeps on disk what it already held in memory, the
views that crossed (docs/evaluation.md, threat model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .checkpoint import _fsync_dir, _sha256

logger = logging.getLogger("collafuse.upload_pool")

SHARD_IMAGES = 8192  # images per shard file: 8192 x 3 x 64 x 64 float32 is 400 MB, checked in one read


def upload_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """blake2b-128 over an upload's shapes and bytes (CPU tensors): equal digests, equal uploads."""
    h = hashlib.blake2b(digest_size=16)
    for a in (x, y):
        h.update(f"{a.dtype}:{list(a.shape)};".encode())
        if a.numel():
            h.update(a.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


class StoredUpload:
    """One client's upload on disk: memory-mapped shards, read by row."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.cut = int(manifest["cut"])
        self.n = int(manifest["n"])
        self.shard_images = int(manifest["shard_images"])
        self.x = [np.load(folder / s["x"], mmap_mode="r") for s in manifest["shards"]]
        self.y = torch.from_numpy(np.concatenate([np.load(folder / s["y"]) for s in manifest["shards"]]))

    def rows(self, index: np.ndarray) -> np.ndarray:
        """x_cut of the rows ``index`` (in that order), read from the shards they lie in."""
        out = np.empty((len(index), *self.x[0].shape[1:]), dtype=np.float32)
        shard, row = np.divmod(index, self.shard_images)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.x[int(k)][row[sel]]
        return out

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole upload as CPU tensors, read into memory (for inspection: training reads rows)."""
        return torch.from_numpy(np.concatenate(self.x)), self.y


class UploadPool:
    """The uploads by client index; the server trains on their union, in client order.

    Args:
        directory (`Path`, *optional*): where the uploads are stored (the server's state directory); None keeps
            them in memory on ``device``, as before the pool existed.
        device (`torch.device`): where training batches go.
        identity (`str`): the run's config hash; a stored upload of another configuration is never reused.
        shard_images (`int`, defaults to `SHARD_IMAGES`): images per shard file.
    """

    def __init__(self, directory: Path | None, device: torch.device, identity: str,
                 shard_images: int = SHARD_IMAGES):
        self.directory = None if directory is None else Path(directory)
        self.device = device
        self.identity = identity
        self.shard_images = shard_images
        self._memory: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stored: dict[int, StoredUpload] = {}
        self.cuts: dict[int, int] = {}  # the cut each upload was made at
        self.digests: dict[int, str] = {}  # upload_digest of each, so a re-send is recognised without reading it
        self._cat: tuple[torch.Tensor, ...] | None = None  # in memory: the union, concatenated once

    @property
    def on_disk(self) -> bool:
        return self.directory is not None

    # -- the mapping view: client -> (x_cut, y) ----------------------------------------------------------------------
    def __contains__(self, client: object) -> bool:
        return client in self._memory or client in self._stored

    def __len__(self) -> int:
        return len(self._memory) + len(self._stored)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._memory, *self._stored}))

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        if client in self._memory:
            return self._memory[client]
        return self._stored[client].tensors()

    def keys(self) -> list[int]:
        return list(self)

    def items(self) -> list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
        return [(k, self[k]) for k in self]

    def sizes(self) -> dict[int, int]:
        return {k: (len(self._memory[k][1]) if k in self._memory else self._stored[k].n) for k in self}

    def labels(self, client: int) -> torch.Tensor:
        return self._memory[client][1] if client in self._memory else self._stored[client].y

    def forget(self, client: int) -> None:
        """Drop one client's upload (its stored folder too): it will be asked to upload again."""
        self._memory.pop(client, None)
        stored = self._stored.pop(client, None)
        if stored is not None:
            shutil.rmtree(stored.folder, ignore_errors=True)
        self.cuts.pop(client, None)
        self.digests.pop(client, None)
        self._cat = None

    def clear(self) -> None:
        """Forget every upload (held in this process; stored folders stay for ``reopen``)."""
        self._memory.clear()
        self._stored.clear()
        self.cuts.clear()
        self.digests.clear()
        self._cat = None

    # -- writing ----------------------------------------------------------------------------------------------------
    def put(self, client: int, x_cut: torch.Tensor, y: torch.Tensor, cut: int, digest: str | None = None) -> bool:
        """Keep client ``client``'s upload (replacing an earlier one): in memory, or written atomically to disk.
        Returns False, changing nothing, when it repeats the bytes already held (a re-send after a restart).
        ``digest`` is ``upload_digest(x_cut, y)`` where the caller has it already."""
        x_cut, y = x_cut.detach().cpu().contiguous(), y.detach().cpu().contiguous()
        digest = digest or upload_digest(x_cut, y)
        if self.digests.get(client) == digest and client in self:
            return False
        self.cuts[client] = cut
        self.digests[client] = digest
        self._cat = None
        if not self.on_disk:
            self._memory[client] = (x_cut.to(self.device), y.to(self.device))
            return True
        self._stored.pop(client, None)
        self._stored[client] = self._write(client, x_cut, y, cut, digest)
        return True

    def _write(self, client: int, x: torch.Tensor, y: torch.Tensor, cut: int, digest: str) -> StoredUpload:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"client{client}"
        tmp = self.directory / f".tmp_client{client}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shards = []
        xs, ys = x.numpy(), y.numpy()
        for k, start in enumerate(range(0, len(xs), self.shard_images)):
            entry = {}
            for name, a in (("x", xs), ("y", ys)):
                path = tmp / f"{name}_{k:05d}.npy"
                with path.open("wb") as f:
                    np.save(f, a[start:start + self.shard_images])
                    f.flush()
                    os.fsync(f.fileno())
                entry[name], entry[f"{name}_sha256"] = path.name, _sha256(path)
            shards.append(entry)
        manifest = {"identity": self.identity, "client": client, "cut": cut, "n": len(xs), "digest": digest,
                    "shape": list(xs.shape[1:]), "shard_images": self.shard_images, "shards": shards}
        with (tmp / "manifest.json").open("w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = self.directory / f".old_client{client}_{os.getpid()}"
        if final.exists():
            os.rename(final, old)  # the old upload stays whole until the new one is in place
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        shutil.rmtree(old, ignore_errors=True)
        return StoredUpload(final, manifest)

    # -- reading ----------------------------------------------------------------------------------------------------
    def reopen(self, expected: set[int] | None = None) -> list[int]:
        """Use again every stored upload that verifies (this run's config hash, every shard's sha256); returns the
        clients it found. A failing one is discarded with a log line; its client will be asked to upload again.

        Args:
            expected (`set[int]`, *optional*): the clients of this run; other folders are ignored.
        """
        if not self.on_disk or not self.directory.is_dir():
            return []
        found = []
        for folder in sorted(self.directory.glob("client*")):
            try:
                manifest = json.loads((folder / "manifest.json").read_text())
                client = int(manifest["client"])
                if manifest["identity"] != self.identity:
                    raise ValueError(f"written by configuration {manifest['identity']}, this run is {self.identity}")
                if expected is not None and client not in expected:
                    continue
                for s in manifest["shards"]:
                    for name in ("x", "y"):
                        if _sha256(folder / s[name]) != s[f"{name}_sha256"]:
                            raise ValueError(f"{s[name]} fails its sha256 check")
                stored = StoredUpload(folder, manifest)
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("stored upload %s discarded (%s): its client uploads again", folder, e)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            self._stored[client] = stored
            self.cuts[client] = stored.cut
            self.digests[client] = manifest["digest"]
            self._cat = None
            found.append(client)
        return found

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index`` of the union in client order: (x_cut, y, client, cut); x_cut, y and client on the device,
        cut on the CPU. The same rows, bit for bit, whether the pool is in memory or on disk."""
        if not self._stored:  # all in memory: one gather from the union, concatenated once (as before the pool)
            if self._cat is None:
                keys = list(self)
                self._cat = (torch.cat([self._memory[k][0] for k in keys]),
                             torch.cat([self._memory[k][1] for k in keys]),
                             torch.cat([torch.full((len(self._memory[k][1]),), k, device=self.device) for k in keys]),
                             torch.cat([torch.full((len(self._memory[k][1]),), self.cuts[k]) for k in keys]))
            x, y, c, s = self._cat
            return x[index], y[index], c[index], s[index.cpu()]
        keys = list(self)
        sizes = self.sizes()
        offsets = np.cumsum([0] + [sizes[k] for k in keys])
        idx = index.detach().cpu().numpy()
        owner = np.searchsorted(offsets, idx, side="right") - 1
        x = torch.empty((len(idx), *self._shape()), dtype=torch.float32, device=self.device)
        y = torch.empty(len(idx), dtype=torch.int64, device=self.device)
        for j in np.unique(owner):
            k = keys[int(j)]
            sel = np.nonzero(owner == j)[0]
            rows = idx[sel] - offsets[j]
            sel_t = torch.from_numpy(sel).to(self.device)
            if k in self._memory:
                mx, my = self._memory[k]
                rows_t = torch.from_numpy(rows).to(mx.device)
                x[sel_t], y[sel_t] = mx[rows_t], my[rows_t]
            else:
                stored = self._stored[k]
                x[sel_t] = torch.from_numpy(stored.rows(rows)).to(self.device)
                y[sel_t] = stored.y[torch.from_numpy(rows)].to(self.device)
        client = torch.tensor([keys[int(j)] for j in owner], dtype=torch.int64).to(self.device)
        cut = torch.tensor([self.cuts[keys[int(j)]] for j in owner], dtype=torch.int64)
        return x, y, client, cut

    def total(self) -> int:
        return int(sum(self.sizes().values()))

    def _shape(self) -> tuple[int, ...]:
        k = next(iter(self))
        return tuple(self._memory[k][0].shape[1:]) if k in self._memory else tuple(self._stored[k].x[0].shape[1:])
