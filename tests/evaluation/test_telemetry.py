"""train.tensorboard: event files read back with tensorboard's own reader, a resumed run's curves without duplicated
rounds, and telemetry that leaves training's bits alone."""

from __future__ import annotations

import json
import shutil

import pytest
import tomli_w
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from collafuse.cli import main
from conftest import TINY, merge, write_secrets


@pytest.fixture
def tiny_toml(tmp_path, idx_dataset):
    path = tmp_path / "tiny.toml"
    path.write_text(tomli_w.dumps(merge(TINY, {"data": {"root": str(idx_dataset)}, "train": {"rounds": 3}})))
    return path


def _events(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_every_round_logs_losses_lr_time_bytes_and_grids(tiny_toml, tmp_path):
    run = tmp_path / "run"
    assert main(["run", str(tiny_toml), "--out", str(run), "--quiet", "--tensorboard",
                 "--set", "eval.grid_every=2"]) == 0
    acc = _events(run)
    metrics = json.loads((run / "metrics.json").read_text())
    for node in ("server", "client0", "client1"):
        logged = acc.Scalars(f"loss/{node}")
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx(metrics["losses"][node], rel=1e-6)  # float32 in events
        assert [e.step for e in acc.Scalars(f"lr/{node}")] == [1, 2, 3]
    assert all(e.value > 0 for e in acc.Scalars("round/seconds"))
    by_round = [e.value for e in acc.Scalars("round/bytes")]
    uploads = sum(r["bytes"] for r in map(json.loads, (run / "message_log.jsonl").read_text().splitlines())
                  if r["kind"] == "upload")
    assert by_round[0] >= uploads > 0 and by_round[1] < uploads  # the one-time upload is round 1's
    for c in ("client0", "client1"):
        images = acc.Images(f"samples/{c}")
        assert [e.step for e in images] == [2]  # every 2 rounds: round 2 of 3
        # 4 samples (sample.n_per_client) of 28x28 in a 2x2 grid, 2 px padding, upscaled 2x
        assert (images[0].width, images[0].height) == (2 * (2 * 30 + 2), 2 * (2 * 30 + 2))


def test_a_resumed_run_continues_the_same_curves_without_duplicated_rounds(tiny_toml, tmp_path):
    run = tmp_path / "run"
    assert main(["run", str(tiny_toml), "--out", str(run), "--quiet", "--tensorboard"]) == 0
    # A crash after round 3's events but before its checkpoint: the run resumes from round 2 and trains round 3 again.
    shutil.rmtree(run / "checkpoints" / "round_000003")
    (run / "checkpoints" / "LATEST").write_text("round_000002")
    assert main(["run", str(tiny_toml), "--out", str(run), "--quiet", "--tensorboard", "--resume",
                 "--set", "train.rounds=4"]) == 0
    acc = _events(run)
    metrics = json.loads((run / "metrics.json").read_text())
    logged = acc.Scalars("loss/server")
    assert [e.step for e in logged] == [1, 2, 3, 4]
    assert [e.value for e in logged] == pytest.approx(metrics["losses"]["server"], rel=1e-6)
    assert [e.step for e in acc.Scalars("round/seconds")] == [1, 2, 3, 4]


def test_telemetry_and_grids_change_no_bit_of_training_or_sampling(tiny_toml, tmp_path):
    secrets = write_secrets(tmp_path / "secrets.toml", 2)
    plain, logged = tmp_path / "plain", tmp_path / "logged"
    assert main(["run", str(tiny_toml), "--out", str(plain), "--quiet", "--client-secrets", str(secrets)]) == 0
    assert main(["run", str(tiny_toml), "--out", str(logged), "--quiet", "--client-secrets", str(secrets),
                 "--tensorboard", "--set", "eval.grid_every=1"]) == 0
    assert not (plain / "tensorboard").exists() and list((logged / "tensorboard").iterdir())
    a, b = (json.loads((d / "metrics.json").read_text())["losses"] for d in (plain, logged))
    assert a == b
    for i in range(2):
        x, y = (load_file(str(d / f"samples_client{i}.safetensors")) for d in (plain, logged))
        assert all((x[k] == y[k]).all() for k in x)
