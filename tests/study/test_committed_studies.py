"""The committed studies are study files: every committed run counts as done, and the three-seed sweep's summary
rebuilt with ``--report-only`` from the committed small files is the committed summary, byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from collafuse.cli import main

REPO = Path(__file__).resolve().parents[2]
SEEDS = REPO / "results/fashion-mnist-seeds"


@pytest.mark.skipif(not (SEEDS / "report.md").is_file(), reason="the committed sweep is not in this tree")
def test_the_seed_sweep_report_is_rebuilt_byte_for_byte(tmp_path, monkeypatch, capsys):
    for rel in ("configs/quality.toml", "studies/fashion-mnist-seeds.toml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    shutil.copytree(SEEDS, tmp_path / "results/fashion-mnist-seeds")
    monkeypatch.chdir(tmp_path)
    assert main(["study", "studies/fashion-mnist-seeds.toml", "--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 33 and all(line.startswith("done") for line in listing)  # 30 cut runs + 3 FedAvg
    assert main(["study", "studies/fashion-mnist-seeds.toml", "--report-only"]) == 0
    rebuilt = tmp_path / "results/fashion-mnist-seeds"
    names = ["report.md", "metrics.json", "COMMAND", "fidelity_fid.png",
             *(f"seed_{s}/{f}" for s in (0, 1, 2) for f in ("report.md", "metrics.json"))]
    for name in names:
        assert (rebuilt / name).read_bytes() == (SEEDS / name).read_bytes(), name


@pytest.mark.parametrize("name", ["fashion-mnist-seeds-ddpm", "fashion-mnist-clip-1", "fashion-mnist-clip-4",
                                  "fashion-mnist-scarce", "fashion-mnist-scarce-ddpm", "fashion-mnist-heterogeneous",
                                  "emoji"])
def test_every_study_file_loads(name, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["study", f"studies/{name}.toml", "--list"]) == 0
    assert capsys.readouterr().out.strip()
