"""train.precision: bf16 autocast keeps fp32 master weights, Adam state and EMA, really runs the convolutions in
bf16, trains to the fp32 loss within noise, resumes bit-exactly and samples finite images."""

from __future__ import annotations

import pytest
import torch

from collafuse.config import ConfigError
from collafuse.split.learner import resolve_precision
from collafuse.split.runner import Federation
from conftest import fixed_secrets, synthetic_clients, tiny_config


def _fed(precision: str, rounds: int = 2) -> Federation:
    cfg = tiny_config(train={"precision": precision, "rounds": rounds})
    return Federation(cfg, synthetic_clients(cfg, n=16), secrets=fixed_secrets(2))


def test_bf16_runs_convolutions_in_bf16_and_keeps_every_state_tensor_fp32():
    fed = _fed("bf16")
    seen = []
    conv = fed.server.learner.model.conv_in
    handle = conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fed.train(progress=False)
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    for role in (fed.server, *fed.clients):
        tensors, _ = role.state()
        floats = {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}
        assert floats and set(floats.values()) == {torch.float32}, role.node_id  # weights, Adam, EMA


def test_fp32_runs_convolutions_in_fp32():
    fed = _fed("fp32", rounds=1)
    seen = []
    fed.server.learner.model.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fed.train(progress=False)
    assert set(seen) == {torch.float32}


def test_bf16_losses_follow_fp32_and_sampling_is_finite():
    a, b = _fed("fp32", rounds=4), _fed("bf16", rounds=4)
    a.train(progress=False)
    b.train(progress=False)
    for node, la in a.history.losses.items():
        lb = b.history.losses[node]
        # same data, batches and noise: bf16's rounding moves the losses by far less than training does
        assert all(abs(x - y) < 0.05 * x for x, y in zip(la, lb)), (node, la, lb)
        assert la != lb  # ...but it did run in another precision
    out = b.sample(0, 3)
    assert out["x0"].dtype == torch.float32 and torch.isfinite(out["x0"]).all()


def test_bf16_resume_is_bit_exact(tmp_path):
    straight = _fed("bf16", rounds=3)
    straight.train(progress=False)
    part = _fed("bf16", rounds=1)
    part.train(tmp_path, progress=False)
    resumed = _fed("bf16", rounds=3)  # a fresh process: restored from the checkpoint, uploads asked for again
    assert resumed.restore(tmp_path)
    resumed.train(progress=False)
    for r, s in zip((resumed.server, *resumed.clients), (straight.server, *straight.clients)):
        ta, tb = r.state()[0], s.state()[0]
        assert all(torch.equal(ta[k], tb[k]) for k in ta), r.node_id


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cuda") == "fp32"


def test_bad_precision_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"train.precision = 'fp16' is invalid \(expected one of 'fp32', 'bf16', "
                                          r"'auto'\)"):
        tiny_config(train={"precision": "fp16"})


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_attention_runs_the_math_kernel_with_the_default_kernels_result(precision):
    """The mid-block attention avoids the CPU flash kernel (slow for 49 tokens) and computes the same thing: the
    loss and gradients of one step match the same step under torch's default kernel choice."""
    from torch.profiler import ProfilerActivity, profile

    from collafuse.config import ModelConfig, TrainConfig
    from collafuse.split.learner import Learner
    from collafuse.split.models import build_unet

    cfg = ModelConfig(block_out_channels=[8, 16], norm_num_groups=4, mid_attention=True)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([3, 100, 500, 900])

    def grads(use_forward_mode: bool):
        lr = Learner(build_unet(cfg, None, seed=0), TrainConfig(precision=precision), torch.Generator(),
                     torch.Generator())
        lr.model.zero_grad()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            mode = lr.forward_mode() if use_forward_mode else torch.autocast(
                "cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            with mode:
                pred = lr.model(x, t).sample
            torch.nn.functional.mse_loss(pred.float(), eps).backward()
        ops = {e.key for e in prof.key_averages()}
        return [p.grad.clone() for p in lr.model.parameters()], ops

    ours, ops = grads(True)
    default, default_ops = grads(False)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in default_ops  # the kernel torch would pick...
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" not in ops  # ...is not the one we run
    ours, default = torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in default])
    tol = 1e-5 if precision == "fp32" else 5e-2  # fp32: reordered sums only; bf16: 8-bit mantissas
    assert (ours - default).abs().max() <= tol * default.abs().max()
