"""What the diffusers export costs on a trained run: the folder's size and the time to write it, and the time of
CollaFusePipeline's sampling against the project's own sampler (``Federation.sample(..., seed=S)``, what ``collafuse
sample --seed S`` runs) for the same images, in one process, alternating, so both see the same machine.

Usage: ``.venv/bin/python benchmarks/export_cost.py RUN_DIR [--client 0] [--n 64] [--repeats 3]``
(RUN_DIR: a directory written by ``collafuse run``, e.g. ``runs/demo``). Prints the ratio; the bar is <= 1.05x.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from collafuse.export import CollaFusePipeline, export_run
from collafuse.split.runner import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--n", type=int, default=64, help="images per timing (one sampling batch by default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        info = export_run(args.run_dir, Path(tmp) / "export")
        print(f"export: {info['bytes'] / 2**20:.2f} MiB ({', '.join(info['components'])}) in {info['seconds']:.2f} s "
              f"(the run loaded from its checkpoint included)")
        pipe = CollaFusePipeline.from_pretrained(Path(tmp) / "export")
    pipe.set_progress_bar_config(disable=True)
    fed = load_run(args.run_dir)
    fed.set_progress(False)
    labels = fed.clients[args.client].sample_labels(args.n)
    ours, theirs = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        a = fed.sample(args.client, args.n, labels=labels, seed=r)["x0"]
        t1 = time.perf_counter()
        b = pipe(client=args.client, class_labels=labels.tolist(), generator=torch.Generator().manual_seed(r),
                 output_type="pt").images
        t2 = time.perf_counter()
        if not torch.equal(a, b):
            raise SystemExit(f"repeat {r}: the pipeline's images differ from the project's sampler's")
        ours.append(t1 - t0)
        theirs.append(t2 - t1)
    mo, mp = statistics.median(ours), statistics.median(theirs)
    print(f"sampling {args.n} images of client {args.client} ({fed.cfg.sample.sampler}, {fed.cfg.sample.ddim_steps} "
          f"steps, torch threads {torch.get_num_threads()}), median of {args.repeats}: collafuse sample {mo:.2f} s, "
          f"CollaFusePipeline {mp:.2f} s, ratio {mp / mo:.3f}x (bar <= 1.05x); the same tensors every repeat")


if __name__ == "__main__":
    main()
