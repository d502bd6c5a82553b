"""Can a variant of the bf16 train step close the gap to 1.6x? Attention kernel, memory format, optimizer, EMA.

A probe for issue 10, part 1, beside benchmarks/throughput.py (the reference numbers). For the server and the client
UNet of configs/demo.toml (batch 64, 28x28, class-conditional) it times the train step of ``Learner.step`` spelled out
(forward, fp32 MSE, backward, gradient clipping, Adam, diffusers EMA) in fp32 and in bf16 with these variants:

* attention: torch's default SDPA kernel choice (the CPU flash kernel) or the math kernel (two bmm and a softmax),
  for the server's mid-block attention (the client has none);
* channels_last memory format (model and batch), alone or with GroupNorm computed in fp32 (bf16 GroupNorm on
  channels_last tensors has a slow CPU kernel);
* ``torch.optim.Adam(fused=True)`` and ``EMAModel(foreach=True)``;
* ``torch.compile`` (inductor), only with ``--compile NODE``;
* a bf16 working copy: the fp32 master weights copied into a bf16 model before each step, forward and backward
  wholly in bf16, the gradients cast back to fp32 for Adam (instead of autocast's per-operator casts).

Each variant: 3 warm-up steps, then the median of ``--steps`` timed steps, in one process. Prints ms per step and the
speed-up over fp32 with the default kernels. With ``--profile NODE`` it then prints where that node's bf16 step, as
``Learner`` runs it, spends its time (torch.profiler, self CPU time per operator). A measurement, not a test.

    .venv/bin/python benchmarks/precision_variants.py --threads 2 --profile server --profile client
    .venv/bin/python benchmarks/precision_variants.py --threads 2 --compile client   # + inductor, minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from collafuse.config import ModelConfig
from collafuse.split.models import build_unet


@dataclass(frozen=True)
class Variant:
    bf16: bool = True
    math_attention: bool = False
    channels_last: bool = False
    fp32_group_norm: bool = False
    fused_adam: bool = False
    foreach_ema: bool = False
    working_copy: bool = False  # bf16 model copy instead of autocast
    compiled: bool = False  # torch.compile (inductor) of the model; the first step's compile time is printed

    def label(self) -> str:
        parts = [name for name, on in (("math attention", self.math_attention), ("channels_last", self.channels_last),
                                       ("fp32 GroupNorm", self.fp32_group_norm), ("fused Adam", self.fused_adam),
                                       ("foreach EMA", self.foreach_ema), ("bf16 working copy", self.working_copy),
                                       ("torch.compile", self.compiled))
                 if on]
        return ("bf16" if self.bf16 else "fp32") + (" + " + ", ".join(parts) if parts else "")


VARIANTS = [
    Variant(bf16=False),
    Variant(bf16=False, math_attention=True),
    Variant(),
    Variant(math_attention=True),
    Variant(math_attention=True, fused_adam=True),
    Variant(math_attention=True, foreach_ema=True),
    Variant(math_attention=True, fused_adam=True, foreach_ema=True),
    Variant(math_attention=True, channels_last=True),
    Variant(math_attention=True, channels_last=True, fp32_group_norm=True),
    Variant(math_attention=True, working_copy=True),
]


class Fp32GroupNorm(torch.nn.GroupNorm):
    """GroupNorm whose statistics and output are computed in fp32, then cast back to the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def use_fp32_group_norm(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is torch.nn.GroupNorm:
            swapped = Fp32GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine)
            swapped.load_state_dict(child.state_dict())
            setattr(module, name, swapped)
        else:
            use_fp32_group_norm(child)


def step_ms(cfg: ModelConfig, v: Variant, steps: int, profile: bool = False) -> float:
    model = build_unet(cfg, 11, seed=0)
    if v.fp32_group_norm:
        use_fp32_group_norm(model)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    master = list(model.parameters())
    opt = torch.optim.Adam(master, lr=1e-3, fused=v.fused_adam or None)
    ema = EMAModel(master, decay=0.999, foreach=v.foreach_ema)
    work = copy.deepcopy(model).to(torch.bfloat16) if v.working_copy else None
    forward = torch.compile(model) if v.compiled else model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g).contiguous(memory_format=fmt)
    target = torch.randn(64, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 10, (64,), generator=g)

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        with sdpa_kernel(SDPBackend.MATH) if v.math_attention else contextlib.nullcontext():
            if work is not None:
                with torch.no_grad():
                    torch._foreach_copy_(list(work.parameters()), master)
                work.zero_grad(set_to_none=True)
                pred = work(x.to(torch.bfloat16), t, class_labels=y).sample
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=v.bf16):
                    pred = forward(x, t, class_labels=y).sample
            F.mse_loss(pred.float(), target).backward()
        if work is not None:
            for p, w in zip(master, work.parameters()):
                p.grad = w.grad.float()
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        opt.step()
        ema.step(master)

    t0 = time.perf_counter()
    one_step()
    if v.compiled:
        print(f"  (torch.compile: first step {time.perf_counter() - t0:.0f} s)", flush=True)
    for _ in range(2):
        one_step()
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                one_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return 0.0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant (default: %(default)s)")
    p.add_argument("--profile", choices=["server", "client"], action="append", default=[],
                   help="then profile NODE's adopted bf16 step by operator; repeatable")
    p.add_argument("--compile", choices=["server", "client"], action="append", default=[],
                   help="also time NODE's bf16 step with torch.compile (minutes of compiling); repeatable")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    nodes = {"server": ModelConfig(block_out_channels=[32, 64, 64], mid_attention=True),
             "client": ModelConfig(block_out_channels=[16, 32, 32], mid_attention=False)}
    print(f"{torch.get_num_threads()} threads, batch 64; median ms per train step")
    print("| node | variant | ms/step | vs fp32 |")
    print("|---|---|---|---|")
    for name, cfg in nodes.items():
        fp32, seen = None, set()
        extra = [Variant(math_attention=True, fused_adam=True, compiled=True)] if name in a.compile else []
        for v in VARIANTS + extra:
            if not cfg.mid_attention:  # no attention in this model: the kernel choice changes nothing
                v = dataclasses.replace(v, math_attention=False)
            if v in seen:
                continue
            seen.add(v)
            ms = step_ms(cfg, v, a.steps)
            fp32 = fp32 or ms
            print(f"| {name} | {v.label()} | {ms:.1f} | {fp32 / ms:.2f}x |", flush=True)
    for name in a.profile:
        print(f"\n{name}, bf16 autocast, math attention, fused Adam (as Learner runs it): self CPU time per operator")
        step_ms(nodes[name], Variant(math_attention=True, fused_adam=True), a.steps, profile=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
