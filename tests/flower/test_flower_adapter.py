"""The Flower adapter without processes: codec, FlowerTransport, ClientNode and run_server over a stand-in Grid
that calls the real ClientApp code in process. Checks equivalence with the in-process runner, node joins, drops,
restarts and hostile replies. Real SuperLink/SuperNode processes are tested in test_flower_e2e.py.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from collafuse.config import config_from_dict  # noqa: E402
from collafuse.data.partition import export_client_folders  # noqa: E402
from collafuse.flower.client_app import handle_content  # noqa: E402
from collafuse.flower.codec import decode, encode  # noqa: E402
from collafuse.flower.task import ClientNode, run_server  # noqa: E402
from collafuse.split.protocol import SERVER, Message, ProtocolError  # noqa: E402
from collafuse.split.runner import Federation  # noqa: E402
from conftest import TINY, fixed_secrets, merge  # noqa: E402


@pytest.fixture(autouse=True)
def _flower_run_identity(monkeypatch):
    """Flower stamps new messages with the run id of the running app; outside one, give it a run id."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class FakeGrid:
    """The Grid calls FlowerTransport makes, answered by ClientNode (the ClientApp's code) in process.

    ``nodes`` maps a Flower node id to its node config; ``down`` holds node ids that do not answer (their messages
    time out); ``hostile`` maps a node id to a function that rewrites its reply content."""

    def __init__(self, run_config: dict, nodes: dict[int, dict]):
        self.run_config = run_config
        self.nodes = dict(nodes)
        self.down: set[int] = set()
        self.hostile: dict[int, callable] = {}
        self.fail_on = None  # (kind, call number) -> raise, as a server crash would
        self.through_sites = False
        self.calls: dict[str, int] = {}
        self.replies: dict[str, SimpleNamespace] = {}

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.down]

    def push_messages(self, messages):
        from collafuse.flower.task import config_from_run_config

        cfg = config_from_run_config(self.run_config)
        ids = []
        for m in messages:
            kind = m.content.config_records["envelope"]["kind"]
            self.calls[kind] = self.calls.get(kind, 0) + 1
            if self.fail_on == (kind, self.calls[kind]):
                raise KeyboardInterrupt("server killed")
            mid = f"m{len(self.replies) + len(ids)}-{id(m)}"
            ids.append(mid)
            dst = m.metadata.dst_node_id
            if dst in self.down or dst not in self.nodes:
                continue  # never answers: the transport times out
            if self.through_sites:  # the deployed path: the ClientApp's handler forwards to a site process
                content = handle_content(m.content, self.run_config, self.nodes[dst], os.getpid())
            else:
                node = ClientNode(cfg, self.nodes[dst], self.run_config["out"])
                reply = node.handle(m.content)
                content = RecordDict() if reply is None else encode(reply)
            if dst in self.hostile:
                content = self.hostile[dst](content, kind)
            self.replies[mid] = SimpleNamespace(
                metadata=SimpleNamespace(src_node_id=dst, reply_to_message_id=mid), content=content,
                has_error=lambda: False)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


@pytest.fixture
def setup(idx_dataset, tmp_path):
    """A tiny config on the IDX fixture, its per-client folders, a run config and two node configs."""
    cfg_dict = merge(TINY, {"data": {"root": str(idx_dataset), "num_clients": 2}})
    cfg = config_from_dict(cfg_dict)
    toml = tmp_path / "tiny.toml"
    toml.write_text(cfg.to_toml())
    folders = export_client_folders(cfg.data, cfg.num_classes, cfg.seeds.data, tmp_path / "sites")
    run_config = {"config": str(toml), "out": str(tmp_path / "server"), "join-timeout": 5, "samples": 3}
    # Each site's explicit secret in a client-side file, so a run over Flower can be compared with an in-process
    # one given the same secrets (Federation(..., secrets=fixed_secrets(2))).
    for i, s in fixed_secrets(2).items():
        (tmp_path / f"secret{i}").write_text(s.hex())
    nodes = {1000 + i: {"client-id": i, "data-dir": str(d), "state-dir": str(tmp_path / f"node{i}"),
                        "secret-file": str(tmp_path / f"secret{i}")} for i, d in enumerate(folders)}
    return SimpleNamespace(cfg=cfg, toml=toml, run_config=run_config, nodes=nodes, tmp=tmp_path)


def _server_weights(out_dir):
    from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint

    nodes, state = load_checkpoint(latest_checkpoint(out_dir / "checkpoints"))
    return nodes[SERVER][0], state


def _straight_run(setup, rounds: int) -> Federation:
    """The in-process reference: the same tiny config and secrets, ``rounds`` rounds, never interrupted."""
    cfg = config_from_dict(merge(TINY, {"data": {"root": setup.cfg.data.root, "num_clients": 2},
                                        "train": {"rounds": rounds}}))
    fed = Federation(cfg, secrets=fixed_secrets(2))
    fed.train(progress=False)
    return fed


# -- codec -----------------------------------------------------------------------------------------------------------
def test_codec_round_trip_is_bit_exact():
    msg = Message("upload", "client1", SERVER, {"x_cut": torch.randn(5, 1, 28, 28), "y": torch.arange(5)},
                  {"round": 3, "cut": 200})
    back = decode(encode(msg))
    assert (back.kind, back.sender, back.receiver, back.meta) == ("upload", "client1", SERVER,
                                                                  {"round": 3, "cut": 200})
    assert all(torch.equal(back.arrays[k], msg.arrays[k]) and back.arrays[k].dtype == msg.arrays[k].dtype
               for k in msg.arrays)


@pytest.mark.parametrize("content,match", [
    (RecordDict(), "expected the records"),
    (RecordDict({"envelope": ConfigRecord({"kind": "upload"}), "arrays": ArrayRecord()}), "string fields"),
    (RecordDict({"envelope": ConfigRecord({"kind": "a", "sender": "b", "receiver": "c", "evil": 1}),
                 "arrays": ArrayRecord()}), "not allowed"),
    (RecordDict({"envelope": ConfigRecord({"kind": "sample_request", "sender": "client0", "receiver": SERVER}),
                 "arrays": ArrayRecord({"y": Array(torch.zeros(2, dtype=torch.float16).numpy())})}), "float16"),
    (RecordDict({"envelope": ConfigRecord({"kind": "a", "sender": "b", "receiver": "c"}),
                 "arrays": ArrayRecord({"x": Array(torch.zeros(2).numpy())})}), "kind 'a' is not allowed"),
])
def test_malformed_flower_content_is_a_protocol_error(content, match):
    with pytest.raises(ProtocolError, match=match):
        decode(content)


# -- equivalence -----------------------------------------------------------------------------------------------------
def test_fedavg_over_the_flower_adapter_equals_fedavg_in_process_bit_for_bit(setup):
    """split.algorithm = "fedavg" through the same Orchestrator, FlowerTransport and ClientApp code: the global weights,
    every client's final weights, EMA and Adam state, and the losses equal the in-process run's, with tolerance 0."""
    from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint

    rc = {**setup.run_config, "set": "train.rounds=2; split.algorithm=fedavg", "samples": 3}
    metrics = run_server(FakeGrid(rc, setup.nodes), rc)
    flower_w, state = _server_weights(setup.tmp / "server")
    cfg = config_from_dict(merge(TINY, {"data": {"root": setup.cfg.data.root, "num_clients": 2},
                                        "train": {"rounds": 2}, "split": {"algorithm": "fedavg"}}))
    fed = Federation(cfg, secrets=fixed_secrets(2))
    fed.train(progress=False)
    local_w, _ = fed.server.state()
    assert flower_w.keys() == local_w.keys() and all(torch.equal(flower_w[k], local_w[k]) for k in local_w)
    assert state["history"]["losses"] == fed.history.to_dict()["losses"]
    for i in range(2):
        nodes, _ = load_checkpoint(latest_checkpoint(setup.tmp / f"node{i}" / "checkpoints"))
        remote, local = nodes[f"client{i}"][0], fed.clients[i].state()[0]
        keys = [k for k in local if k.startswith(("model.", "ema.", "optim."))]
        assert keys and all(torch.equal(remote[k], local[k]) for k in keys)
    # Sampling on the nodes after training: each client makes its images with the final average from its own x_T,
    # the same images as in process; only the order and a count cross.
    assert metrics["samples_finished"] == {"client0": 3, "client1": 3}
    for i in range(2):
        kept = load_file(str(setup.tmp / f"node{i}" / "samples" / "batch_0000.safetensors"))
        assert torch.equal(kept["x0"], fed.clients[i].sample(3, None)["x0"])
    flower_log = [json.loads(line) for line in (setup.tmp / "server" / "message_log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in flower_log} - {"join_request", "join"} == {
        "model_push", "model_update", "train_reply", "sample_order", "sample_done"}
    assert all(not r["arrays"] for r in flower_log if r["kind"].startswith("sample_"))


@pytest.mark.parametrize("rounds", [1, 2])
def test_rounds_over_the_flower_adapter_equal_rounds_in_process(setup, rounds):
    """Same seed, same data: the server weights after N rounds over Flower equal the in-process ones exactly."""
    rc = {**setup.run_config, "set": f"train.rounds={rounds}", "samples": 0}
    run_server(FakeGrid(rc, setup.nodes), rc)
    flower_w, state = _server_weights(setup.tmp / "server")
    cfg = config_from_dict(merge(TINY, {"data": {"root": setup.cfg.data.root, "num_clients": 2},
                                        "train": {"rounds": rounds}}))
    fed = Federation(cfg, secrets=fixed_secrets(2))
    fed.train(progress=False)
    local_w, _ = fed.server.state()
    assert flower_w.keys() == local_w.keys()
    assert all(torch.equal(flower_w[k], local_w[k]) for k in local_w)  # tolerance 0: bit-identical
    assert state["history"]["losses"] == fed.history.to_dict()["losses"]


def test_server_app_trains_samples_and_keeps_images_on_the_clients(setup):
    m = run_server(FakeGrid(setup.run_config, setup.nodes), setup.run_config)
    assert m["rounds_done"] == setup.cfg.train.rounds and m["samples_finished"] == {"client0": 3, "client1": 3}
    for i in range(2):
        assert (setup.tmp / f"node{i}" / "samples" / "batch_0000.png").is_file()
        client_log = [json.loads(x) for x in (setup.tmp / f"node{i}" / "message_log.jsonl").read_text().splitlines()]
        assert {r["kind"] for r in client_log} >= {"join_request", "join", "upload", "train_reply", "sample_done"}
    server_log = [json.loads(x) for x in (setup.tmp / "server" / "message_log.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in server_log}
    assert "sample_done" in kinds and not kinds & {"x0", "eps"}
    assert all(a["name"] in ("x_cut", "y") for r in server_log for a in r["arrays"])


# -- faults ----------------------------------------------------------------------------------------------------------
def test_a_dropped_node_is_skipped_and_rejoins_with_its_state(setup):
    rc = {**setup.run_config, "set": "train.rounds=4", "samples": 0, "reply-timeout": 0.2}
    grid = FakeGrid(rc, setup.nodes)
    calls = {"n": 0}
    orig_push, orig_ids = grid.push_messages, grid.get_node_ids

    def push(messages):
        if any(m.content.config_records["envelope"]["kind"] == "train_request" for m in messages):
            calls["n"] += 1
        return orig_push(messages)

    def node_ids():  # asked at the start of every exchange
        if calls["n"] == 1:
            grid.down = {1001}  # round 2: client1's node is listed but does not answer
        elif calls["n"] == 2:
            grid.down = set()
            grid.nodes.pop(1001, None)  # round 3: it is gone
        elif calls["n"] == 3:
            grid.nodes[2001] = setup.nodes[1001]  # round 4: back, on a new node id, with its state directory
        return orig_ids()

    grid.push_messages, grid.get_node_ids = push, node_ids
    m = run_server(grid, rc)
    assert m["rounds_done"] == 4
    assert [x is None for x in m["history"]["losses"]["client1"]] == [False, True, True, False]
    assert all(x is not None for x in m["history"]["losses"]["client0"])
    node = ClientNode(setup.cfg, setup.nodes[1001], rc["out"])
    assert node.role.rounds_done == 4 and node.role.learner.steps == 2 * setup.cfg.train.client_steps


def test_a_server_crash_resumes_from_the_last_round_and_ends_identical(setup):
    rc = {**setup.run_config, "set": "train.rounds=3", "samples": 0}
    grid = FakeGrid(rc, setup.nodes)
    grid.fail_on = ("train_request", 5)  # killed while sending round 3's second train_request
    with pytest.raises(KeyboardInterrupt):
        run_server(grid, rc)
    _, state = _server_weights(setup.tmp / "server")
    assert state["round"] == 2  # rounds 1-2 kept
    grid.fail_on = None
    m = run_server(grid, rc)
    assert m["resumed"] and m["rounds_done"] == 3
    crashed, _ = _server_weights(setup.tmp / "server")
    straight, _ = _straight_run(setup, 3).server.state()
    assert all(torch.equal(crashed[k], straight[k]) for k in straight)


def test_unknown_and_duplicate_nodes_are_refused(setup, caplog):
    nodes = {**setup.nodes,
             3000: {**setup.nodes[1000], "state-dir": str(setup.tmp / "impostor")},  # claims client0 again
             3001: {**setup.nodes[1001], "client-id": 1, "state-dir": str(setup.tmp / "x")}}
    grid = FakeGrid({**setup.run_config, "samples": 0}, nodes)
    grid.hostile[3001] = lambda content, kind: encode(Message("join", "client7", SERVER)) if kind == "join_request" \
        else content
    m = run_server(grid, {**setup.run_config, "samples": 0})
    assert m["rounds_done"] == setup.cfg.train.rounds
    assert "refused node 3000" in caplog.text and "already connected" in caplog.text
    assert "refused node 3001" in caplog.text and "not a client of this run" in caplog.text


def _hostile_upload(mutate):
    def rewrite(content, kind):
        if kind != "upload_request":
            return content
        msg = decode(content)
        mutate(msg)
        return encode(msg)
    return rewrite


@pytest.mark.parametrize("case,mutate,reason", [
    ("wrong shape", lambda m: m.arrays.update(x_cut=m.arrays["x_cut"][:, :, :8, :8].contiguous()), "image shape"),
    ("wrong dtype", lambda m: m.arrays.update(x_cut=m.arrays["x_cut"].double()), "float64"),
    ("NaN", lambda m: m.arrays["x_cut"].view(-1).__setitem__(0, math.nan), "NaN or Inf"),
    ("Inf", lambda m: m.arrays["x_cut"].view(-1).__setitem__(3, math.inf), "NaN or Inf"),
    ("label out of range", lambda m: m.arrays["y"].fill_(10), "allowed: [0, 9]"),
    ("oversized batch", lambda m: m.arrays.update(x_cut=torch.zeros(200_001, 1, 28, 28),
                                                  y=torch.zeros(200_001, dtype=torch.long)), "allowed: 1 to"),
    ("impersonation", lambda m: setattr(m, "sender", "client0"), "claims to come from"),
])
def test_a_malformed_upload_over_flower_is_refused_and_never_poisons_the_server(setup, case, mutate, reason, caplog):
    rc = {**setup.run_config, "samples": 0, "set": "split.max_upload_images=100000"}
    grid = FakeGrid(rc, setup.nodes)
    grid.hostile[1001] = _hostile_upload(mutate)
    m = run_server(grid, rc)
    assert m["rounds_done"] == setup.cfg.train.rounds  # the run went on
    assert any(reason in e for e in m["events"]), m["events"]
    assert "refused" in caplog.text
    # client1 was told why (an error message reached its node's log) and never contributed an upload.
    client_log = (setup.tmp / "node1" / "message_log.jsonl").read_text()
    assert '"kind": "error"' in client_log
    server_log = [json.loads(x) for x in (setup.tmp / "server" / "message_log.jsonl").read_text().splitlines()]
    assert any(r.get("rejected") for r in server_log)  # the audit log marks the refusal
    from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint

    nodes, _ = load_checkpoint(latest_checkpoint(setup.tmp / "server" / "checkpoints"))
    w, meta = nodes[SERVER]
    assert set(meta["client_labels"]) == {"0"}  # only client0's upload was ever accepted
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def _npy(a) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("held", ["structured", "string"])
def test_npy_bytes_that_are_not_the_declared_float32_are_refused_and_the_run_goes_on(setup, held, caplog):
    """A client1 whose upload declares float32 [B,1,28,28] but whose .npy bytes hold a structured or string array
    (this made decode raise TypeError, which ended the ServerApp run)."""
    import numpy as np

    def rewrite(content, kind):
        if kind != "upload_request":
            return content
        x = content.array_records["arrays"]["x_cut"]
        n = x.shape[0]
        fake = np.zeros(n, dtype=[("a", "<f4"), ("b", "<i4")]) if held == "structured" else np.array(["ab"] * n)
        content.array_records["arrays"]["x_cut"] = Array(dtype="float32", shape=tuple(x.shape), stype=x.stype,
                                                         data=_npy(fake))
        return content

    rc = {**setup.run_config, "samples": 0}
    grid = FakeGrid(rc, setup.nodes)
    grid.hostile[1001] = rewrite
    m = run_server(grid, rc)
    assert m["rounds_done"] == setup.cfg.train.rounds  # the run went on
    assert any("client1 skipped" in e and "hold dtype" in e for e in m["events"]), m["events"]
    server_log = [json.loads(x) for x in (setup.tmp / "server" / "message_log.jsonl").read_text().splitlines()]
    rejected = [r for r in server_log if r.get("rejected")]
    assert rejected and all(r["sender"] == "client1" for r in rejected)
    assert "declared float32" in rejected[0]["rejected"]
    from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint

    nodes, _ = load_checkpoint(latest_checkpoint(setup.tmp / "server" / "checkpoints"))
    assert set(nodes[SERVER][1]["client_labels"]) == {"0"}  # client1's upload never reached the server


def test_any_exception_while_reading_a_reply_is_a_refusal_not_the_end_of_the_run(setup, caplog, monkeypatch):
    """The last line of defence: whatever a reply makes the reading code raise is logged with its traceback and
    treated as a refused reply (here decode itself fails with a RuntimeError on client1's train replies)."""
    import collafuse.flower.transport as ft

    real = ft.decode

    def broken(content):
        msg = real(content)
        if msg.kind == "train_reply" and msg.sender == "client1":
            raise RuntimeError("a bug below decode")
        return msg

    monkeypatch.setattr(ft, "decode", broken)
    rc = {**setup.run_config, "samples": 0}
    m = run_server(FakeGrid(rc, setup.nodes), rc)
    assert m["rounds_done"] == setup.cfg.train.rounds
    assert m["history"]["losses"]["client1"] == [None] * setup.cfg.train.rounds
    assert all(x is not None for x in m["history"]["losses"]["client0"])
    assert "Traceback" in caplog.text and "RuntimeError: a bug below decode" in caplog.text
    server_log = [json.loads(x) for x in (setup.tmp / "server" / "message_log.jsonl").read_text().splitlines()]
    rejected = [r for r in server_log if r.get("rejected")]
    assert len(rejected) == setup.cfg.train.rounds and all("could not be read" in r["rejected"] for r in rejected)


def test_a_node_cannot_sample_under_another_clients_private_labels(setup, caplog):
    grid = FakeGrid(setup.run_config, setup.nodes)

    def foreign(content, kind):
        if kind != "sample_order":
            return content
        msg = decode(content)
        msg.arrays["y"] = torch.full_like(msg.arrays["y"], 9)  # client1's classes are 5-9; client0's are 0-4
        return encode(msg)

    grid.hostile[1000] = foreign
    m = run_server(grid, setup.run_config)
    assert m["samples_finished"] == {"client0": 0, "client1": 3}
    assert any("never uploaded" in e for e in m["events"])


# -- CLI pieces that start no process ---------------------------------------------------------------------------------
def test_flower_pki_makes_a_chain_clients_can_verify(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    from collafuse.cli import main

    assert main(["flower-pki", "--out", str(tmp_path), "--host", "10.0.0.5", "--host", "link.example",
                 "--nodes", "site0,site1"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    ca.public_key().verify(srv.signature, srv.tbs_certificate_bytes, padding.PKCS1v15(), srv.signature_hash_algorithm)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    for n in ("site0", "site1"):
        key = serialization.load_ssh_private_key((tmp_path / "keys" / n).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"  # what Flower accepts
        assert (tmp_path / "keys" / f"{n}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert oct((tmp_path / "keys" / n).stat().st_mode)[-3:] == "600"
    assert main(["flower-pki", "--out", str(tmp_path), "--nodes", "bad name!"]) == 2
    assert "--nodes" in capsys.readouterr().err


def test_export_client_data_gives_each_site_only_its_images(setup):
    from collafuse.data.partition import load_client_datasets, load_client_source

    ref = load_client_datasets(setup.cfg.data, setup.cfg.num_classes, setup.cfg.seeds.data)
    for i, node in enumerate(setup.nodes.values()):
        got = load_client_source(node["data-dir"], i, setup.cfg.data, setup.cfg.num_classes)
        for k in ("train_x", "train_y", "test_x", "test_y"):
            assert torch.equal(getattr(got, k), getattr(ref[i], k))  # bit-identical round trip through uint8 IDX
    assert set(ref[0].train_y.tolist()).isdisjoint(ref[1].train_y.tolist())


def test_flower_commands_reject_bad_input_before_starting_anything(setup, tmp_path, capsys):
    from collafuse.cli import main

    assert main(["flower-sim", str(setup.toml), "--out", str(tmp_path / "x"), "--set", "split.cut=5000"]) == 2
    assert "split.cut = 5000" in capsys.readouterr().err
    assert main(["flower-deploy", str(setup.toml), "--out", str(tmp_path / "y"), "--samples", "-1"]) == 2
    assert "--samples = -1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("node_config,match", [
    ({}, "client-id = None"),
    ({"client-id": 2}, "client-id = 2"),
    ({"client-id": "zero"}, "client-id = 'zero'"),
])
def test_a_node_with_a_bad_node_config_says_which_key(setup, node_config, match):
    from collafuse.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        ClientNode(setup.cfg, node_config, str(setup.tmp / "server"))


# -- privacy over Flower -----------------------------------------------------------------------------------------------
def test_an_attacker_with_everything_the_flower_server_holds_cannot_beat_the_posterior_mean(setup):
    """The attacker of split/test_privacy.py over the Flower adapter: the server's run directory, the run config and
    every message that reached the ServerApp. Each node made its own secret from OS entropy in its state dir."""
    from collafuse.split.seeding import ClientSecret
    from server_attacker import (
        posterior_mean_iid,
        psnr,
        reconstructions,
        restored_server,
        secret_appears_in,
        server_side_files,
    )

    nodes = {n: {k: v for k, v in c.items() if k != "secret-file"} for n, c in setup.nodes.items()}
    rc = {**setup.run_config, "set": "train.rounds=2", "samples": 2}
    grid = FakeGrid(rc, nodes)
    received = []
    pull = grid.pull_messages
    grid.pull_messages = lambda ids: [received.append(r) or r for r in pull(ids)]
    run_server(grid, rc)
    uploads = {}
    for r in received:
        if len(r.content.keys()):
            msg = decode(r.content)
            if msg.kind == "upload":
                uploads[int(msg.sender[6:])] = (msg.arrays["x_cut"], msg.arrays["y"])
    assert sorted(uploads) == [0, 1]
    out = setup.tmp / "server"
    files = server_side_files(out)
    files["run_config"] = json.dumps(rc).encode()
    files.update({f"message{i}": json.dumps(dict(r.content.config_records["envelope"])).encode() +
                  b"".join(a.data for a in r.content.array_records["arrays"].values())
                  for i, r in enumerate(received) if len(r.content.keys())})
    server = restored_server(out)
    abar = float(server.schedule.alpha_bar[setup.cfg.cut])
    support = torch.arange(256) / 127.5 - 1  # the IDX fixture's pixels: uniform over the 256 grey levels
    truth = {c: ClientNode(setup.cfg, nodes[1000 + c], rc["out"]).role for c in (0, 1)}
    for c, rec in reconstructions(server, uploads).items():
        secret_file = setup.tmp / f"node{c}" / "client.secret"
        secret = ClientSecret.from_hex(secret_file.read_text())
        assert oct(secret_file.stat().st_mode & 0o777) == "0o600"
        assert secret_appears_in(files, bytes.fromhex(secret.hex())) == []
        x0 = truth[c].data.train_x
        assert torch.equal(truth[c].upload()[0], uploads[c][0])  # the restored client re-sends the same view
        bound = psnr(posterior_mean_iid(uploads[c][0], abar, support), x0)
        scores = {name: psnr(x, x0) for name, x in rec.items()}
        assert 8 < bound < 30 and max(scores.values()) > bound - 3
        assert all(v <= bound + 0.5 for v in scores.values()), (bound, scores)
        assert float((rec["exact_seed"] - x0).abs().max()) > 0.5


def test_a_failed_clientapps_traceback_is_kept_as_one_plain_bounded_line():
    from collafuse.flower.transport import _short_error

    ray = "Traceback (most recent call last):\n  File \"x.py\", line 1\n\x1b[36m(ClientAppActor pid=7)\x1b[0m " \
          "RuntimeError: " + "boom " * 200 + "\n"
    line = _short_error(ray)
    assert "\n" not in line and "\x1b" not in line and len(line) == 300
    assert line.startswith("(ClientAppActor pid=7) RuntimeError: boom") and line.endswith("...")
    assert _short_error("") == ""


# -- heterogeneous federations: each site's own values in its local config ---------------------------------------------
def _site_config(setup, index: int, text: str) -> None:
    path = setup.tmp / f"site{index}.toml"
    path.write_text(text)
    setup.nodes[1000 + index]["local-config"] = str(path)


def test_a_site_keeps_its_own_cut_and_model_and_the_server_learns_the_cut_from_the_upload(setup):
    _site_config(setup, 1, 'cut = 10\nclient_steps = 1\n[model]\nblock_out_channels = [4, 8]\n')
    rc = {**setup.run_config, "set": "train.rounds=2"}
    m = run_server(FakeGrid(rc, setup.nodes), rc)
    assert m["rounds_done"] == 2 and not m["events"]
    from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint

    nodes, _ = load_checkpoint(latest_checkpoint(setup.tmp / "server" / "checkpoints"))
    assert nodes[SERVER][1]["client_cuts"] == {"0": 6, "1": 10}
    site = ClientNode(setup.cfg, setup.nodes[1001], rc["out"])
    assert site.role.cut == 10 and site.role.learner.steps == 2 * 1
    assert site.role.cfg.client_model.block_out_channels == [4, 8]
    assert m["samples_finished"] == {"client0": 3, "client1": 3}


def test_a_site_outside_the_servers_range_is_dropped_and_the_rest_goes_on(setup):
    _site_config(setup, 1, "cut = 3\n")  # the server accepts [6, 19] (split.cut = 6 is its reference)
    rc = {**setup.run_config, "set": "train.rounds=2", "samples": 0}
    m = run_server(FakeGrid(rc, setup.nodes), rc)
    assert m["rounds_done"] == 2
    assert any("client1 dropped from the federation" in e for e in m["events"])
    assert any("declares cut 3 (allowed: [6, 19]" in e for e in m["events"])
    assert all(x is not None for x in m["history"]["losses"]["client0"])
    assert m["history"]["losses"]["client1"] == [None, None]


@pytest.mark.parametrize("text,match", [
    ("cut = 30\n", r"site1.toml: clients\[1\]\.cut = 30 is invalid \(allowed: an integer step in \[0, 20\]"),
    ("speed = 3\n", r"unknown key 'clients\[1\]\.speed'"),
    ("[model]\nblock_out_channels = [8, 8, 8, 8, 8]\n", r"clients\[1\]\.model\.block_out_channels"),
])
def test_a_bad_local_config_is_one_line(setup, text, match):
    from collafuse.config import ConfigError

    _site_config(setup, 1, text)
    with pytest.raises(ConfigError, match=match):
        ClientNode(setup.cfg, setup.nodes[1001], str(setup.tmp / "server"))


# -- site processes (the deployed ClientApp's long-lived half) -------------------------------------------------------
def _site_nodes(setup, **extra):
    return {n: {**c, "site-process": True, **extra} for n, c in setup.nodes.items()}


def _site_pids(setup) -> dict[int, int]:
    pids = {}
    for n, c in setup.nodes.items():
        for addr in (setup.tmp / f"node{c['client-id']}" / "site").glob("*.addr"):
            pids[n] = json.loads(addr.read_text())["pid"]
    return pids


def _wait_gone(pid: int, seconds: float = 20.0) -> bool:
    import psutil

    try:
        psutil.Process(pid).wait(seconds)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return False
    return True


def test_rounds_through_site_processes_equal_rounds_in_process_and_survive_a_killed_site(setup):
    """The deployed path (ClientApp -> site process) gives the in-process server weights bit for bit and the same
    client images, though each site keeps its node in memory; a site killed with SIGKILL between rounds is replaced
    by a new one that resumes from the node's last save, and the run still ends identical."""
    import signal

    from collafuse.flower.site import stop_site
    from collafuse.split.checkpoint import latest_checkpoint, load_checkpoint

    rc = {**setup.run_config, "set": "train.rounds=3"}
    grid = FakeGrid(rc, _site_nodes(setup))
    grid.through_sites = True
    grid.fail_on = ("train_request", 3)  # the server stops after round 1; the sites keep running
    try:
        with pytest.raises(KeyboardInterrupt):
            run_server(grid, rc)
        first = _site_pids(setup)
        assert len(first) == 2
        os.kill(first[1001], signal.SIGKILL)  # client 1's site dies; its state is on disk
        assert _wait_gone(first[1001])
        grid.fail_on = None
        m = run_server(grid, rc)
        after = _site_pids(setup)
        assert after[1000] == first[1000] and after[1001] != first[1001]  # one site lived on, one was replaced
    finally:
        for c in grid.nodes.values():
            stop_site(rc, c)
    assert all(_wait_gone(p) for p in _site_pids(setup).values())
    assert m["resumed"] and m["rounds_done"] == 3 and m["samples_finished"] == {"client0": 3, "client1": 3}
    flower_w, _ = _server_weights(setup.tmp / "server")
    fed = _straight_run(setup, 3)
    local_w, _ = fed.server.state()
    assert all(torch.equal(flower_w[k], local_w[k]) for k in local_w)
    for i in range(2):  # each client's final model, EMA and Adam state, and the images it kept
        nodes, _ = load_checkpoint(latest_checkpoint(setup.tmp / f"node{i}" / "checkpoints"))
        remote, local = nodes[f"client{i}"][0], fed.clients[i].state()[0]
        keys = [k for k in local if k.startswith(("model.", "ema.", "optim."))]
        assert keys and all(torch.equal(remote[k], local[k]) for k in keys)
        kept = load_file(str(setup.tmp / f"node{i}" / "samples" / "batch_0000.safetensors"))
        assert torch.equal(kept["x0"], fed.clients[i].sample(3, fed.transport)["x0"])


def test_a_site_refuses_a_peer_without_its_authkey_and_exits_with_the_process_it_watches(setup):
    """Only a holder of the node's authkey (0600, in its own state directory) can talk to the site; a wrong key is
    refused and the site serves on. When the watched process (the SuperNode's superexec) ends, the site ends."""
    import stat
    import subprocess
    import sys
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client as Connect

    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    nodes = _site_nodes(setup)
    node = nodes[1000]
    try:
        join = encode(Message("join_request", SERVER, "client0"))
        reply = decode(handle_content(join, setup.run_config, node, watched.pid))
        assert reply.kind == "join" and reply.sender == "client0"
        (addr,) = (setup.tmp / "node0" / "site").glob("*.addr")
        site = json.loads(addr.read_text())
        key_file = setup.tmp / "node0" / "site" / "authkey"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        with pytest.raises(AuthenticationError):
            Connect(("127.0.0.1", site["port"]), family="AF_INET", authkey=b"not the key")
        again = decode(handle_content(join, setup.run_config, node, watched.pid))
        assert again.kind == "join" and json.loads(addr.read_text())["pid"] == site["pid"]  # same site served
    finally:
        watched.kill()
        watched.wait()
    assert _wait_gone(site["pid"], 10.0)


@pytest.mark.parametrize("key,value,match", [
    ("site-process", "maybe", "node config site-process = 'maybe' is invalid \\(allowed: true or false\\)"),
    ("site-idle-timeout", "-1", "node config site-idle-timeout = '-1' is invalid \\(allowed: a number of seconds"),
])
def test_bad_site_settings_are_one_line(setup, key, value, match):
    node = {**setup.nodes[1000], key: value}
    if key != "site-process":
        node["site-process"] = True
    with pytest.raises(ValueError, match=match):
        handle_content(encode(Message("join_request", SERVER, "client0")), setup.run_config, node, os.getpid())


def test_a_site_that_cannot_load_its_node_says_why_in_one_line(setup):
    from collafuse.flower.site import SiteError

    node = {**_site_nodes(setup)[1000], "local-config": str(setup.tmp / "missing.toml")}
    with pytest.raises(SiteError, match="exited with 2 before serving: ConfigError: .*missing.toml"):
        handle_content(encode(Message("join_request", SERVER, "client0")), setup.run_config, node, os.getpid())


class _GatedGrid(FakeGrid):
    """Replies become visible only once ``gate`` is set: the work passed to ``exchange_while`` sets it."""

    def __init__(self, *a, **k):
        import threading

        super().__init__(*a, **k)
        self.gate = threading.Event()

    def pull_messages(self, message_ids):
        return super().pull_messages(message_ids) if self.gate.is_set() else []


@pytest.mark.parametrize("overlap", [True, False])
def test_the_servers_steps_run_while_the_clients_answer(setup, overlap):
    """``exchange_while`` runs the server's work between the push and the collection of the replies: with
    ``overlap``, replies that can only come once the work has run are collected; without it the work waits for
    the replies, which then never come in the timeout (so the work ran after the exchange, as in process)."""
    from collafuse.flower.transport import FlowerTransport
    from collafuse.split.transport import MessageLog

    grid = _GatedGrid(setup.run_config, setup.nodes)
    grid.gate.set()  # joins are answered at once
    transport = FlowerTransport(grid, MessageLog(setup.tmp / "log.jsonl"), 2, reply_timeout=0.5, overlap=overlap)
    assert transport.wait_for_clients(2, 5) == ["client0", "client1"]
    grid.gate.clear()
    order = []

    def work():
        order.append("work")
        grid.gate.set()
        return 42

    deliveries, result = transport.exchange_while(
        [Message("upload_request", SERVER, f"client{i}", meta={"round": 1}) for i in range(2)], work)
    assert result == 42 and order == ["work"]
    if overlap:
        assert all(d.error is None and d.reply.kind == "upload" for d in deliveries)
    else:
        assert all(d.error is not None and "no reply" in d.error for d in deliveries)


def test_an_exception_in_the_overlapped_work_reaches_the_server(setup):
    from collafuse.flower.transport import FlowerTransport
    from collafuse.split.transport import MessageLog

    transport = FlowerTransport(FakeGrid(setup.run_config, setup.nodes), MessageLog(setup.tmp / "log.jsonl"), 2)
    transport.wait_for_clients(2, 5)

    def work():
        raise RuntimeError("server step failed")

    with pytest.raises(RuntimeError, match="server step failed"):
        transport.exchange_while([Message("upload_request", SERVER, "client0", meta={"round": 1})], work)


def test_a_bad_overlap_setting_is_one_line(setup):
    from collafuse.config import ConfigError

    rc = {**setup.run_config, "overlap-server-steps": "sometimes"}
    with pytest.raises(ConfigError, match="run config overlap-server-steps = 'sometimes' is invalid "
                                          "\\(allowed: true or false\\)"):
        run_server(FakeGrid(rc, setup.nodes), rc)
