"""What a client computes and sends under CollaFuse (per cut) and under the FedAvg baseline, for one config.

Per client, from `collafuse.evaluation.compute.run_accounting` (FLOPs counted by torch's FlopCounterMode on the real
models) and from the message sizes: FedAvg sends the whole model (P float32 weights) down and up every round, plus one
last push of the final average; CollaFuse sends each training image's noised view (C x H x W float32 + an int64 label)
once, and nothing per round but a few bytes of metadata. Image counts come from the config's own partition. A table, not
a test (tests/split/test_fedavg.py checks that the logged bytes of a weights message are 4 P).

    .venv/bin/python benchmarks/fedavg_cost.py --config configs/quality.toml --cuts 0,200,1000
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from collafuse.config import load_config
from collafuse.data.partition import load_client_datasets
from collafuse.evaluation.compute import measure_node_flops, run_accounting

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "quality.toml"))
    p.add_argument("--cuts", default="0,200,1000", help="CollaFuse cuts to compare (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], help="config overrides, KEY=VALUE")
    a = p.parse_args()
    base = load_config(Path(a.config), a.set)
    rounds = base.train.rounds
    images = [len(c.train_y) for c in load_client_datasets(base.data, base.num_classes, base.seeds.data)]
    per_image_upload = math.prod(base.image_shape) * 4 + 8  # x_cut float32 + y int64
    print(f"{a.config}: {rounds} rounds, K = {base.train.client_steps} client steps per round, "
          f"training images per client {images}")
    print("| run | client params | client training FLOPs per round | client FLOPs per generated image "
          "| bytes per round, each way, per client | training bytes over the run, client 0 (up / down) |")
    print("|---|---|---|---|---|---|")
    for label, overrides in [*((f"CollaFuse, cut {c}", [f"split.cut={c}"]) for c in map(int, a.cuts.split(","))),
                             ("FedAvg", ["split.algorithm=fedavg"])]:
        cfg = load_config(Path(a.config), [*a.set, *overrides])
        acc = run_accounting(cfg, measure_node_flops(cfg))
        client = acc["training"]["client"]
        params = acc["per_step"]["client"]["params"]
        if cfg.split.algorithm == "fedavg":
            weights = 4 * params
            per_round, up, down = f"{weights:,} (the model)", rounds * weights, (rounds + 1) * weights
        else:
            sends = cfg.cut < cfg.diffusion.timesteps  # at cut = T nothing crosses
            per_round = "0 (one upload, round 1)" if sends else "0"
            up, down = (images[0] * per_image_upload if sends else 0), 0
        print(f"| {label} | {params:,} | {client['flops'] / rounds:.3e} | "
              f"{acc['sampling_per_image']['client']['flops']:.3e} | {per_round} | {up:,} / {down:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
