"""Intervals over seeds and the verdicts drawn from them, on hand-made sweep rows."""

from __future__ import annotations

import pytest

from collafuse.study.seed_summary import interval, judge

T = 1000


def test_interval_is_the_student_t_interval():
    iv = interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t(0.975, 2 d.o.f.) = 4.303 from the tables
    assert iv["mean"] == pytest.approx(2.0) and iv["half_width"] == pytest.approx(4.303 / 3 ** 0.5, rel=1e-3)
    assert interval([5.0])["half_width"] is None and interval([])["mean"] is None
    assert interval([2.0, None, 4.0])["n"] == 2


def _row(cut, fid, linkage, psnr):
    dis = None if cut == T else {"client0": {"linkage_top1": linkage, "psnr_best": psnr, "epsilon": 1.0}}
    return {"cut": cut, "fidelity": {"client0": {"fid_test": fid, "kid_test": fid / 1000}}, "disclosure": dis,
            "compute": {"client_sample_flops_per_image": cut, "client_train_flops": 1, "client_train_seconds": 1}}


def _sweep(fids, links, psnrs, jitter):
    cuts = sorted(fids)
    return {s: [_row(c, fids[c] + j, links.get(c, 0) + j / 100, psnrs.get(c, 0) + j) for c in cuts]
            for s, j in enumerate(jitter)}


def test_clear_gaps_are_held():
    rows = _sweep({0: 30, 200: 20, T: 50}, {0: 0.99, 200: 0.5}, {0: 40, 200: 20}, jitter=[-1, 0, 1])
    _, v = judge(rows, T)
    assert v["H1"]["verdict"] == "held" and v["H2"]["verdict"] == "held" and v["H3"]["verdict"] == "held"


def test_gaps_inside_the_noise_are_not_resolved():
    rows = _sweep({0: 30, 200: 49, T: 50}, {0: 0.51, 200: 0.5}, {0: 20.5, 200: 20}, jitter=[-10, 0, 10])
    _, v = judge(rows, T)
    assert v["H1"]["verdict"] == "not resolved" and v["H2"]["verdict"] == "not resolved"


def test_clear_reversals_are_refuted():
    rows = _sweep({0: 80, 200: 70, T: 50}, {0: 0.2, 200: 0.9}, {0: 10, 200: 30}, jitter=[-1, 0, 1])
    _, v = judge(rows, T)
    assert v["H1"]["verdict"] == "refuted" and v["H2"]["verdict"] == "refuted"


def test_a_saturated_metric_that_does_not_move_is_a_standstill_not_a_fall():
    """Linkage at exactly 1.0 for every seed at cuts 0 and 200 (no spread): the data say it does not fall there,
    so H2 is refuted for linkage, while the PSNR falls clearly and holds."""
    rows = _sweep({0: 30, 200: 20, T: 50}, {0: 1.0, 200: 1.0}, {0: 40, 200: 20}, jitter=[0, 0, 0])
    for seed, j in zip(rows, (-1, 0, 1)):  # spread in the PSNR only
        for r in rows[seed]:
            if r["disclosure"]:
                r["disclosure"]["client0"]["psnr_best"] += j
    _, v = judge(rows, T)
    assert v["H2"]["per_metric"] == {"linkage_top1": "refuted", "psnr_best": "held"}
    assert v["H2"]["steps"]["linkage_top1"] == [{"from": 0, "to": 200, "outcome": "flat"}]
    assert v["H2"]["steps"]["psnr_best"] == [{"from": 0, "to": 200, "outcome": "falls"}]
    assert v["H2"]["verdict"] == "refuted"


def test_one_seed_has_no_intervals_so_nothing_is_resolved_but_h3():
    rows = _sweep({0: 30, 200: 20, T: 50}, {0: 1.0, 200: 0.5}, {0: 40, 200: 20}, jitter=[0])
    per_cut, v = judge(rows, T)
    assert per_cut[200]["fid_test"]["client0"] == {"n": 1, "mean": 20, "half_width": None, "low": None, "high": None}
    assert v["H1"]["verdict"] == "not resolved" and v["H2"]["verdict"] == "not resolved"
    assert v["H2"]["steps"]["linkage_top1"][0]["outcome"] == "overlap"
    assert v["H3"]["verdict"] == "held"
