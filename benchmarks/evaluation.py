"""Cost of evaluating 1,000 samples per client with the default (offline classifier) extractor.

What is measured
----------------
The metric stages of ``collafuse evaluate`` -- ``fidelity_section`` (FID + KID against the client's train and
held-out test images, the overall FID/KID, the predicted-label histogram) and ``disclosure_section`` (linkage in
a pool of 10,000, reconstruction by rescaling / empirical-Bayes Tweedie / the server's own model, averaging,
the paper's MSE proxies on uploads and hand-offs) -- on ``--n`` samples per client, for every client of the
federation in ``--run`` (default ``runs/demo``, trained by ``./run demo``; an untrained federation from
configs/demo.toml when that directory is missing: the cost does not depend on the weights).

The samples are stand-ins of the right shape: real held-out images of the client's classes as x0 and their
noised views at the cut as the hand-offs x_cut. Metric cost does not depend on image content, and this keeps the
benchmark about evaluation, not about sampling. Sampling is timed separately on ``--sample-n`` real samples from
the run's models and reported per image, because generating 1,000 samples per client is the run's cost (it is
cached in RUN_DIR/eval/ and paid once).

The classifier extractor is trained once and cached (~1 minute on 2 cores); the script loads it first, untimed
when the cache is warm and reported separately when it was cold.

How to run
----------
    .venv/bin/python benchmarks/evaluation.py                 # about 1-2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/evaluation.py --run runs/mine --n 1000 --threads 2

It is a measurement, not a test: it prints the numbers and the ratio to the 2-minute target, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from collafuse.config import load_config  # noqa: E402
from collafuse.evaluation.evaluate import disclosure_section, fidelity_section  # noqa: E402
from collafuse.evaluation.features import get_extractor  # noqa: E402
from collafuse.split.runner import Federation, load_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 120.0  # issue 3: 1,000 samples per client evaluated in at most 2 minutes on 2 cores


def stand_in_samples(fed: Federation, n: int) -> dict[int, dict[str, torch.Tensor]]:
    """n real images per client (test split first, then train) and their noised views at the cut."""
    abar = float(fed.server.schedule.alpha_bar[fed.cfg.cut])
    out = {}
    for c in fed.clients:
        x = torch.cat([c.data.test_x, c.data.train_x])[:n]
        y = torch.cat([c.data.test_y, c.data.train_y])[:n]
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(c.index))
        out[c.index] = {"x0": x, "y": y, "x_cut": abar**0.5 * x + (1 - abar) ** 0.5 * eps}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="trained run directory")
    p.add_argument("--n", type=int, default=1000, help="samples per client")
    p.add_argument("--sample-n", type=int, default=32, help="real samples generated to time sampling per image")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    if (a.run / "checkpoints" / "LATEST").is_file():
        fed, source = load_run(a.run, [f"eval.n_samples={a.n}"]), f"trained run {a.run}"
    else:
        fed = Federation(load_config(REPO / "configs" / "demo.toml", [f"eval.n_samples={a.n}"]))
        source = "untrained federation from configs/demo.toml"
    fed.set_progress(False)
    cfg = fed.cfg
    print(f"federation: {source}; cut {cfg.cut}; {len(fed.clients)} clients; {a.n} samples per client; "
          f"n_real {cfg.eval.n_real}; disclosure_n {cfg.eval.disclosure_n}; distractors {cfg.eval.distractors}; "
          f"torch threads {torch.get_num_threads()}")

    t = time.perf_counter()
    extractor = get_extractor("classifier", cache_dir=cfg.eval.cache_dir or None, data_root=cfg.data.root)
    load_s = time.perf_counter() - t
    print(f"classifier extractor ready in {load_s:.1f} s (includes training only when the cache was cold); "
          f"test accuracy {extractor.info.get('test_accuracy')}")

    samples = stand_in_samples(fed, a.n)
    t = time.perf_counter()
    fidelity_section(fed, samples, extractor, extractor)
    fid_s = time.perf_counter() - t
    t = time.perf_counter()
    disclosure_section(fed, samples)
    dis_s = time.perf_counter() - t
    k = len(fed.clients)
    per_client = (fid_s + dis_s) / k
    print(f"fidelity (FID+KID vs train and test, overall, label histogram): {fid_s:.2f} s = {fid_s / k:.2f} s/client")
    print(f"disclosure (linkage, reconstruction, averaging, proxies):       {dis_s:.2f} s = {dis_s / k:.2f} s/client")
    print(f"evaluation of {a.n} samples per client: {per_client:.2f} s/client, "
          f"{per_client / TARGET_SECONDS:.3f} of the {TARGET_SECONDS:.0f} s target")

    if a.sample_n:
        t = time.perf_counter()
        fed.sample(0, a.sample_n, fed.clients[0].stream("bench", cfg.seeds.sample))
        per_img = (time.perf_counter() - t) / a.sample_n
        print(f"sampling ({cfg.sample.sampler.upper()}-{cfg.sample.ddim_steps}, cut {cfg.cut}): {per_img:.3f} s/image "
              f"over {a.sample_n} images; generating {a.n} would take about {per_img * a.n:.0f} s per client "
              f"(extrapolated; paid once, cached in RUN_DIR/eval/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
