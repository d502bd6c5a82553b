"""Can a variant of the bf16 train step close the gap to 1.6x? channels_last, fused Adam and a foreach EMA, measured.

A probe for issue 10, part 1, beside benchmarks/throughput.py (the reference numbers). For the server and the client
UNet of configs/demo.toml (batch 64, 28x28, class-conditional) it times the train step of ``Learner.step`` spelled out
(autocast forward, fp32 MSE, backward, gradient clipping, Adam, diffusers EMA) in fp32 and then in bf16 autocast with
each combination of: channels_last memory format (model and batch), ``torch.optim.Adam(fused=True)``, and
``EMAModel(foreach=True)``. Each variant: 3 warm-up steps, then the median of ``--steps`` timed steps, in one
process. Prints ms per step and the speed-up over fp32. With ``--profile`` it then prints where the server's plain
bf16 step spends its time (torch.profiler, self CPU time per operator). A measurement, not a test.

    .venv/bin/python benchmarks/precision_variants.py --threads 2 --profile
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from collafuse.config import ModelConfig
from collafuse.models import build_unet


def step_ms(cfg: ModelConfig, bf16: bool, channels_last: bool, fused_adam: bool, ema_foreach: bool,
            steps: int, profile: bool = False) -> float:
    model = build_unet(cfg, 11, seed=0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused_adam or None)
    ema = EMAModel(model.parameters(), decay=0.999, foreach=ema_foreach)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g).contiguous(memory_format=fmt)
    target = torch.randn(64, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 10, (64,), generator=g)

    def one_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(x, t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.step(model.parameters())

    for _ in range(3):
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
    p.add_argument("--profile", action="store_true", help="then profile the server's bf16 step by operator")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    nodes = {"server": ModelConfig(block_out_channels=[32, 64, 64], mid_attention=True),
             "client": ModelConfig(block_out_channels=[16, 32, 32], mid_attention=False)}
    print(f"{torch.get_num_threads()} threads, batch 64; median ms per train step")
    print("| node | precision | channels_last | fused Adam | foreach EMA | ms/step | vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in nodes.items():
        fp32 = step_ms(cfg, False, False, False, False, a.steps)
        print(f"| {name} | fp32 | no | no | no | {fp32:.1f} | 1.00x |", flush=True)
        for cl, fused, foreach in itertools.product((False, True), repeat=3):
            ms = step_ms(cfg, True, cl, fused, foreach, a.steps)
            yes = {True: "yes", False: "no"}
            print(f"| {name} | bf16 | {yes[cl]} | {yes[fused]} | {yes[foreach]} | {ms:.1f} | {fp32 / ms:.2f}x |",
                  flush=True)
    if a.profile:
        print("\nserver, bf16 autocast, plain step: self CPU time per operator")
        step_ms(nodes["server"], True, False, False, False, a.steps, profile=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
