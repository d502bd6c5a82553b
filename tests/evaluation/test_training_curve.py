"""Points of a training curve: ``train.keep_rounds`` keeps milestone checkpoints, ``collafuse evaluate --checkpoint``
scores one with the FLOPs spent up to it; a data-size cap leaves a validation set that gets its own FID; every
evaluation carries the memorisation measures (issue 28, items 3 and 6)."""

from __future__ import annotations

import json

from collafuse.cli import main


def test_milestones_are_kept_and_scored_with_their_flops(sweep_toml, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(sweep_toml), "--out", str(run), "--quiet", "--set", "train.rounds=4",
                 "--set", "train.keep_rounds=[1]", "--set", "data.max_train_per_client=[10, 12]"]) == 0
    # the newest two rounds are always kept; round 1 because it is a milestone; round 2 is pruned
    assert sorted(p.name for p in (run / "checkpoints").glob("round_*")) == ["round_000001", "round_000003",
                                                                             "round_000004"]
    assert main(["evaluate", str(run), "--quiet", "--checkpoint", "1", "--output", "evaluation_r0001.json"]) == 0
    assert main(["evaluate", str(run), "--quiet"]) == 0
    early = json.loads((run / "evaluation_r0001.json").read_text())
    final = json.loads((run / "evaluation.json").read_text())
    assert (early["checkpoint"], early["rounds"], final["checkpoint"], final["rounds"]) == (
        "round_000001", 1, "round_000004", 4)
    # FLOPs to a checkpoint: rounds x steps x FLOPs per step; the tiny config takes 2 server + 2 client steps a round
    per_step = final["compute"]["flops"]["per_step"]
    for ev, rounds in ((early, 1), (final, 4)):
        to = ev["compute"]["training_to_checkpoint"]
        assert to["rounds"] == rounds
        assert to["server_flops"] == rounds * 2 * per_step["server"]["train_step"]
        assert to["client_flops"] == rounds * 2 * per_step["client"]["train_step"]
        assert to["total_flops"] == to["server_flops"] + 2 * to["client_flops"]  # two clients
    # different weights, so different samples: the milestone's were cached under their own key
    assert early["fidelity"]["per_client"]["client0"]["vs_test"] != final["fidelity"]["per_client"]["client0"]["vs_test"]
    for ev in (early, final):
        for node, n_train in (("client0", 10), ("client1", 12)):
            fid = ev["fidelity"]["per_client"][node]
            # client 0 holds 5 classes x 12 = 60 training images of the tiny set: 50 are left out for validation
            assert fid["n_real"]["train"] == n_train and fid["n_real"]["val"] == 16  # eval.n_real = 16
            assert fid["vs_val"]["fid"] > 0
            mem = ev["memorisation"][node]
            assert mem["n_train"] == n_train and 0 <= mem["copy_share"] <= 1 and mem["nn_ratio_median"] > 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--quiet", "--checkpoint", "2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint = '2' is invalid" in err and "round_000001, round_000003, round_000004" in err
    assert err.count("\n") == 1


def test_an_uncapped_run_has_no_validation_set(sweep_toml, tmp_path):
    run = tmp_path / "run"
    assert main(["run", str(sweep_toml), "--out", str(run), "--quiet", "--set", "train.rounds=1",
                 "--set", "data.max_train_per_client=0"]) == 0
    assert main(["evaluate", str(run), "--quiet"]) == 0
    fid = json.loads((run / "evaluation.json").read_text())["fidelity"]["per_client"]["client0"]
    assert fid["vs_val"] is None and fid["n_real"]["val"] == 0
