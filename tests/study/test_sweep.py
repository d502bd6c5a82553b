"""collafuse evaluate / sweep: a tiny end-to-end sweep produces the report; hypotheses are judged from numbers;
bad input gives one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from collafuse.cli import main
from collafuse.config import ConfigError, load_config
from collafuse.evaluation.compute import build_node_model
from collafuse.study.sweep import parse_cuts
from collafuse.study.sweep_report import hypotheses
from conftest import TINY

T = TINY["diffusion"]["timesteps"]


def _row(cut, kid, link, psnr, flops):
    dis = None if cut == T else {"linkage_top1": link, "psnr_best": psnr}
    return {"cut": cut, "fidelity": {"client0": {"kid_test": kid}}, "disclosure": {"client0": dis},
            "compute": {"client_sample_flops_per_image": flops, "client_train_flops": 1 if cut else 0,
                        "client_train_seconds": None}}


def test_hypotheses_are_judged_from_the_numbers():
    rows = [_row(0, 0.05, 1.0, 40.0, 0), _row(6, 0.03, 0.6, 20.0, 10), _row(T, 0.08, None, None, 30)]
    v = hypotheses(rows, T)
    assert v["H1"]["holds"] and v["H1"]["per_client"]["client0"]["best_cut"] == 6
    assert v["H2"]["holds"] and v["H3"]["holds"]
    rows[1]["fidelity"]["client0"]["kid_test"] = 0.09
    rows[0]["fidelity"]["client0"]["kid_test"] = 0.10
    rows[1]["disclosure"]["client0"]["psnr_best"] = 50.0
    v = hypotheses(rows, T)
    assert v["H1"]["holds"] is False and v["H2"]["holds"] is False
    assert hypotheses(rows[:1], T)["H1"]["holds"] is None  # no ICM baseline: not testable


@pytest.mark.parametrize("text,needle", [("a,b", "comma-separated integers"), ("", "at least one"),
                                         ("0,21", "[0, 20]")])
def test_bad_cuts(text, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        parse_cuts(text, T)
    assert parse_cuts("200, 0,0,1000") == [0, 200, 1000]


def test_tiny_sweep_end_to_end_and_resume(sweep_toml, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", str(sweep_toml), "--cuts", f"6,{T}", "--out", str(out), "--quiet"]) == 0
    assert "report:" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for name in ("fidelity_kid.png", "fidelity_fid.png", "disclosure_linkage.png", "disclosure_psnr.png",
                 "compute.png", "communication.png", "figure4_grid.png"):
        assert (out / name).is_file() and f"![]({name})" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["cut"] for r in metrics["rows"]] == [6, T]
    assert set(metrics["hypotheses"]) == {"H1", "H2", "H3"}
    assert metrics["hypotheses"]["H3"]["holds"] is True  # client sampling FLOPs grow with the cut, exactly
    ev = json.loads((out / "cut_0006" / "evaluation.json").read_text())
    assert ev["disclosure"]["client0"]["results"]["linkage"]["pool_size"] == 40
    agreement = ev["fidelity"]["per_client"]["client0"]["label_mix"]["label_agreement"]  # vs the requested labels
    assert 0.0 <= agreement <= 1.0
    formal = ev["disclosure"]["client0"]["formal"]  # the upload's (epsilon, delta), delta = 1 / (train images)
    assert formal["views"] == 1 and formal["sensitivity"] == 56.0 and formal["epsilon"] > 0
    n_train = 1 / formal["delta"]
    assert n_train == pytest.approx(round(n_train)) and 8 <= round(n_train) <= 48  # max_train_per_client = 48
    # The exact-seed attack runs on every client and fails on every one: the report says "0/2" recovered.
    assert all(not ev["disclosure"][c]["results"]["reconstruction_exact_seed"]["recovered"]
               for c in ("client0", "client1"))
    assert next(line for line in report.splitlines() if line.startswith("| 6 |") and "nothing" not in line
                and line.count("|") == 8).endswith(", 0/2 |")
    assert json.loads((out / f"cut_{T:04d}" / "evaluation.json").read_text())["disclosure"]["skipped"]
    # Resume: nothing is trained or evaluated again (the evaluation files keep their bytes).
    before = {p: p.read_bytes() for p in out.glob("cut_*/evaluation.json")}
    assert main(["sweep", str(sweep_toml), "--cuts", f"6,{T}", "--out", str(out), "--quiet"]) == 0
    assert {p: p.read_bytes() for p in out.glob("cut_*/evaluation.json")} == before


def test_evaluate_errors(sweep_toml, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", str(empty)]) == 2
    assert "config.toml" in capsys.readouterr().err
    (empty / "config.toml").write_text(sweep_toml.read_text())
    assert main(["evaluate", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and err.count("\n") == 1
    assert main(["evaluate", str(empty), "--set", "eval.extractor=clip"]) == 2
    assert "eval.extractor = 'clip' is invalid" in capsys.readouterr().err


def test_second_evaluation_goes_to_its_own_file(sweep_toml, tmp_path, capsys):
    """``evaluate --output NAME`` writes RUN_DIR/NAME and leaves the sweep's evaluation.json byte for byte;
    a name that is not a plain .json file name is refused with one line naming it."""
    run = tmp_path / "run"
    assert main(["run", str(sweep_toml), "--out", str(run), "--quiet", "--set", "train.rounds=1"]) == 0
    assert main(["evaluate", str(run), "--quiet"]) == 0
    before = (run / "evaluation.json").read_bytes()
    assert main(["evaluate", str(run), "--quiet", "--set", "sample.sampler=ddpm",
                 "--output", "evaluation-ddpm.json"]) == 0
    assert (run / "evaluation.json").read_bytes() == before
    ddpm = json.loads((run / "evaluation-ddpm.json").read_text())
    assert ddpm["rounds"] == 1
    # Each file says which grid its samples came from (T 20, cut 6; 5 steps of stride 4 anchored on index 5).
    assert json.loads(before)["sampler_grid"] == {"sampler": "dpmsolver", "timesteps": [17, 13, 9, 5, 1],
                                              "server_steps": 3, "client_steps": 2}
    assert ddpm["sampler_grid"] == {"sampler": "ddpm", "timesteps": list(range(19, -1, -1)), "server_steps": 14,
                                "client_steps": 6}
    capsys.readouterr()
    for bad in ("../evaluation.json", "sub/e.json", "evaluation.txt", ".json"):
        assert main(["evaluate", str(run), "--quiet", "--output", bad]) == 2
        err = capsys.readouterr().err
        assert f"evaluate --output: {bad!r} is not allowed" in err and err.count("\n") == 1
    assert sorted(p.name for p in run.glob("*.json")) == ["evaluation-ddpm.json", "evaluation.json", "metrics.json"]


def test_evaluation_samples_are_keyed_on_everything_that_changes_them(sweep_toml, tmp_path, monkeypatch):
    """A sampler override after an evaluation samples again instead of scoring the cached samples; the same
    settings reuse the cache; a newer checkpoint samples again."""
    from collafuse.evaluation import evaluate as ev
    from collafuse.split.runner import load_run

    run = tmp_path / "run"
    assert main(["run", str(sweep_toml), "--out", str(run), "--quiet", "--set", "train.rounds=1"]) == 0
    calls = []
    real_sample = ev.Federation.sample
    monkeypatch.setattr(ev.Federation, "sample", lambda self, *a, **k: calls.append(a) or real_sample(self, *a, **k))

    def samples(*overrides):
        return ev.generated_samples(load_run(run, list(overrides)), run, 0, 4)

    ddim = samples()
    assert len(calls) == 1 and torch.equal(samples()["x0"], ddim["x0"]) and len(calls) == 1  # cached
    ddpm = samples("sample.sampler=ddpm")
    assert len(calls) == 2 and not torch.equal(ddpm["x0"], ddim["x0"])
    for override in ("sample.ddim_steps=3", "sample.guidance_scale=2.0", "sample.use_ema=false", "seeds.sample=9"):
        samples(override)
    assert len(calls) == 6
    assert torch.equal(samples("sample.sampler=ddpm")["x0"], ddpm["x0"]) and len(calls) == 6
    assert len(list((run / "eval").glob("samples_client0_n4_*.safetensors"))) == 6
    # The same settings under a changed grid builder (as when DPM-Solver's short-server-segment grid was fixed)
    # sample again: the key holds the grid itself.
    from collafuse.split.diffusion import DiffusionSchedule

    real_grid = DiffusionSchedule.sampler
    with monkeypatch.context() as m:
        m.setattr(DiffusionSchedule, "sampler",
                  lambda self, kind, cut, steps=50, *rest: real_grid(self, kind, cut, steps + 1, *rest))
        samples()
    assert len(calls) == 7
    # Training on changes the weights: the same settings sample again.
    assert main(["run", str(sweep_toml), "--out", str(run), "--quiet", "--resume", "--set", "train.rounds=2"]) == 0
    calls.clear()  # (the run samples its own report images)
    samples()
    assert len(calls) == 1


def test_seeded_sweep_end_to_end_with_intervals_and_resume(sweep_toml, tmp_path, capsys):
    out = tmp_path / "seeded"
    argv = ["sweep", str(sweep_toml), "--cuts", f"6,{T}", "--seeds", "0,1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "report:" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and set(metrics["per_cut"]) == {"6", str(T)}
    fid = metrics["per_cut"]["6"]["fid_test"]["client0"]
    assert fid["n"] == 2 and fid["low"] < fid["mean"] < fid["high"]
    per_seed = [json.loads((out / f"seed_{s}" / "cut_0006" / "evaluation.json").read_text()) for s in (0, 1)]
    assert per_seed[0]["fidelity"] != per_seed[1]["fidelity"]  # the seeds really differ...
    secrets = [(out / f"seed_{s}" / "client-secrets.toml").read_text() for s in (0, 1)]
    assert secrets[0] != secrets[1]  # ...their clients too (own secrets per seed)
    assert {metrics["hypotheses"][h]["verdict"] for h in ("H1", "H2", "H3")} <= {"held", "refuted", "not resolved"}
    assert (out / "fidelity_fid.png").is_file() and "fidelity_fid.png" in (out / "report.md").read_text()
    # The exact columns come from seed 0's evaluation: FLOPs per image as counted there, and one upload per client
    # by hand: a float32 28x28 view and an int64 label per training image (n = 1/delta of the formal account).
    exact = metrics["exact_per_cut"]["6"]
    assert exact["client_flops_per_image"] == per_seed[0]["compute"]["flops"]["sampling_per_image"]["client"]["flops"]
    n_train = [round(1 / per_seed[0]["disclosure"][c]["formal"]["delta"]) for c in ("client0", "client1")]
    assert exact["upload_bytes_per_client"] == sum(n * (4 * 28 * 28 + 8) for n in n_train) / 2
    assert metrics["exact_per_cut"][str(T)]["upload_bytes_per_client"] == 0
    before = {p: p.read_bytes() for p in out.glob("seed_*/cut_*/evaluation.json")}
    assert main(argv) == 0  # resume: nothing trained or evaluated again
    assert {p: p.read_bytes() for p in out.glob("seed_*/cut_*/evaluation.json")} == before

    # --report-only over a committed copy of the small files (no checkpoints, no secrets), seed 1's cut 6 missing:
    # the summary over seeds uses what is there and trains nothing.
    committed = tmp_path / "committed"
    for seed, cut in ((0, 6), (0, T), (1, T)):
        src, dst = out / f"seed_{seed}" / f"cut_{cut:04d}", committed / f"seed_{seed}" / f"cut_{cut:04d}"
        dst.mkdir(parents=True)
        for f in [src / "evaluation.json", src / "figure4_client0.png", *src.glob("samples_client*.png")]:
            shutil.copy(f, dst)
    report_argv = [*argv[:argv.index("--out")], "--out", str(committed), "--quiet", "--report-only"]
    assert main(report_argv) == 0
    summary = json.loads((committed / "metrics.json").read_text())
    fid_t = [e["fidelity"]["per_client"]["client0"]["vs_test"]["fid"] for e in
             (json.loads((out / f"seed_{s}" / f"cut_{T:04d}" / "evaluation.json").read_text()) for s in (0, 1))]
    at_t = summary["per_cut"][str(T)]["fid_test"]["client0"]
    assert at_t["n"] == 2 and at_t["mean"] == pytest.approx(sum(fid_t) / 2)
    assert at_t["half_width"] == pytest.approx(12.7062047 * abs(fid_t[0] - fid_t[1]) / 2)  # t_{0.975,1} s/sqrt(2)
    at_6 = summary["per_cut"]["6"]["fid_test"]["client0"]
    assert at_6["n"] == 1 and at_6["mean"] == pytest.approx(
        per_seed[0]["fidelity"]["per_client"]["client0"]["vs_test"]["fid"])
    assert (committed / "seed_1" / "report.md").is_file() and (committed / "report.md").is_file()
    assert not list(committed.rglob("checkpoints")) and not list(committed.rglob("client-secrets.toml"))
    # Figure 4 from the runs' committed strips (hand-off row + sample row each): seed 0's two cuts stacked.
    from PIL import Image
    strip = Image.open(committed / "seed_0" / "cut_0006" / "figure4_client0.png")
    assert strip.height == 2 * (2 * (28 + 2) + 2)  # 2 rows of 28 px, 2 px padding, scaled 2x
    assert Image.open(committed / "seed_0" / "figure4_grid.png").size == (strip.width, 2 * strip.height)
    assert "figure4_grid.png" in (committed / "seed_0" / "report.md").read_text()
    assert main([*report_argv[:-2], "--out", str(tmp_path / "empty"), "--quiet", "--report-only"]) == 2
    assert "--report-only: no run of --seeds 0,1" in capsys.readouterr().err


def test_a_fedavg_baseline_joins_every_table_and_plot_of_a_seeded_sweep(sweep_toml, tmp_path, capsys):
    """--baseline FedAvg=DIR: the baseline's intervals over seeds (checked by hand), a row in every table, a line
    on every plot, and per cut whether CollaFuse's interval is wholly below, above or overlapping it."""
    ours, fed = tmp_path / "ours", tmp_path / "fed"
    common = [str(sweep_toml), "--cuts", str(T), "--seeds", "0,1", "--quiet"]
    assert main(["sweep", *common, "--out", str(ours)]) == 0
    assert main(["sweep", *common, "--out", str(fed), "--set", "split.algorithm=fedavg"]) == 0
    capsys.readouterr()
    assert main(["sweep", *common, "--out", str(ours), "--report-only", "--baseline", f"FedAvg={fed}"]) == 0
    summary = json.loads((ours / "metrics.json").read_text())
    base = summary["baselines"]["FedAvg"]
    fids = [json.loads((fed / f"seed_{s}" / f"cut_{T:04d}" / "evaluation.json").read_text())
            ["fidelity"]["per_client"]["client0"]["vs_test"]["fid"] for s in (0, 1)]
    iv = base["fid_test"]["client0"]
    assert base["algorithm"] == "fedavg" and base["seeds"] == [0, 1]
    assert iv["mean"] == pytest.approx(sum(fids) / 2)
    assert iv["half_width"] == pytest.approx(12.7062047 * abs(fids[0] - fids[1]) / 2)  # t_{0.975,1} s/sqrt(2)
    ours_iv = summary["per_cut"][str(T)]["fid_test"]["client0"]
    expected = ("lower" if ours_iv["high"] < iv["low"] else "higher" if iv["high"] < ours_iv["low"] else "overlap")
    assert summary["against_baselines"]["FedAvg"][str(T)]["client0"] == expected
    # FedAvg moves the whole model both ways every round: its bytes by hand from the message shapes
    log = [json.loads(line) for line in (fed / "seed_0" / f"cut_{T:04d}" / "message_log.jsonl").read_text().splitlines()]
    def model_bytes(kind, field):
        return sum(4 * a["shape"][0] for r in log if r["kind"] == kind and r[field] == "client0" for a in r["arrays"])

    # (the mean over the two clients; both train every round, so it is client 0's own)
    assert base["exact"]["upload_bytes_training"] == model_bytes("model_update", "sender") > 0
    assert base["exact"]["download_bytes_training"] == model_bytes("model_push", "receiver") > 0
    report = (ours / "report.md").read_text()
    assert "| FedAvg (fedavg, seeds [0, 1]) |" in report and "## CollaFuse against FedAvg" in report
    assert "weights" in report.split("## Disclosure")[1].split("##")[0]
    seed_report = (ours / "seed_0" / "report.md").read_text()
    assert seed_report.count("| FedAvg |") == 3  # fidelity, disclosure, compute tables
    assert json.loads((ours / "seed_0" / "metrics.json").read_text())["baselines"]["FedAvg"]["algorithm"] == "fedavg"
    for bad, needle in ((f"{fed}", "expected LABEL=DIR"), ("X=/nonexistent", "is not a directory"),
                        (f"X={tmp_path}", "no evaluated run under")):
        assert main(["sweep", *common, "--out", str(ours), "--report-only", "--baseline", bad]) == 2
        err = capsys.readouterr().err
        assert "--baseline" in err and needle in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, needle", [
    (["--seeds", "a"], "--seeds = 'a' is invalid"),
    (["--seeds", "-1"], "--seeds = '-1' is invalid"),
    (["--vary-partition"], "--vary-partition is invalid without --seeds"),
])
def test_bad_seed_arguments_are_one_line_errors(sweep_toml, tmp_path, capsys, argv, needle):
    assert main(["sweep", str(sweep_toml), "--cuts", "6", "--out", str(tmp_path / "x"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1



def test_a_fedavg_run_is_trained_evaluated_and_accounted_as_the_whole_model_on_every_client(sweep_toml, tmp_path):
    """split.algorithm = fedavg through `collafuse sweep`: every client trains and samples with the global (server)
    architecture over all T steps, the server trains nothing, only weights cross, and the disclosure section says
    what the server holds instead of attacking image views that never crossed."""
    out = tmp_path / "fedavg"
    assert main(["sweep", str(sweep_toml), "--cuts", str(T), "--out", str(out), "--quiet",
                 "--set", "split.algorithm=fedavg"]) == 0
    run = out / f"cut_{T:04d}"
    ev = json.loads((run / "evaluation.json").read_text())
    assert "fedavg" in ev["disclosure"]["skipped"] and "weights" in ev["disclosure"]["skipped"]
    assert all(ev["fidelity"]["per_client"][c]["vs_test"]["fid"] >= 0 for c in ("client0", "client1"))
    log = [json.loads(line) for line in (run / "message_log.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in log} == {"model_push", "model_update", "train_reply"}
    # Every weights array holds the server architecture's parameter count; each client trains that model.
    server_model, _ = build_node_model(load_config(sweep_toml), "server")
    n = sum(p.numel() for p in server_model.parameters())
    assert all(a["shape"] == [n] for r in log for a in r["arrays"])
    per_step = ev["compute"]["flops"]["per_step"]
    assert per_step["client"]["params"] == per_step["server"]["params"] == n
    training = ev["compute"]["flops"]["training"]
    assert training["server"]["flops"] == 0 and training["client"]["flops"] > 0
