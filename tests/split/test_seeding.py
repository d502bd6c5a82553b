"""Client secrets: the stream derivation against RFC 4231's HMAC-SHA256 vector, the client-side files, and what a
checkpoint restores."""

from __future__ import annotations

import stat

import pytest
import torch

from collafuse.cli import main
from collafuse.split.client import Client
from collafuse.split.runner import Federation
from collafuse.split.seeding import (
    ClientSecret,
    SecretError,
    load_or_create_secret,
    read_secrets_file,
    write_secrets_file,
)
from conftest import fixed_secrets, synthetic_clients, tiny_config


def test_stream_seed_is_hmac_sha256_of_the_names_rfc4231_case_1():
    # RFC 4231, test case 1: key = 0x0b * 20, data = "Hi There",
    # HMAC-SHA256 = b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7. The seed is its first 8
    # bytes read little-endian, shifted to 63 bits.
    seed = ClientSecret(b"\x0b" * 20).seed("Hi There")
    assert seed == int.from_bytes(bytes.fromhex("b0344c61d8db3853"), "little") >> 1
    # names are joined with "/": ("Hi", "There") is another message
    assert ClientSecret(b"\x0b" * 20).seed("Hi", "There") != seed


def test_new_secrets_are_distinct_and_never_printed():
    a, b = ClientSecret.new(), ClientSecret.new()
    assert a != b and len(bytes.fromhex(a.hex())) == 32
    assert a.hex() not in repr(a) and a.hex() not in str(a)
    assert ClientSecret.from_tensor(a.tensor()) == a


@pytest.mark.parametrize("text,match", [
    ("zz", "not a hex string"),
    ("00" * 15, "has 15 bytes"),
    ("", "has 0 bytes"),
])
def test_bad_secrets_get_one_line_errors(text, match):
    with pytest.raises(SecretError, match=match):
        ClientSecret.from_hex(text)


def test_secret_file_is_created_once_with_mode_0600_and_reused(tmp_path):
    path = tmp_path / "state" / "client.secret"
    first = load_or_create_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == first  # a restart reads, never redraws
    assert not list(path.parent.glob("*.tmp"))


def test_secrets_file_round_trip_refuses_overwrite_and_bad_keys(tmp_path):
    path = tmp_path / "secrets.toml"
    written = write_secrets_file(path, 3)
    assert read_secrets_file(path) == written and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(SecretError, match="already exists"):
        write_secrets_file(path, 3)
    bad = tmp_path / "bad.toml"
    bad.write_text('server = "00"\n')
    with pytest.raises(SecretError, match=r"server = \.\.\. is invalid \(allowed: client<N>"):
        read_secrets_file(bad)
    with pytest.raises(SecretError, match="does not exist"):
        read_secrets_file(tmp_path / "missing.toml")


def test_checkpoint_restores_the_secret_and_refuses_a_different_explicit_one():
    cfg = tiny_config()
    data = synthetic_clients(cfg, n=16)
    a = Client(0, data[0], cfg)
    tensors, meta = a.state()
    b = Client(0, data[0], cfg)  # draws its own secret...
    assert not torch.equal(b.upload()[0], a.upload()[0])
    b.load_state(tensors, meta)  # ...until the client's own state replaces it
    assert torch.equal(b.upload()[0], a.upload()[0])
    other = Client(0, data[0], cfg, secret=fixed_secrets(1)[0])
    with pytest.raises(SecretError, match="not the one this checkpoint was trained with"):
        other.load_state(tensors, meta)
    old = {k: v for k, v in tensors.items() if k != "secret"}  # a checkpoint from before client secrets
    with pytest.raises(SecretError, match="holds no client secret"):
        Client(0, data[0], cfg).load_state(old, meta)


def test_federation_refuses_secrets_for_clients_it_does_not_have():
    cfg = tiny_config()
    with pytest.raises(SecretError, match=r"clients \[5\] \(allowed: clients 0..1\)"):
        Federation(cfg, synthetic_clients(cfg, n=8), secrets={5: ClientSecret.new()})


def test_cli_secrets_then_two_runs_with_them_are_identical(tmp_path, capsys):
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_config(train={"rounds": 1}).to_toml())
    secrets = tmp_path / "secrets.toml"
    assert main(["secrets", "--clients", "2", "--out", str(secrets)]) == 0
    assert main(["secrets", "--clients", "2", "--out", str(secrets)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["secrets", "--clients", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--clients = 0 is invalid" in capsys.readouterr().err
    from safetensors.torch import load_file

    runs = []
    for name in ("a", "b", "c"):
        extra = [] if name == "c" else ["--client-secrets", str(secrets)]
        assert main(["run", str(toml), "--out", str(tmp_path / name), "--quiet", *extra]) == 0
        runs.append(load_file(str(tmp_path / name / "checkpoints" / "round_000001" / "client0.safetensors")))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["secret"], runs[2]["secret"])
    report = (tmp_path / "a" / "report.md").read_text()
    assert str(secrets) in report and read_secrets_file(secrets)[0].hex() not in report
    bad = tmp_path / "bad.toml"
    bad.write_text('client0 = "nothex"\n')
    assert main(["run", str(toml), "--out", str(tmp_path / "d"), "--quiet", "--client-secrets", str(bad)]) == 2
    assert "not a hex string" in capsys.readouterr().err
