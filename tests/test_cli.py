"""The CLI end to end on a tiny config: every output file, sampling a trained run, and the error paths."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch

from collafuse.cli import main
from conftest import TINY, kill_9_then_resume, merge

OUTPUTS = ["config.toml", "metrics.json", "message_log.jsonl", "report.md", "losses.png"] + [
    f"{kind}_client{i}.png" for kind in ("samples", "cut", "real") for i in range(2)]


@pytest.fixture
def tiny_toml(tmp_path, idx_dataset) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(merge(TINY, {"data": {"root": str(idx_dataset)}})))
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_run_writes_every_output_then_sample_and_resume(tiny_toml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_toml), "--out", str(out), "--quiet"]) == 0
    assert "report:" in capsys.readouterr().out
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"] == 2 and metrics["cut"] == 6
    assert metrics["message_log"]["by_kind"]["upload"]["messages"] == 2
    assert len(metrics["losses"]["server"]) == 2 and all(v > 0 for v in metrics["losses"]["client0"])
    assert "![](samples_client1.png)" in (out / "report.md").read_text()

    samples = tmp_path / "samples"
    assert main(["sample", str(out), "--client", "1", "--n", "5", "--out", str(samples), "--quiet"]) == 0
    assert (samples / "samples_client1.png").is_file() and (samples / "cut_client1.png").is_file()
    log = [json.loads(line) for line in (samples / "message_log.jsonl").read_text().splitlines()]
    # sample.batch_size = 4: one request/response pair per batch of at most 4 images
    assert [r["kind"] for r in log] == ["sample_request", "sample_response"] * 2
    assert [log[1]["arrays"][0]["shape"], log[3]["arrays"][0]["shape"]] == [[4, 1, 28, 28], [1, 1, 28, 28]]

    # An existing run is not overwritten without --resume; with --resume and more rounds it continues.
    assert main(["run", str(tiny_toml), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", str(tiny_toml), "--out", str(out), "--quiet", "--resume", "--set", "train.rounds=3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["rounds"] == 3


def test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(tiny_toml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_toml), "--out", str(out), "--quiet"]) == 0
    ckpt = out / "checkpoints" / (out / "checkpoints" / "LATEST").read_text().strip() / "server.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    before = _digest(out)
    capsys.readouterr()
    assert main(["run", str(tiny_toml), "--out", str(out), "--quiet", "--resume", "--set", "train.rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint") and "corrupt" in err and "\n" not in err
    assert _digest(out) == before
    assert main(["sample", str(out), "--client", "0", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    # A different cut is a different run: refused rather than mixed.
    ok = tmp_path / "run2"
    assert main(["run", str(tiny_toml), "--out", str(ok), "--quiet"]) == 0
    assert main(["run", str(tiny_toml), "--out", str(ok), "--quiet", "--resume", "--set", "split.cut=3"]) == 2
    assert "different configuration" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--set", "split.cut=21"], "split.cut = 21 is invalid (allowed: an integer step in [0, 20]"),
    (["--set", "sample.sampler=heun"], "sample.sampler = 'heun' is invalid"),
    (["--set", "data.num_clients=11"], "data.num_clients = 11 is invalid"),
    (["--set", "data.root=/nonexistent"], "apt-get install dataset-fashion-mnist"),
])
def test_bad_input_exits_2_with_one_line(tiny_toml, tmp_path, args, needle):
    proc = subprocess.run([sys.executable, "-m", "collafuse", "run", str(tiny_toml), "--out", str(tmp_path / "x"),
                           "--quiet", *args], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr
    assert not (tmp_path / "x").exists()


def test_sample_rejects_bad_client_and_missing_run(tiny_toml, tmp_path, capsys):
    assert main(["sample", str(tmp_path / "nothing"), "--client", "0", "--out", str(tmp_path / "s")]) == 2
    assert "config.toml" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["run", str(tiny_toml), "--out", str(out), "--quiet"]) == 0
    assert main(["sample", str(out), "--client", "7", "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert "--client = 7 is invalid (allowed: 0..1)" in capsys.readouterr().err


def test_kill_9_then_resume_equals_a_straight_run(tiny_toml, tmp_path):
    """A real SIGKILL mid-run: the resumed run ends with exactly the weights of an uninterrupted one."""
    a, b = kill_9_then_resume(tiny_toml, tmp_path)
    for node in a:
        assert a[node].keys() == b[node].keys()
        for k in a[node]:
            assert torch.equal(a[node][k], b[node][k]), f"{node}:{k}"
