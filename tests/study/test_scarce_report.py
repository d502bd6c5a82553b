"""The scarce-data summary's arithmetic against hand values: FID at equal compute (linear in log FLOPs), the best
point by validation FID, and the verdicts of paired differences."""

from __future__ import annotations

import math

import pytest

from collafuse.study.scarce_report import _at_flops, _best, paired_difference, verdict
from collafuse.study.seed_summary import interval


def _pt(rounds, flops, fid, val=None):
    return {"rounds": rounds, "flops": flops, "fid_test": fid, "fid_val": val}


CURVE = [_pt(25, 1e12, 80.0, 85.0), _pt(50, 1e13, 60.0, 62.0), _pt(100, 1e14, 50.0, 70.0)]


def test_fid_at_flops_is_linear_in_log_flops_and_none_outside():
    assert _at_flops(CURVE, 1e12) == 80.0 and _at_flops(CURVE, 1e14) == 50.0
    # halfway in log10 between 1e12 and 1e13: the mean of 80 and 60
    assert _at_flops(CURVE, math.sqrt(1e12 * 1e13)) == pytest.approx(70.0)
    assert _at_flops(CURVE, 1e11) is None and _at_flops(CURVE, 2e14) is None


def test_the_best_point_is_chosen_on_validation_not_on_the_reference():
    # the lowest held-out FID is round 100 (50), but validation picks round 50 (62 < 70 < 85)
    assert _best(CURVE)["rounds"] == 50
    assert _best([_pt(100, 1e14, 50.0)]) is None  # no validation images: no best point


def test_paired_differences_three_ways():
    collab = {"final": {"c": {"fid_test": 50.0}}, "curve": {"c": CURVE}}
    alone = {"final": {"c": {"fid_test": 40.0}},
             "curve": {"c": [_pt(25, 1e13, 90.0, 90.0), _pt(100, 4e14, 40.0, 41.0)]}}
    assert paired_difference(collab, alone, "c", "final") == 10.0
    # equal compute at the smaller budget, 1e14: collab 50; alone between 1e13 (90) and 4e14 (40) at
    # log-fraction log(10) / log(40)
    w = math.log(10) / math.log(40)
    assert paired_difference(collab, alone, "c", "equal_compute") == pytest.approx(50.0 - (90 + w * (40 - 90)))
    assert paired_difference(collab, alone, "c", "best") == 60.0 - 40.0
    with pytest.raises(ValueError, match="allowed: final, equal_compute, best"):
        paired_difference(collab, alone, "c", "median")


def test_verdicts_from_the_interval_of_paired_differences():
    assert verdict(interval([-5.0, -4.0, -6.0])) == "gain"
    assert verdict(interval([5.0, 4.0, 6.0])) == "loss"
    assert verdict(interval([-5.0, 4.0, 1.0])) == "not resolved"
    assert verdict(interval([-5.0])) == "one seed" and verdict(interval([])) == "-"


def _summary(fid_by_config, verdicts):
    iv = lambda m: {"n": 3, "mean": m, "half_width": 1.0, "low": m - 1, "high": m + 1}  # noqa: E731
    configs = {cfg: {"client0": {"fid_test": iv(m), "copy_share": iv(0.1), "runs": [f"n/seed_0/{cfg}"]}}
               for cfg, m in fid_by_config.items()}
    versus = {a: {cfg: {"client0": {"final": {"mean": fid_by_config[cfg] - fid_by_config[a], "verdict": v}}}
                  for cfg, v in per.items()} for a, per in verdicts.items()}
    return {"n": {"configs": configs, "versus_alone": versus}}


def test_the_users_answer():
    from collafuse.study.scarce_report import recommend

    join = _summary({"cut_0200": 20.0, "cut_1000": 40.0, "alone_large": 30.0},
                    {"cut_1000": {"cut_0200": "gain"}, "alone_large": {"cut_0200": "gain"}})
    a = recommend(join, "n", "client0")
    assert a["advice"] == "join: cut_0200" and a["gain_vs_alone"] == {"cut_1000": -20.0, "alone_large": -10.0}
    half = _summary({"cut_0200": 20.0, "cut_1000": 40.0, "alone_large": 21.0},
                    {"cut_1000": {"cut_0200": "gain"}, "alone_large": {"cut_0200": "not resolved"}})
    assert recommend(half, "n", "client0")["advice"] == "not resolved (best mean: cut_0200)"
    alone = _summary({"cut_0200": 40.0, "cut_1000": 50.0, "alone_large": 30.0},
                     {"alone_large": {"cut_0200": "loss"}, "cut_1000": {"cut_0200": "gain"}})
    assert recommend(alone, "n", "client0")["advice"] == "stay alone: alone_large"
    # against the small model alone only, a gain is no answer: the site's other alternative was not measured
    one = _summary({"cut_0200": 20.0, "cut_1000": 40.0}, {"cut_1000": {"cut_0200": "gain"}})
    assert recommend(one, "n", "client0")["advice"] == ("not resolved (best mean: cut_0200; alone (large model) "
                                                        "not measured)")


def test_curve_rows_list_each_runs_checkpoints_in_round_order():
    from collafuse.study.scarce_report import curve_rows

    def pt(rounds, flops, fid, val, copy):
        return {"rounds": rounds, "flops": flops, "fid_test": fid, "fid_val": val, "copy_share": copy}

    run = {"key": "n/seed_1/cut_0200", "curve": {
        "client0": [pt(25, 1e12, 80.0, 81.0, 0.0), pt(100, 4e12, 50.0, 52.0, 0.25)],
        "client1": [pt(25, 1e12, 70.0, 71.0, 0.0), pt(100, 4e12, 60.0, 61.0, 0.5)]}}
    before_milestones = {"key": "n/seed_0/cut_1000", "curve": {"client0": [pt(100, 2e12, 40.0, None, None)],
                                                               "client1": [pt(100, 2e12, 45.0, None, None)]}}
    rows = curve_rows({"cut_0200": {1: run}, "cut_1000": {0: before_milestones}})
    assert [(r["config"], r["seed"], r["rounds"]) for r in rows] == [("cut_0200", 1, 25), ("cut_0200", 1, 100)]
    assert rows[1]["fid_test"] == [50.0, 60.0] and rows[1]["fid_val"] == [52.0, 61.0]
    assert rows[1]["copy_share"] == [0.25, 0.5] and rows[1]["flops"] == 4e12 and rows[1]["key"] == run["key"]


def test_the_n_axis_leaves_out_a_setting_that_only_trains_longer(tmp_path):
    import tomli_w

    from collafuse.study.scarce_report import n_axis
    from collafuse.study.spec import load_study

    (tmp_path / "base.toml").write_text("")
    spec = {"study": {"name": "s", "config": "base.toml", "results": "res", "seeds": [0], "set": ["train.rounds=4"],
                      "path": "{size}/seed_{seed}/{config}", "report": "scarce"},
            "axes": {"size": {"n10": ["data.max_train_per_client=10"], "n20": ["data.max_train_per_client=20"],
                              "n10_long": ["data.max_train_per_client=10", "train.rounds=8"],
                              "uneven": ["data.max_train_per_client=[10, 20, 30]"]},
                     "config": {"cut": ["split.cut=200"]}},
            "grid": [{"size": ["n10", "n20", "n10_long", "uneven"], "config": ["cut"]}],
            "evaluation": [{"output": "evaluation.json"}]}
    (tmp_path / "s.toml").write_text(tomli_w.dumps(spec))
    study = load_study(tmp_path / "s.toml", root=tmp_path)
    # the study-wide train.rounds=4 does not count; n10_long's own train.rounds=8 does; a list of sizes is no n
    assert n_axis(study, ["n10", "n20", "n10_long", "uneven"]) == {"n10": 10, "n20": 20}
