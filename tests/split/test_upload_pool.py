"""The disk-backed upload pool (collafuse.split.upload_pool): the same batches as the in-memory pool, bit for bit;
atomic, checksummed shards; a restarted server reuses a pool that verifies and asks again where one does not."""

from __future__ import annotations

import json

import numpy as np
import torch

from collafuse.split.runner import Federation
from collafuse.split.upload_pool import UploadPool
from conftest import fixed_secrets, synthetic_clients, tiny_config


def _uploads(n_clients=3, sizes=(37, 5, 20), shape=(1, 4, 4)):
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randn((sizes[k], *shape), generator=g), torch.randint(0, 10, (sizes[k],), generator=g))
            for k in range(n_clients)}


def test_disk_batches_equal_the_in_memory_concatenation(tmp_path):
    """Reference: torch.cat of the uploads in client order, indexed directly (what the server did before)."""
    ups = _uploads()
    disk = UploadPool(tmp_path / "pool", torch.device("cpu"), "h", shard_images=8)  # several shards per client
    mem = UploadPool(None, torch.device("cpu"), "h")
    for k in (2, 0, 1):  # arrival order does not matter: the union is in client order
        for pool in (disk, mem):
            pool.put(k, *ups[k], cut=3 + k)
    x_ref = torch.cat([ups[k][0] for k in range(3)])
    y_ref = torch.cat([ups[k][1] for k in range(3)])
    c_ref = torch.cat([torch.full((len(ups[k][1]),), k) for k in range(3)])
    idx = torch.randint(0, len(y_ref), (200,), generator=torch.Generator().manual_seed(1))
    for pool in (disk, mem):
        x, y, c, s = pool.batch(idx)
        assert torch.equal(x, x_ref[idx]) and torch.equal(y, y_ref[idx]) and torch.equal(c, c_ref[idx])
        assert torch.equal(s, c_ref[idx] + 3)
    assert sorted(p.name for p in (tmp_path / "pool" / "client0").iterdir())[:3] == [
        "manifest.json", "x_00000.npy", "x_00001.npy"]
    assert not list((tmp_path / "pool").glob(".tmp*")) and not list((tmp_path / "pool").glob(".old*"))


def test_a_repeated_upload_changes_nothing_and_a_new_one_replaces_atomically(tmp_path):
    ups = _uploads()
    pool = UploadPool(tmp_path, torch.device("cpu"), "h")
    assert pool.put(0, *ups[0], cut=3)
    before = (tmp_path / "client0" / "manifest.json").stat().st_mtime_ns
    assert not pool.put(0, ups[0][0].clone(), ups[0][1].clone(), cut=3)  # the same bytes: not written again
    assert (tmp_path / "client0" / "manifest.json").stat().st_mtime_ns == before
    assert pool.put(0, ups[0][0] + 1, ups[0][1], cut=3)
    assert torch.equal(pool[0][0], ups[0][0] + 1)


def test_reopen_reuses_what_verifies_and_discards_the_rest(tmp_path, caplog):
    ups = _uploads()
    pool = UploadPool(tmp_path, torch.device("cpu"), "h", shard_images=16)
    for k in range(3):
        pool.put(k, *ups[k], cut=3)
    shard = tmp_path / "client0" / "x_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one flipped bit in client0's second shard
    shard.write_bytes(bytes(data))
    manifest = tmp_path / "client2" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "identity": "other"}))  # another configuration's upload
    (tmp_path / ".tmp_client1_999").mkdir()  # a crash mid-write: never read
    again = UploadPool(tmp_path, torch.device("cpu"), "h")
    assert again.reopen({0, 1, 2}) == [1]
    assert torch.equal(again[1][0], ups[1][0]) and torch.equal(again[1][1], ups[1][1])
    assert "sha256" in caplog.text and "configuration other" in caplog.text
    assert not (tmp_path / "client0").exists()


def test_a_restarted_server_trains_on_its_stored_pool_bit_for_bit(tmp_path):
    """A federation restored from its checkpoint with the stored pool asks no client to upload, and its next
    rounds equal those of the uninterrupted federation with the uploads in memory."""
    cfg = tiny_config(train={"rounds": 4})
    data = synthetic_clients(cfg)
    straight = Federation(tiny_config(train={"rounds": 4}, split={"cut": 6, "upload_pool": "memory"}), data,
                          secrets=fixed_secrets(2), server_dir=tmp_path / "unused")
    straight.train(progress=False)
    assert not (tmp_path / "unused").exists()
    first = Federation(cfg, data, secrets=fixed_secrets(2), server_dir=tmp_path / "s")
    for r in (1, 2):
        first.run_round(r)
    first.save(tmp_path / "ckpt")  # and the server stops here
    resumed = Federation(cfg, data, secrets=fixed_secrets(2), server_dir=tmp_path / "s")
    assert resumed.restore(tmp_path / "ckpt") and set(resumed.server.uploads) == {0, 1}
    resumed.train(progress=False)
    assert not [r for r in resumed.log.records if r["kind"] in ("upload_request", "upload")]
    for a, b in zip(straight.server.learner.model.parameters(), resumed.server.learner.model.parameters()):
        assert torch.equal(a, b)


def test_the_stored_shards_are_the_uploaded_bytes(tmp_path):
    """Read back with numpy alone: the pool stores exactly what crossed."""
    ups = _uploads()
    pool = UploadPool(tmp_path, torch.device("cpu"), "h", shard_images=16)
    pool.put(0, *ups[0], cut=3)
    m = json.loads((tmp_path / "client0" / "manifest.json").read_text())
    x = np.concatenate([np.load(tmp_path / "client0" / s["x"]) for s in m["shards"]])
    assert np.array_equal(x, ups[0][0].numpy()) and m["n"] == 37 and m["cut"] == 3
