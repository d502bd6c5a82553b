"""``collafuse study --ray ADDRESS`` on a local Ray cluster started on loopback (``ray start --head`` on 127.0.0.1,
stopped after): every run is a Ray task, its small files come back to the driver's results folder (issue 28)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_study import write_study

from collafuse.study import runner
from collafuse.study.spec import load_study

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_cluster(tmp_path):
    """A one-node Ray cluster on 127.0.0.1 (1 CPU, no dashboard), in its own temp folder; stopped after the test."""
    if not RAY.is_file():
        pytest.skip("ray is not installed (it comes with flwr[simulation])")
    port = _free_port()
    temp = Path("/tmp") / f"ray-{os.getpid()}-{port}"  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_IMPORT_WARNING": "1"}
    subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, capture_output=True, timeout=180, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_study_runs_on_a_local_ray_cluster(sweep_toml, tmp_path, ray_cluster):
    file = write_study(tmp_path, sweep_toml, grid=[{"size": ["n0010"], "config": ["cut_0006", "cut_0020"],
                                                    "seeds": [0]}],
                       evaluation=[{"output": "evaluation.json", "set": ["eval.energy_steps=0"]}])
    r = subprocess.run([sys.executable, "-m", "collafuse", "study", str(file), "--ray", ray_cluster, "--threads", "1",
                        "--quiet"], capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 run(s) finished now, 0 pending" in r.stdout
    study = load_study(file)
    assert not runner.pending(study)
    for job in study.jobs:
        assert (tmp_path / "results" / job.key / "evaluation.json").is_file()
    assert (tmp_path / "results/report.md").is_file()
