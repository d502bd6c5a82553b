"""Training throughput of the split roles vs a plain diffusers training loop on the same UNet.

What is measured
----------------
For each node (the server and one client) two loops train the *same* UNet2DModel architecture (built by
``collafuse.split.models.build_unet`` from the node's model config) with the same batch size, image shape, Adam
learning rate, gradient clipping and diffusers ``EMAModel`` update:

* split: the node's own ``train_step()`` -- ``Server.train_step`` (relative-noise objective on the mixed client
  uploads, t > cut) or ``Client.train_step`` (DDPM on the client's images, t <= cut), both through ``Learner.step``.
* plain: the standard loop of diffusers' ``train_unconditional`` example -- random batch from an in-memory image
  tensor, t ~ U[0, T), noise = randn, ``DDPMScheduler.add_noise``, ``model(noisy, t, class_labels=y).sample``,
  MSE to the noise, backward, ``clip_grad_norm_``, ``optimizer.step``, ``zero_grad``, ``ema.step``.

The federation is the real one: ``Federation(cfg)`` on Fashion-MNIST with configs/demo.toml, and the server gets
its uploads through the in-process transport, exactly as in round 1 of a run. No training happens before the
benchmark besides the warm-up.

* precision: the split step runs once per ``--precisions`` entry (``train.precision``: fp32, or bf16 autocast with
  fp32 weights, Adam and EMA); the plain loop always runs in fp32, the baseline a user would start from.

Fairness: all loops of a node live in the same process and are warmed up first; then ``--blocks`` timed blocks
of ``--steps`` steps run, the loops in a rotated order in every block, so slow drift (thermal, other processes)
hits all alike. One untimed step precedes every block, so the cost of switching between the models' working sets
is charged to none. Reported: the median images/s of each loop, the split cost per image relative to the plain
loop, the speed-up of each split precision over the plain fp32 loop, and the achieved GFLOP/s (FLOPs of one step
counted by ``compute.count_flops``) against a matmul peak measured in the same run at that precision (2048^3
``torch.mm``).

How to run
----------
    ./run bench                                   # defaults: about 4-6 minutes on 2 CPU cores
    ./run bench --steps 20 --blocks 8 --threads 2 --precisions fp32,bf16
    .venv/bin/python benchmarks/throughput.py --device cuda

It is a measurement, not a test: it always exits 0 and only prints the numbers (targets: fp32 overhead <= 5%;
split training >= 1.6x the plain fp32 loop's img/s at the best precision, per node and for a whole round: the
server's steps and every client's, each at its node's measured rate).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # diffusers must never reach for the network here

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from collafuse.config import Config, ModelConfig, load_config  # noqa: E402
from collafuse.evaluation.compute import count_flops  # noqa: E402
from collafuse.split.diffusion import BETA_SCHEDULES  # noqa: E402
from collafuse.split.models import build_unet  # noqa: E402
from collafuse.split.protocol import SERVER, Message  # noqa: E402
from collafuse.split.runner import Federation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD_PCT = 5.0
CLIENT = 0  # the client whose train_step is measured (client0 of the demo: classes 0-3)


# -- the baseline -----------------------------------------------------------------------------------------------------
class PlainLoop:
    """The standard diffusers training step (train_unconditional example), class-conditional.

    Args:
        model_cfg (`ModelConfig`): the node's model config; the UNet comes from the same ``build_unet``.
        num_embeds (`int | None`): class-embedding table size of the node's model (same architecture).
        images (`torch.Tensor`): in-memory [N, C, H, W] training images, shaped like the node's own data.
        labels (`torch.Tensor`): [N] class labels for ``images``.
        cfg (`Config`): diffusion steps/schedule, batch size, lr, EMA decay and grad clip are taken from it.
        device (`torch.device`): where everything runs.
    """

    def __init__(self, model_cfg: ModelConfig, num_embeds: int | None, images: torch.Tensor, labels: torch.Tensor,
                 cfg: Config, device: torch.device):
        self.device = device
        self.model = build_unet(model_cfg, num_embeds, seed=0).to(device)
        self.model.train()
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size = cfg.train.batch_size
        self.grad_clip = cfg.train.grad_clip
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg.diffusion.timesteps,
                                       beta_schedule=BETA_SCHEDULES[cfg.diffusion.schedule])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.ema = EMAModel(self.model.parameters(), decay=cfg.train.ema_decay)
        # Labels go in only when the node's model has a class-embedding table, as the split node does it.
        self.conditional = num_embeds is not None

    def step(self) -> float:
        idx = torch.randint(0, len(self.images), (self.batch_size,), device=self.device)
        x0 = self.images[idx]
        y = self.labels[idx] if self.conditional else None
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.batch_size,), device=self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        pred = self.model(noisy, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.model.parameters())
        return loss.detach().item()  # the example logs the loss every step, as Learner.step returns it


# -- timing -----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for queued kernels so a block's wall time covers its own work only (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_block(step: Callable[[], float], steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step``. Garbage is collected beforehand so neither loop pays for the other."""
    gc.collect()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


PLAIN = "plain fp32"


@dataclass
class Result:
    node: str
    ips: dict[str, list[float]]  # loop name ("plain fp32", "split fp32", "split bf16") -> images/s per block
    flops_per_image: dict[str, float]  # loop name -> FLOPs of one training step / batch size

    def median(self, loop: str) -> float:
        return statistics.median(self.ips[loop])

    def cost_ratio(self, loop: str) -> float:
        """Cost per image of ``loop`` relative to plain fp32: plain throughput / its throughput (medians)."""
        return self.median(PLAIN) / self.median(loop)

    def block_ratios(self, loop: str) -> list[float]:
        """The same ratio within each block: its spread shows how much of the difference is noise."""
        return [p / s for s, p in zip(self.ips[loop], self.ips[PLAIN])]


def compare(node: str, loops: dict[str, Callable[[], float]], args, device: torch.device,
            flops_per_image: dict[str, float]) -> Result:
    """Warm every loop up, then time blocks in which each loop runs once, the order rotated from block to block."""
    images_per_block = args.steps * args.batch_size
    for step in loops.values():
        timed_block(step, args.warmup, device)
    result = Result(node, {name: [] for name in loops}, flops_per_image)
    names = list(loops)
    for b in range(args.blocks):
        for name in names[b % len(names):] + names[: b % len(names)]:
            loops[name]()  # untimed: the switch from another loop's model (cold caches) is not this loop's cost
            seconds = timed_block(loops[name], args.steps, device)
            result.ips[name].append(images_per_block / seconds)
        print(f"  {node} block {b + 1}/{args.blocks}: "
              + ", ".join(f"{n} {result.ips[n][-1]:7.1f} img/s" for n in names), flush=True)
    return result


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n^3 matrix product at ``dtype`` (best of ``reps``): the ceiling the training steps are read
    against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def with_precision(learner, precision: str, step: Callable[[], float]) -> Callable[[], float]:
    """``step`` run with the node's Learner set to ``precision`` (what ``train.precision`` resolves to)."""

    def run() -> float:
        learner.precision = precision
        return step()

    return run


# -- setup ------------------------------------------------------------------------------------------------------------
def build_federation(args) -> Federation:
    overrides = [f"run.device={args.device!r}", f"run.threads={args.threads}", f"train.batch_size={args.batch_size}"]
    fed = Federation(load_config(args.config, overrides))
    # The server trains only on uploads: request them through the transport, as round 1 of a run does.
    for c in fed.clients:
        fed.server.handle(fed.transport.request(Message("upload_request", SERVER, c.node_id, meta={"round": 1})))
    return fed


def print_table(results: list[Result], peaks: dict[str, float]) -> None:
    print()
    print("matmul peak (2048^3 torch.mm, best of 5): "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()))
    print(f"{'node':<8} {'loop':<11} {'median img/s':>13} {'min':>8} {'max':>8} {'GFLOP/s':>8} {'of peak':>8}")
    for r in results:
        for name, ips in r.ips.items():
            gflops = r.median(name) * r.flops_per_image[name] / 1e9
            peak = peaks[name.split()[-1]]
            print(f"{r.node:<8} {name:<11} {r.median(name):13.1f} {min(ips):8.1f} {max(ips):8.1f} {gflops:8.1f} "
                  f"{gflops / peak:8.0%}")
    print()
    for r in results:
        for name in r.ips:
            if name == PLAIN:
                continue
            ratios = r.block_ratios(name)
            print(f"{r.node}: {name} / plain fp32: cost per image {r.cost_ratio(name):.3f} "
                  f"(per block {min(ratios):.3f} .. {max(ratios):.3f}), speed-up {1 / r.cost_ratio(name):.2f}x")
    for r in results:
        if "split fp32" in r.ips:
            print(f"{r.node}: split fp32 costs {(r.cost_ratio('split fp32') - 1) * 100:+.1f}% per image vs the plain "
                  f"diffusers loop (target <= {TARGET_OVERHEAD_PCT:g}%)")


def print_round(results: list[Result], cfg: Config) -> None:
    """The whole of split training: one round of ``cfg`` (the server's steps, then every client's), each step at its
    node's median throughput, against the same round of plain fp32 steps."""
    server, client = results
    steps = {"server": cfg.train.server_steps, "clients": cfg.data.num_clients * cfg.train.client_steps}

    def round_seconds(loop: str) -> float:
        per_step = cfg.train.batch_size
        return steps["server"] * per_step / server.median(loop) + steps["clients"] * per_step / client.median(loop)

    print(f"\none round of the config ({steps['server']} server steps + {steps['clients']} client steps, "
          f"{cfg.data.num_clients} clients x {cfg.train.client_steps}):")
    for loop in server.ips:
        print(f"  {loop}: {round_seconds(loop):.2f} s, speed-up {round_seconds(PLAIN) / round_seconds(loop):.2f}x "
              f"over plain fp32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "demo.toml"), help="run config (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="training steps per timed block (default: %(default)s)")
    p.add_argument("--blocks", type=int, default=6,
                   help="timed blocks per loop, interleaved split/plain; even is balanced (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per loop first (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: the config's train.batch_size)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads; 0 keeps torch's default (default: 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    p.add_argument("--precisions", default="fp32,bf16",
                   help="split-step precisions to time, comma-separated fp32/bf16 (default: %(default)s)")
    args = p.parse_args(argv)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    if not args.precisions or any(s not in ("fp32", "bf16") for s in args.precisions):
        p.error(f"--precisions = {','.join(args.precisions)!r} is invalid (allowed: a comma-separated list of fp32, "
                f"bf16)")
    if args.batch_size is None:
        args.batch_size = load_config(args.config).train.batch_size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fed = build_federation(args)
    cfg, server, client = fed.cfg, fed.server, fed.clients[CLIENT]

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.blocks} blocks x {args.steps} steps (+{args.warmup} warm-up) per loop")
    print(f"config {args.config}: T={cfg.diffusion.timesteps}, cut={cfg.cut}, "
          f"server uploads {len(server.pool()[0])} images, {client.node_id} {len(client.data.train_x)} images")

    # Plain baselines: same architecture and the same data tensor shapes as each node trains on. The server's
    # plain loop runs on the clients' real images (the shape of the upload pool); the client's on its own images.
    all_x = torch.cat([c.data.train_x for c in fed.clients])
    all_y = torch.cat([c.data.train_y for c in fed.clients])
    plain_server = PlainLoop(cfg.server_model, server.labels.num_embeds, all_x, all_y, cfg, device)
    plain_client = PlainLoop(cfg.client_model, client.labels.num_embeds, client.data.train_x, client.data.train_y,
                             cfg, device)

    peaks = {p: matmul_peak(device, {"fp32": torch.float32, "bf16": torch.bfloat16}[p])
             for p in dict.fromkeys(["fp32", *args.precisions])}
    results = []
    for node, role, plain in ((SERVER, server, plain_server), (client.node_id, client, plain_client)):
        loops = {PLAIN: plain.step}
        loops.update({f"split {p}": with_precision(role.learner, p, role.train_step) for p in args.precisions})
        flops = {name: count_flops(step)["total"] / args.batch_size for name, step in loops.items()}
        print(f"\n{node}:", flush=True)
        results.append(compare(node, loops, args, device, flops))
    print_table(results, peaks)
    print_round(results, cfg)
    return 0  # a measurement: the numbers are the result, never the exit code


if __name__ == "__main__":
    sys.exit(main())
