"""The heterogeneous-federation summary (issue 29) against hand values: each client's numbers read from the
per-client sections of a heterogeneous run and from the run-wide ones of a homogeneous run, and the paired FID
differences with their Student-t interval."""

from __future__ import annotations

import json
import math

import pytest
import tomli_w

from collafuse.cli import main
from collafuse.study.heterogeneous_report import client_point, summarise


def _evaluation(fids: dict[str, float], cuts: dict[str, int] | None = None, eps: float = 100.0) -> dict:
    """A minimal evaluation.json: a homogeneous run (cuts None) has only the run-wide compute section."""
    clients = list(fids)
    ev = {
        "cut": 200,
        "fidelity": {"per_client": {c: {"vs_test": {"fid": f}} for c, f in fids.items()}},
        "compute": {"flops": {"per_step": {"client": {"params": 1000, "train_step": 7}},
                              "sampling_per_image": {"client": {"flops": 50}},
                              "training": {"client": {"trains": True}}, "config": {"client_steps": 20}}},
        "disclosure": {c: {"formal": {"epsilon": eps}, "results": {"linkage": {"top1": 0.5}}} for c in clients},
        "communication": {"per_client": {c: {"uploaded_bytes": 2_000_000} for c in clients}},
    }
    if cuts:
        ev["clients"] = {c: {"cut": cuts[c]} for c in clients}
        ev["compute"]["per_client"] = {
            c: {"client_params": 10 * (i + 1), "train_flops_per_round": 3 * (i + 1),
                "sampling_per_image": {"client": {"flops": cuts[c]}}} for i, c in enumerate(clients)}
        for i, c in enumerate(clients):
            ev["disclosure"][c]["formal"]["epsilon"] = eps / (i + 1)
    return ev


def _study_file(tmp_path, seeds: list[int], outputs: list[str], **extra):
    """A heterogeneous study file in tmp_path (one federation "mixed") and its run folder of seed 0."""
    (tmp_path / "base.toml").write_text("")
    study = {"study": {"name": "het", "config": "base.toml", "results": "res", "seeds": seeds,
                       "path": "seed_{seed}/{federation}", "report": "heterogeneous", **extra},
             "axes": {"federation": {"mixed": ["clients=[{cut = 50}, {}, {cut = 500}]"]}},
             "grid": [{"federation": ["mixed"]}], "evaluation": [{"output": name} for name in outputs]}
    file = tmp_path / "het.toml"
    file.write_text(tomli_w.dumps(study))
    run = tmp_path / "res" / "seed_0" / "mixed"
    run.mkdir(parents=True)
    return file, run


def test_client_points_from_per_client_and_run_wide_sections():
    het = client_point(_evaluation({"client0": 9.0, "client1": 5.0}, {"client0": 50, "client1": 500}), "client1")
    assert (het["cut"], het["params"], het["client_sample_flops_per_image"], het["client_train_flops_per_round"],
            het["epsilon"], het["fid_test"]) == (500, 20, 500, 6, 50.0, 5.0)
    homo = client_point(_evaluation({"client0": 9.0}), "client0")
    # run-wide: 20 client steps x 7 FLOPs per step, every client alike
    assert (homo["cut"], homo["params"], homo["client_sample_flops_per_image"], homo["client_train_flops_per_round"],
            homo["linkage_top1"], homo["uploaded_bytes"]) == (200, 1000, 50, 140, 0.5, 2_000_000)


def test_paired_differences_against_the_reference():
    def runs(fids):
        return {s: {"client0": {"fid_test": f, "cut": 50, "params": 1, "client_sample_flops_per_image": 1,
                                "client_train_flops_per_round": 1, "epsilon": 1, "linkage_top1": 0,
                                "uploaded_bytes": 1}} for s, f in enumerate(fids)}

    summary = summarise({"het": runs([10.0, 11.0, 12.0]), "ref": runs([12.0, 12.0, 13.0])}, "ref")
    d = summary["het"]["client0"]["fid_minus_reference"]
    # differences -2, -1, -1: mean -4/3, sd 1/sqrt(3), half width t(0.975, 2) sd / sqrt(3) = 4.3027 / 3
    assert d["mean"] == pytest.approx(-4 / 3) and d["half_width"] == pytest.approx(4.302653 / 3, rel=1e-5)
    assert d["verdict"] == "not resolved" and "fid_minus_reference" not in summary["ref"]["client0"]
    clear = summarise({"het": runs([10.0, 10.5, 10.2]), "ref": runs([14.0, 14.4, 14.1])}, "ref")
    assert clear["het"]["client0"]["fid_minus_reference"]["verdict"] == "gain"


def test_report_from_a_study_file(tmp_path):
    file, _ = _study_file(tmp_path, [0, 1], ["evaluation.json"],
                          report_extra={"homogeneous": {"cut 200": "ref/seed_{seed}"}})
    for seed, (a, b) in enumerate(((8.0, 10.0), (9.0, 12.0))):
        run = tmp_path / "res" / f"seed_{seed}" / "mixed"
        run.mkdir(parents=True, exist_ok=True)
        (run / "evaluation.json").write_text(json.dumps(_evaluation({"client0": a}, {"client0": 50})))
        ref = tmp_path / "ref" / f"seed_{seed}"
        ref.mkdir(parents=True)
        (ref / "evaluation.json").write_text(json.dumps(_evaluation({"client0": b})))
    assert main(["study", str(file), "--report-only", "--root", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    row = metrics["federations"]["mixed"]["client0"]
    assert row["cut"] == 50 and row["fid_test"]["mean"] == 8.5
    assert row["fid_minus_reference"]["mean"] == pytest.approx(-2.5) and metrics["reference"] == "cut 200"
    report = (tmp_path / "res" / "report.md").read_text()
    assert "| client0 | 50 | 10 |" in report and "-2.5" in report
    for png in ("fidelity_compute.png", "fidelity_epsilon.png"):
        assert (tmp_path / "res" / png).stat().st_size > 1000 and f"![]({png})" in report
    assert not math.isnan(row["epsilon"]["mean"])


def test_report_with_one_seed_finished(tmp_path):
    """A study part-way through: one seed of the federation, so every interval is a bare mean (no bounds)."""
    file, run = _study_file(tmp_path, [0, 1], ["evaluation.json"])
    (run / "evaluation.json").write_text(json.dumps(_evaluation({"client0": 8.0}, {"client0": 50})))
    assert main(["study", str(file), "--report-only", "--root", str(tmp_path)]) == 0
    report = (tmp_path / "res" / "report.md").read_text()
    # 2,000,000 uploaded bytes -> 2.00 MB, the FID 8.0 without an interval
    assert "| client0 | 50 | 10 | 8.0 | 50 | 3 | 100 | 0.500 | 2.00 | - |" in report


def test_sampler_check_against_ddpm(tmp_path):
    """Issue 29, item 5: every evaluation of the DDPM check's sample count, per client beside DDPM's FID, with the
    server's and the client's steps per image; the 1,000-sample final evaluation is not paired with the 500-sample
    DDPM one."""
    outputs = {"evaluation.json": ("dpmsolver", 1000, {"client0": 9.0}, (23, 2)),
               "evaluation-ddpm.json": ("ddpm", 500, {"client0": 10.0}, (950, 50)),
               "evaluation-dpm500.json": ("dpmsolver", 500, {"client0": 10.5}, (23, 2)),
               "evaluation-grid15.json": ("dpmsolver", 500, {"client0": 11.5}, (35, 2))}
    file, run = _study_file(tmp_path, [0], list(outputs))
    for name, (sampler, n, fids, (server, client)) in outputs.items():
        ev = _evaluation(fids, {"client0": 50})
        ev["compute"]["per_client"]["client0"]["sampling_per_image"].update(
            server={"steps": server}, client={"steps": client, "flops": 50})
        ev.update(sampler_grid={"sampler": sampler}, n_samples_per_client=n, checkpoint="round_000100")
        (run / name).write_text(json.dumps(ev))
    assert main(["study", str(file), "--report-only", "--root", str(tmp_path)]) == 0
    check = json.loads((tmp_path / "res" / "metrics.json").read_text())["sampler_check"]["seed_0/mixed"]
    rows = check["clients"]["client0"]["evaluations"]
    assert check["reference"] == "evaluation-ddpm.json" and check["n_samples_per_client"] == 500
    assert list(rows) == ["evaluation-ddpm.json", "evaluation-dpm500.json", "evaluation-grid15.json"]
    assert rows["evaluation-dpm500.json"]["fid_over_ddpm"] == pytest.approx(1.05)
    dpm, grid, ddpm = rows["evaluation-dpm500.json"], rows["evaluation-grid15.json"], rows["evaluation-ddpm.json"]
    assert dpm["within_bar"] is True and grid["within_bar"] is False  # 1.05 and 1.15 against the 10% bar
    assert (grid["server_steps_per_image"], ddpm["client_steps_per_image"]) == (35, 50)
    report = (tmp_path / "res" / "report.md").read_text()
    assert "| client0 | 50 | evaluation-grid15.json | dpmsolver | 35 | 2 | 11.5 | 1.150 | no |" in report
    assert "| client0 | 50 | evaluation-ddpm.json | ddpm | 950 | 50 | 10.0 | 1.000 | - |" in report


def test_no_sampler_check_without_ddpm(tmp_path):
    file, run = _study_file(tmp_path, [0], ["evaluation.json"])
    ev = _evaluation({"client0": 8.0}, {"client0": 50})
    ev["sampler_grid"] = {"sampler": "dpmsolver"}
    (run / "evaluation.json").write_text(json.dumps(ev))
    assert main(["study", str(file), "--report-only", "--root", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "res" / "metrics.json").read_text())["sampler_check"] == {}
    assert "Sampler check" not in (tmp_path / "res" / "report.md").read_text()
