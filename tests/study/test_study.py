"""``collafuse study``: a tiny study end to end (grid, evaluations at milestones, results copied, summary, resume
and skip), lanes over one queue, and one-line errors for bad study files (issue 28, item 0)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from collafuse.cli import main
from collafuse.config import ConfigError
from collafuse.study import runner
from collafuse.study.spec import load_study


def write_study(tmp_path: Path, sweep_toml: Path, **changes) -> Path:
    spec = {
        "study": {"name": "tiny", "config": str(sweep_toml), "results": str(tmp_path / "results"),
                  "work": str(tmp_path / "work"), "set": ["train.rounds=2", "train.keep_rounds=[1]"],
                  "seeds": [0, 1], "vary_data_seed": True, "path": "{size}/seed_{seed}/{config}", "report": "scarce"},
        "axes": {"size": {"n0010": ["data.max_train_per_client=10"]},
                 "config": {"cut_0006": ["split.cut=6"], "cut_0020": ["split.cut=20"],
                            "alone_large": ["split.cut=20"]}},
        "grid": [{"size": ["n0010"], "config": ["cut_0006", "cut_0020"]},
                 {"size": ["n0010"], "config": ["cut_0006", "alone_large"], "seeds": [0]}],
        "evaluation": [{"output": "evaluation.json"},
                       {"output": "evaluation_r0001.json", "checkpoint": 1, "set": ["eval.energy_steps=0"]},
                       {"output": "evaluation.json", "export_samples": True,
                        "only": {"seed": [0], "config": ["cut_0006"]}}],
    }
    for section, values in changes.items():
        spec[section] = values if not isinstance(values, dict) or section != "study" else {**spec["study"], **values}
    path = tmp_path / "study.toml"
    path.write_text(tomli_w.dumps(spec))
    return path


def test_the_grid_expands_in_priority_order_once_each(sweep_toml, tmp_path):
    study = load_study(write_study(tmp_path, sweep_toml))
    # seeds slowest within a block, then the block's axes; the second block's cut_0006 seed 0 is already queued
    assert [j.key for j in study.jobs] == ["n0010/seed_0/cut_0006", "n0010/seed_0/cut_0020",
                                          "n0010/seed_1/cut_0006", "n0010/seed_1/cut_0020",
                                          "n0010/seed_0/alone_large"]
    first = study.jobs[0]
    assert first.overrides == ["train.rounds=2", "train.keep_rounds=[1]", "data.max_train_per_client=10",
                               "split.cut=6"]
    assert [e.output for e in first.evaluations] == ["evaluation.json", "evaluation_r0001.json", "evaluation.json"]
    assert [e.output for e in study.jobs[2].evaluations] == ["evaluation.json", "evaluation_r0001.json"]
    # seed 1 moves the data seed too (vary_data_seed): its own subsample
    cfg0, cfg1 = runner.job_config(study, study.jobs[0]), runner.job_config(study, study.jobs[2])
    assert (cfg0.seeds.data, cfg1.seeds.data, cfg1.seeds.init - cfg0.seeds.init) == (0, 1000, 1000)


def test_a_tiny_study_runs_resumes_and_skips_what_is_committed(sweep_toml, tmp_path, capsys, monkeypatch):
    file = write_study(tmp_path, sweep_toml)
    assert main(["study", str(file), "--quiet"]) == 0
    assert "5 run(s) finished now, 0 pending" in capsys.readouterr().out
    results = tmp_path / "results"
    run = results / "n0010/seed_0/cut_0006"
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "metrics.json", "evaluation.json", "evaluation_r0001.json", "report.md",
            "samples_uint8_client0.safetensors", "samples_uint8_client1.safetensors"} <= names
    assert not any(n.endswith(".jsonl") for n in names)  # the message log stays in work/
    assert "samples_client0.safetensors" not in names  # the run's float grids too: only the uint8 export is copied
    assert not (results / "n0010/seed_1/cut_0006/samples_uint8_client0.safetensors").exists()
    from safetensors.torch import load_file

    s = load_file(str(run / "samples_uint8_client0.safetensors"))
    assert s["images"].dtype.is_floating_point is False and tuple(s["images"].shape) == (8, 1, 28, 28)
    assert (tmp_path / "work/secrets/seed_0.toml").is_file() and not list(results.rglob("*secret*"))
    # the milestone is round 1 with its own FLOPs, the final round 2
    r1 = json.loads((run / "evaluation_r0001.json").read_text())
    assert (r1["checkpoint"], r1["compute"]["training_to_checkpoint"]["rounds"]) == ("round_000001", 1)
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and metrics["sizes"] == {"n0010": 10}
    # cut_0006 against the large model alone, paired on the one seed they share (seed 0)
    versus = metrics["settings"]["n0010"]["versus_alone"]
    assert list(versus) == ["alone_large"] and sorted(versus["alone_large"]) == ["cut_0006", "cut_0020"]
    vs = versus["alone_large"]["cut_0006"]["client0"]["final"]
    assert vs["n"] == 1 and vs["verdict"] == "one seed" and len(vs["per_seed"]) == 1
    # runs of another study joined to a setting of this one's summary (the committed full-data sweep, in the real
    # study): here this study's own cut_0006 runs under the name "again"
    spec = tomllib.loads(file.read_text())
    spec["study"]["report_extra"] = {"again": {"cut_0006": str(results / "n0010/seed_{seed}/cut_0006")}}
    file.write_text(tomli_w.dumps(spec))
    assert main(["study", str(file), "--report-only"]) == 0
    metrics = json.loads((results / "metrics.json").read_text())
    joined = metrics["settings"]["again"]["configs"]["cut_0006"]["client0"]
    assert joined["seeds"] == [0, 1] and joined["runs"] == ["n0010/seed_0/cut_0006", "n0010/seed_1/cut_0006"]
    assert joined["fid_test"] == metrics["settings"]["n0010"]["configs"]["cut_0006"]["client0"]["fid_test"]
    report = (results / "report.md").read_text()
    assert "## n0010" in report and "## again" in report and "fid_vs_n_client0.png" in report
    assert (results / "fid_vs_flops.png").is_file()
    # "again" names this study's own runs: no run of another study is counted beside them
    assert "5 of the study file's 5 runs finished; seeds [0, 1]" in report
    # each run's curve: its milestone (round 1) and its last round (2), linked to the run
    assert "| cut_0006 | [0](n0010/seed_0/cut_0006/) | 1 |" in report
    assert "| cut_0006 | [0](n0010/seed_0/cut_0006/) | 2 |" in report
    # everything committed is skipped: nothing trains or evaluates again, even from an empty work folder
    monkeypatch.setattr(runner, "train_and_evaluate", lambda *a, **k: pytest.fail("ran a finished run again"))
    assert main(["study", str(file), "--quiet"]) == 0
    assert "0 run(s) finished now, 0 pending" in capsys.readouterr().out
    assert main(["study", str(file), "--list"]) == 0
    assert capsys.readouterr().out.count("done ") == 5
    assert main(["study", str(file), "--report-only"]) == 0


def test_a_results_folder_of_another_config_is_refused(sweep_toml, tmp_path, capsys):
    file = write_study(tmp_path, sweep_toml, grid=[{"size": ["n0010"], "config": ["cut_0006"], "seeds": [0]}])
    theirs = tmp_path / "results/n0010/seed_0/cut_0006"
    theirs.mkdir(parents=True)
    from collafuse.config import load_config

    (theirs / "config.toml").write_text(load_config(sweep_toml, ["split.cut=6", "train.rounds=7"]).to_toml())
    assert main(["study", str(file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds n0010/seed_0/cut_0006 made with another config" in err and err.count("\n") == 1


@pytest.mark.parametrize("change, needle", [
    ({"grid": []}, "the grid is empty"),
    ({"grid": [{"size": ["n0010"], "config": ["cut_9999"]}]}, "'cut_9999' is no variant"),
    ({"grid": [{"size": ["n0010"], "colour": ["red"]}]}, "grid[0].colour is an unknown axis"),
    ({"grid": [{"size": ["n0010"]}]}, "grid[0] names no 'config'"),
    ({"study": {"bogus": 1}}, "unknown key 'study.bogus'"),
    ({"study": {"path": "{size}/{config}"}}, "it needs {seed}"),
    ({"study": {"seeds": []}}, "study.seeds"),
    ({"axes": {"size": {"n0010": ["data.max_train_per_client=10"]},
               "config": {"cut_0006": ["split.cut=6000"]}}, "grid": [{"size": ["n0010"], "config": ["cut_0006"]}]},
     "run n0010/seed_0/cut_0006: split.cut = 6000 is invalid"),
])
def test_bad_study_files_are_one_line_errors(sweep_toml, tmp_path, capsys, change, needle):
    file = write_study(tmp_path, sweep_toml, **change)
    assert main(["study", str(file), "--list"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_a_missing_required_key_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[study]\nname = 'x'\nconfig = 'base.toml'\nseeds = [0]\n")
    assert main(["study", str(bad), "--list"]) == 2
    err = capsys.readouterr().err
    assert "study.results is missing (a required key of [study])" in err and err.count("\n") == 1


def test_an_unknown_section_and_a_missing_file(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[studdy]\nname = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[studdy\]"):
        load_study(bad)
    assert main(["study", str(tmp_path / "none.toml"), "--list"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_two_lanes_share_one_queue(sweep_toml, tmp_path):
    """Two lane processes over one queue: every run is done once (the claims keep lanes apart)."""
    file = write_study(tmp_path, sweep_toml, evaluation=[{"output": "evaluation.json", "set": ["eval.energy_steps=0"]}])
    r = subprocess.run([sys.executable, "-m", "collafuse", "study", str(file), "--lanes", "2", "--threads", "1",
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    study = load_study(file)
    assert not runner.pending(study)
    starts = [line for line in r.stdout.splitlines() if line.endswith(": start")]
    assert sorted(starts) == sorted(set(starts)) and len(starts) == 5  # each run started once, by one lane
    assert not list((tmp_path / "work/claims").glob("*.lock"))


def test_a_claim_of_a_dead_process_is_taken_over(sweep_toml, tmp_path):
    study = load_study(write_study(tmp_path, sweep_toml))
    job = study.jobs[0]
    lock = runner.claim(study, job)
    assert lock is not None and runner.claim(study, job) is None  # held by a live process (this one)
    lock.write_text("999999999 0\n")  # a pid that does not exist
    assert runner.claim(study, job) == lock


def test_a_deadline_stops_a_background_study_at_a_checkpoint_and_it_resumes(sweep_toml, tmp_path):
    """Started the way a background queue is (SIGINT ignored, as a shell does for `cmd &`), a study still stops at
    its deadline with exit 130 and no claim left behind; the same command then finishes every run."""
    import signal

    # 100 toy rounds: more than 12 s can train even on a fast machine (40 once fitted), so the deadline falls inside training.
    file = write_study(tmp_path, sweep_toml, study={"set": ["train.rounds=100"]},
                       grid=[{"size": ["n0010"], "config": ["cut_0006"], "seeds": [0]}],
                       evaluation=[{"output": "evaluation.json", "set": ["eval.energy_steps=0"]}])
    cmd = [sys.executable, "-m", "collafuse", "study", str(file), "--quiet", "--threads", "1"]
    r = subprocess.run([*cmd, "--deadline", "12"], capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 130, r.stderr[-2000:]
    assert "stopped; the same command resumes" in r.stderr
    ckpts = sorted((tmp_path / "work/n0010/seed_0/cut_0006/checkpoints").glob("round_*"))
    assert ckpts and ckpts[-1].name < "round_000100"  # stopped mid-run, at a checkpoint
    assert not list((tmp_path / "work/claims").glob("*.lock"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming" in r.stderr and "1 run(s) finished now, 0 pending" in r.stdout


def test_only_runs_the_matching_part_of_the_queue(sweep_toml, tmp_path, capsys):
    file = write_study(tmp_path, sweep_toml)
    assert main(["study", str(file), "--list", "--only", "n0010/seed_1/*"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()] == ["n0010/seed_1/cut_0006",
                                                                                 "n0010/seed_1/cut_0020"]
    assert main(["study", str(file), "--list", "--only", "n0999/*"]) == 2
    err = capsys.readouterr().err
    assert "--only n0999/* is invalid (it matches no run" in err and err.count("\n") == 1
