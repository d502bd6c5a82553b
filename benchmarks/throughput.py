"""Training throughput of the split roles vs a plain diffusers training loop on the same UNet.

What is measured
----------------
For each node (the server and one client) two loops train the *same* UNet2DModel architecture (built by
``collafuse.models.build_unet`` from the node's model config) with the same batch size, image shape, Adam
learning rate, gradient clipping and diffusers ``EMAModel`` update:

* split: the node's own ``train_step()`` -- ``Server.train_step`` (relative-noise objective on the mixed client
  uploads, t > cut) or ``Client.train_step`` (DDPM on the client's images, t <= cut), both through ``Learner.step``.
* plain: the standard loop of diffusers' ``train_unconditional`` example -- random batch from an in-memory image
  tensor, t ~ U[0, T), noise = randn, ``DDPMScheduler.add_noise``, ``model(noisy, t, class_labels=y).sample``,
  MSE to the noise, backward, ``clip_grad_norm_``, ``optimizer.step``, ``zero_grad``, ``ema.step``.

The federation is the real one: ``Federation(cfg)`` on Fashion-MNIST with configs/demo.toml, and the server gets
its uploads through the in-process transport, exactly as in round 1 of a run. No training happens before the
benchmark besides the warm-up.

Fairness: both loops of a node live in the same process and are warmed up first; then ``--blocks`` timed blocks
of ``--steps`` steps run, alternating split/plain and swapping which goes first in every other block, so slow drift
(thermal, other processes) hits both alike. One untimed step precedes every block, so the cost of switching between
the two models' working sets is charged to neither. Reported: the median images/s of each loop, and the split cost
per image relative to the plain loop, plain_throughput / split_throughput (overhead = that ratio - 1).

How to run
----------
    ./run bench                                   # defaults: about 2-4 minutes on 2 CPU cores
    ./run bench --steps 20 --blocks 8 --threads 2
    .venv/bin/python benchmarks/throughput.py --device cuda

It is a measurement, not a test: it always exits 0 and only prints the numbers (target: overhead <= 5%).
"""

from __future__ import annotations

import argparse
import gc
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
from collafuse.diffusion import BETA_SCHEDULES  # noqa: E402
from collafuse.models import build_unet  # noqa: E402
from collafuse.protocol import SERVER, Message  # noqa: E402
from collafuse.runner import Federation  # noqa: E402

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


@dataclass
class Result:
    node: str
    split_ips: list[float]  # images/s per block
    plain_ips: list[float]

    @property
    def cost_ratio(self) -> float:
        """Split cost per image relative to plain: plain throughput / split throughput (medians)."""
        return statistics.median(self.plain_ips) / statistics.median(self.split_ips)

    @property
    def block_ratios(self) -> list[float]:
        """The same ratio within each block: its spread shows how much of the overhead is noise."""
        return [p / s for s, p in zip(self.split_ips, self.plain_ips)]

    @property
    def overhead_pct(self) -> float:
        return (self.cost_ratio - 1.0) * 100.0


def compare(node: str, split_step: Callable[[], float], plain_step: Callable[[], float], args,
            device: torch.device) -> Result:
    """Warm both loops up, then time interleaved blocks, alternating which loop goes first (an even number of
    blocks gives each loop the first slot equally often)."""
    images_per_block = args.steps * args.batch_size
    for step in (split_step, plain_step):
        timed_block(step, args.warmup, device)
    result = Result(node, [], [])
    for b in range(args.blocks):
        order = [("split", split_step), ("plain", plain_step)]
        if b % 2:
            order.reverse()
        for name, step in order:
            step()  # untimed: the switch from the other loop's model (cold caches) is not either loop's cost
            seconds = timed_block(step, args.steps, device)
            getattr(result, f"{name}_ips").append(images_per_block / seconds)
        print(f"  {node} block {b + 1}/{args.blocks}: split {result.split_ips[-1]:7.1f} img/s, "
              f"plain {result.plain_ips[-1]:7.1f} img/s", flush=True)
    return result


# -- setup ------------------------------------------------------------------------------------------------------------
def build_federation(args) -> Federation:
    overrides = [f"run.device={args.device!r}", f"run.threads={args.threads}", f"train.batch_size={args.batch_size}"]
    fed = Federation(load_config(args.config, overrides))
    # The server trains only on uploads: request them through the transport, as round 1 of a run does.
    for c in fed.clients:
        fed.server.handle(fed.transport.request(Message("upload_request", SERVER, c.node_id, meta={"round": 1})))
    return fed


def print_table(results: list[Result]) -> None:
    print()
    print(f"{'node':<8} {'loop':<6} {'median img/s':>13} {'min':>8} {'max':>8}")
    for r in results:
        for name, ips in (("split", r.split_ips), ("plain", r.plain_ips)):
            print(f"{r.node:<8} {name:<6} {statistics.median(ips):13.1f} {min(ips):8.1f} {max(ips):8.1f}")
    print()
    for r in results:
        ratios = r.block_ratios
        print(f"{r.node}: split/plain cost per image = {r.cost_ratio:.3f} "
              f"(per block: {min(ratios):.3f} .. {max(ratios):.3f})")
    for r in results:
        print(f"{r.node}: split costs {r.overhead_pct:+.1f}% per image vs plain diffusers loop "
              f"(target <= {TARGET_OVERHEAD_PCT:g}%)")


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
    args = p.parse_args(argv)
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

    results = []
    for node, split_step, plain in ((SERVER, server.train_step, plain_server),
                                    (client.node_id, client.train_step, plain_client)):
        print(f"\n{node}:", flush=True)
        results.append(compare(node, split_step, plain.step, args, device))
    print_table(results)
    return 0  # a measurement: the numbers are the result, never the exit code


if __name__ == "__main__":
    sys.exit(main())
