"""Compute and communication accounting: exact FLOP counts, per-run FLOP and byte bookkeeping, wall time, energy."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from collafuse.evaluation.communication import communication_summary
from collafuse.evaluation.compute import (
    ENERGY_LABEL,
    count_flops,
    estimate_energy,
    make_train_step,
    measure_node_flops,
    run_accounting,
    wall_time,
)
from collafuse.split.runner import Federation
from collafuse.split.transport import MessageLog
from conftest import synthetic_clients, tiny_config

IMAGE_BYTES = 1 * 28 * 28 * 4  # one float32 [1, 28, 28] image
LABEL_BYTES = 8  # one int64 label


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny, and on busy shared cores two threads were 30x slower here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- FlopCounterMode on layers with known formulas --------------------------------------------------------------------
def test_linear_flops_match_formula():
    lin = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    macs = 4 * 16 * 8
    assert count_flops(lambda: lin(x))["total"] == 2 * macs == 1024  # bias add not counted
    # Backward with a frozen input: only the weight gradient (one more matmul of the same size).
    assert count_flops(lambda: lin(x).sum().backward())["total"] == 2 * 2 * macs == 2048
    # Input gradient too: backward = 2 x forward.
    xg = torch.randn(4, 16, requires_grad=True)
    assert count_flops(lambda: lin(xg).sum().backward())["total"] == 3 * 2 * macs == 3072


def test_conv2d_flops_match_formula():
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    macs = 2 * 5 * 8 * 8 * 3 * 3 * 3  # batch x C_out x H_out x W_out x C_in x k x k
    assert count_flops(lambda: conv(x))["total"] == 2 * macs == 34560
    assert count_flops(lambda: conv(x).sum().backward())["total"] == 2 * 2 * macs
    xg = x.clone().requires_grad_(True)
    counted = count_flops(lambda: conv(xg).sum().backward())
    assert counted["total"] == 3 * 2 * macs == 103680
    assert counted["by_op"] == {"aten.convolution": 2 * macs, "aten.convolution_backward": 4 * macs}


def test_cpu_attention_is_counted():
    # torch's own FlopCounterMode misses the CPU SDPA kernel; ours must count QK^T and AV (and 5 bmms backward).
    b, h, s, d = 2, 8, 49, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    one_bmm = 2 * b * h * s * s * d
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q))["total"] == 2 * one_bmm
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())["total"] == 7 * one_bmm


# -- per-step FLOPs of the node models ---------------------------------------------------------------------------------
def test_node_step_flops_are_exact_and_linear_in_batch():
    cfg = tiny_config()  # both models [8, 16], no attention, so the two nodes share one measurement
    nf = measure_node_flops(cfg)
    ch0 = cfg.client_model.block_out_channels[0]
    for node in ("server", "client"):
        f = nf[node]
        assert f.batch_size == cfg.train.batch_size and f.guidance_factor == 1
        assert f.sample_step_per_image == f.forward_per_image > 0
        # backward = 2 x forward for every layer except the two whose input needs no gradient: conv_in (input
        # x_t) and the time MLP's first Linear (input: the sinusoidal embedding, 4 x ch0 wide in diffusers).
        conv_in = 2 * 28 * 28 * 1 * ch0 * 3 * 3
        time_linear_1 = 2 * ch0 * 4 * ch0
        assert f.train_step == cfg.train.batch_size * (3 * f.forward_per_image - conv_in - time_linear_1)
    half = measure_node_flops(cfg, batch_size=4)
    assert 2 * half["client"].train_step == nf["client"].train_step


def test_server_with_attention_counts_it():
    cfg = tiny_config(server_model={"mid_attention": True})
    nf = measure_node_flops(cfg, batch_size=2)
    plain = measure_node_flops(tiny_config(), batch_size=2)
    # mid-block attention at 14x14 (two levels: one downsampling) with 16 channels: q/k/v/out projections
    # (Linear) + QK^T and AV over all heads
    tokens, ch = 14 * 14, 16
    attention = 4 * 2 * tokens * ch * ch + 2 * 2 * tokens * tokens * ch
    assert nf["server"].forward_per_image - plain["server"].forward_per_image == attention
    assert nf["client"].forward_per_image == plain["client"].forward_per_image


# -- per-run accounting ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_flops():
    return measure_node_flops(tiny_config())  # the cut does not change the models: reused for every cut


def test_training_flops_follow_who_owns_steps(tiny_flops):
    cfg = tiny_config()
    T, tr, n = cfg.diffusion.timesteps, cfg.train, cfg.data.num_clients
    mid = run_accounting(cfg, tiny_flops)["training"]
    assert mid["server"]["flops"] == tr.rounds * tr.server_steps * tiny_flops["server"].train_step
    assert mid["client"]["flops"] == tr.rounds * tr.client_steps * tiny_flops["client"].train_step
    assert mid["clients_total_flops"] == n * mid["client"]["flops"]
    assert mid["clients_share"] == pytest.approx(n / (n + 1))  # equal models and steps in the tiny config

    gm = run_accounting(tiny_config(split={"cut": 0}), tiny_flops)["training"]
    assert gm["client"] == {"trains": False, "steps": 0, "flops": 0} and gm["clients_share"] == 0.0
    assert gm["server"]["flops"] == mid["server"]["flops"]

    icm = run_accounting(tiny_config(split={"cut": T}), tiny_flops)["training"]
    assert icm["server"] == {"trains": False, "steps": 0, "flops": 0} and icm["clients_share"] == 1.0
    assert icm["client"]["flops"] == mid["client"]["flops"]


def test_ddpm_client_sampling_flops_proportional_to_cut(tiny_flops):
    T = tiny_config().diffusion.timesteps
    step_c, step_s = tiny_flops["client"].sample_step_per_image, tiny_flops["server"].sample_step_per_image
    previous = -1
    for cut in (0, 1, 6, 13, T):
        s = run_accounting(tiny_config(split={"cut": cut}, sample={"sampler": "ddpm"}), tiny_flops)
        per_image = s["sampling_per_image"]
        assert per_image["client"] == {"steps": cut, "flops": cut * step_c}
        assert per_image["server"] == {"steps": T - cut, "flops": (T - cut) * step_s}
        assert per_image["client"]["flops"] > previous
        previous = per_image["client"]["flops"]
        json.dumps(s)  # JSON-able as promised


def test_ddim_steps_come_from_the_cut_anchored_grid(tiny_flops):
    s = run_accounting(tiny_config(), tiny_flops)["sampling_per_image"]  # T = 20, cut 6, 5 DDIM steps: stride 4
    assert (s["server"]["steps"], s["client"]["steps"]) == (3, 2)  # indices 17, 13, 9 | 5, 1
    assert s["client_share"] == pytest.approx(2 / 5)


def test_guidance_doubles_sampling_flops_only(tiny_flops):
    guided_cfg = tiny_config(sample={"guidance_scale": 3.0})
    guided = measure_node_flops(guided_cfg)
    for node in ("server", "client"):
        assert guided[node].guidance_factor == 2
        assert guided[node].sample_step_per_image == 2 * tiny_flops[node].sample_step_per_image
        assert guided[node].train_step == tiny_flops[node].train_step
    plain, cfg_run = run_accounting(tiny_config(), tiny_flops), run_accounting(guided_cfg, guided)
    assert cfg_run["sampling_per_image"]["total_flops"] == 2 * plain["sampling_per_image"]["total_flops"]
    assert cfg_run["training"]["total_flops"] == plain["training"]["total_flops"]
    with pytest.raises(ValueError, match="measured for another"):
        run_accounting(guided_cfg, tiny_flops)  # stale measurement refused
    # An unconditional model has no null label, so predict_eps runs one forward whatever the scale.
    uncond = {"condition_on_class": False}
    nf = measure_node_flops(tiny_config(server_model=uncond, client_model=uncond, sample={"guidance_scale": 3.0}))
    assert nf["client"].guidance_factor == 1


# -- communication -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("comm") / "message_log.jsonl"
    fed = Federation(cfg, synthetic_clients(cfg), log=MessageLog(path))
    fed.train(progress=False)
    for c in fed.clients:
        fed.sample(c.index, 6)  # sample.batch_size 4: two requests, of 4 and 2 images
    return cfg, fed, path


def test_bytes_match_message_shapes(tiny_run):
    cfg, fed, path = tiny_run
    summary = communication_summary(fed.log)
    assert summary == communication_summary(path)  # the jsonl file says the same as the in-memory log
    json.dumps(summary)
    n = len(fed.clients[0].data.train_x)  # 24 synthetic images per client
    upload = n * IMAGE_BYTES + n * LABEL_BYTES
    assert set(summary["per_client"]) == {"client0", "client1"}
    for c in summary["per_client"].values():
        tr = c["training"]
        assert tr["uploaded_bytes"] == upload and tr["downloaded_bytes"] == 0  # train messages carry no arrays
        assert tr["rounds"] == cfg.train.rounds
        assert tr["per_round"][0] == {"round": 1, "uploaded_bytes": upload, "downloaded_bytes": 0, "messages": 4}
        assert tr["per_round"][1] == {"round": 2, "uploaded_bytes": 0, "downloaded_bytes": 0, "messages": 2}
        s = c["sampling"]
        assert (s["requests"], s["images"]) == (2, 6)
        assert s["uploaded_bytes_per_image"] == LABEL_BYTES
        assert s["downloaded_bytes_per_image"] == IMAGE_BYTES
        assert s["bytes_per_image"] == IMAGE_BYTES + LABEL_BYTES
        assert c["uploaded_bytes"] == upload + 6 * LABEL_BYTES and c["downloaded_bytes"] == 6 * IMAGE_BYTES
    assert summary["totals"]["sampling_bytes_per_image"] == IMAGE_BYTES + LABEL_BYTES
    assert summary["totals"]["uploaded_bytes"] == fed.log.summary()["client_to_server_bytes"]


def test_independent_clients_send_nothing():
    cfg = tiny_config(split={"cut": 20}, data={"num_clients": 1}, train={"rounds": 1})
    fed = Federation(cfg, synthetic_clients(cfg, n=8))
    fed.train(progress=False)
    fed.sample(0, 2)
    c = communication_summary(fed.log)["per_client"]["client0"]
    assert c["uploaded_bytes"] == c["downloaded_bytes"] == 0
    assert c["sampling"]["images"] == 0 and c["sampling"]["bytes_per_image"] is None  # nothing requested


# -- wall time and energy ----------------------------------------------------------------------------------------------
def test_wall_time_and_real_train_steps():
    calls = []
    t = wall_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t["all_s"]) == 3 and 0 <= t["min_s"] <= t["median_s"]
    cfg = tiny_config()
    for node in ("server", "client"):
        assert math.isfinite(make_train_step(cfg, node)())
    with pytest.raises(ValueError, match="owns no step"):
        make_train_step(tiny_config(split={"cut": 0}), "client")


def test_energy_estimate_is_labelled_and_never_crashes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # codecarbon must not write an emissions.csv (or anything) anywhere
    calls = []
    e = estimate_energy(lambda: calls.append(sum(range(200_000))), country_iso_code="DEU", measure_power_secs=0.5)
    assert calls and e["label"] == ENERGY_LABEL == "estimate (codecarbon, no power meter: TDP x load)"
    json.dumps(e)
    if e["ok"]:
        assert e["energy_kwh"] > 0 and e["emissions_kg_co2eq"] > 0 and e["reason"] is None
    else:  # documented failure: no number, a reason
        assert e["energy_kwh"] is None and isinstance(e["reason"], str) and e["reason"]

    # codecarbon swallows its own errors (here: a bad argument) and leaves a tracker without data: say why.
    swallowed = estimate_energy(lambda: calls.append(0), no_such_codecarbon_option=1)
    assert len(calls) == 2 and swallowed["label"] == ENERGY_LABEL
    assert swallowed["ok"] is False and swallowed["energy_kwh"] is None
    assert "no_such_codecarbon_option" in swallowed["reason"]  # the root cause, not only the follow-up errors

    class Broken:
        def __init__(self, **kwargs):
            raise RuntimeError("no tracker today")

    monkeypatch.setattr("codecarbon.OfflineEmissionsTracker", Broken)
    broken = estimate_energy(lambda: calls.append(1))
    assert len(calls) == 3 and broken["ok"] is False and broken["energy_kwh"] is None
    assert broken["reason"] == "codecarbon could not start: RuntimeError: no tracker today"
    assert list(tmp_path.iterdir()) == []
