"""``collafuse evaluate RUN_DIR``: the paper's three claims measured on one trained run.

- fidelity: FID/KID of each client's samples against its own train and held-out test images (and its left-out
  validation images under a data-size cap), and over all clients, with a pluggable feature extractor;
  predicted-label histograms against the client's class mix;
- memorisation: the share of samples that copy a training image and the nearest-neighbour ratio
  (collafuse.evaluation.memorisation);
- disclosure: what the server could learn from the uploads and its sampling hand-offs (collafuse.evaluation.disclosure);
- compute: exact FLOPs per node and phase (collafuse.evaluation.compute), measured wall time, an energy estimate;
- communication: bytes per client from the run's message log (collafuse.evaluation.communication).

Everything goes to ``RUN_DIR/evaluation.json``; generated samples are cached in ``RUN_DIR/eval/`` keyed by everything
that changes them (the checkpoint's files, every ``[sample]`` setting, the sampling seed, client and n:
``sample_cache_key``), so a re-evaluation (or a resumed sweep) does not sample again, and a changed setting never
scores stale samples.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import Config, ConfigError
from ..split.checkpoint import latest_checkpoint, write_text_atomic
from ..split.models import client_model_config
from ..split.protocol import SERVER
from ..split.runner import Federation, load_run
from ..split.seeding import generator
from .accounting import upload_privacy
from .communication import communication_summary
from .compute import estimate_energy, make_train_step, measure_node_flops, run_accounting, sampling_steps
from .disclosure import disclosure_report
from .features import cached_features, get_extractor
from .fidelity import check_image_set, compare_label_mix, extract_features, fid_kid, fid_kid_from_features
from .memorisation import memorisation


def sample_cache_key(fed: Federation, run_dir: Path, client: int, n: int) -> dict:
    """Everything that changes a client's evaluation samples: the exact weights (sha256 of every node file of the
    latest checkpoint), every ``[sample]`` setting that reaches the samplers (sampler, steps, guidance, EMA, batch
    size, and whatever is added there later), the sampling seed, the client and n; and the sampler's timestep grid
    itself, so samples drawn before a change of how the grid is built are never scored as the new grid's."""
    ckpt = getattr(fed, "restored_from", None) or latest_checkpoint(run_dir / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    # server_grid_factor only when set: samples cached before the option keep their key
    sample = {k: v for k, v in fed.cfg.sample.model_dump().items()
              if k != "n_per_client" and not (k == "server_grid_factor" and v == 1)}
    return {"client": client, "n": n, "checkpoint": ckpt.name, "node_files": state["files"], "sample": sample,
            "sample_seed": fed.cfg.seeds.sample, "timesteps": sampling_grid(fed.clients[client].cfg)["timesteps"]}


def sampling_grid(cfg: Config) -> dict:
    """The sampler's timestep grid (diffusers indices, sampling order: the server's steps, then the client's)."""
    server, client = sampling_steps(cfg)
    return {"sampler": cfg.sample.sampler, "timesteps": server + client, "server_steps": len(server),
            "client_steps": len(client)}


def generated_samples(fed: Federation, run_dir: Path, client: int, n: int) -> dict[str, torch.Tensor]:
    """n samples of one client: from the cache when it was made with exactly this key (`sample_cache_key`),
    else sampled now and cached under the key's hash (so ``--set sample.sampler=ddpm`` never scores DDIM samples)."""
    key = sample_cache_key(fed, run_dir, client, n)
    text = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache = run_dir / "eval" / f"samples_client{client}_n{n}_{digest}.safetensors"
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("key") == text:
                return load_file(str(cache))
    out = fed.sample(client, n, fed.clients[client].stream("eval", fed.cfg.seeds.sample))  # client-side secret stream
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp), metadata={"key": text})
    tmp.replace(cache)
    return out


def sample_fids(fed: Federation, n: int, extractor, *stream: object, n_real: int = 2000) -> tuple[dict, float]:
    """The benchmarks' quick score: FID of ``n`` fresh samples per client (drawn through the real split with
    ``fed.cfg.sample``'s sampler, from the client's secret stream named ``stream``) against the client's first
    ``n_real`` held-out images; returns ``{node_id: fid}`` and the seconds spent sampling (not scoring). Nothing is
    cached: `collafuse evaluate` is the cached, fuller report."""
    fids, seconds = {}, 0.0
    for c in fed.clients:
        t0 = time.perf_counter()
        x0 = fed.sample(c.index, n, c.stream(*stream))["x0"]
        seconds += time.perf_counter() - t0
        fids[c.node_id] = fid_kid(c.data.test_x[:n_real], x0, extractor)["fid"]
    return fids, seconds


def real_subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n of the images (all when n = 0 or n >= len), drawn without replacement by ``seed``: evaluation's real sets
    (seed = client index for train images, 100 + index for held-out images, 200 + index for distractors)."""
    if n == 0 or n >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def fidelity_section(fed: Federation, samples: dict[int, dict], extractor, classifier) -> dict:
    cfg = fed.cfg
    per_client, all_fake, all_real = {}, [], []

    def features(x: torch.Tensor, what: str) -> torch.Tensor:
        check_image_set(x, what)
        if what == "real":  # the same real sets recur across a sweep's runs: their features are cached on disk
            return cached_features(x, extractor, cfg.eval.cache_dir or None)
        return extract_features(x, extractor)

    # Each set goes through the extractor once (with Inception that is half the time of scoring pair by pair).
    for c in fed.clients:
        fake = samples[c.index]["x0"]
        train_x, train_y = real_subset(c.data.train_x, c.data.train_y, cfg.eval.n_real, seed=c.index)
        test_x, test_y = real_subset(c.data.test_x, c.data.test_y, cfg.eval.n_real, seed=100 + c.index)
        fake_f, train_f = features(fake, "fake"), features(train_x, "real")
        test_f = features(test_x, "real") if len(test_x) > 1 else None
        val_f = None
        if c.data.val_images is not None and len(c.data.val_y) > 1:  # the client's left-out images (a data-size cap)
            val_x, _ = real_subset(c.data.val_x, c.data.val_y, cfg.eval.n_real, seed=300 + c.index)
            val_f = features(val_x, "real")
        per_client[c.node_id] = {
            "vs_train": fid_kid_from_features(train_f, fake_f, extractor),
            "vs_test": fid_kid_from_features(test_f, fake_f, extractor) if test_f is not None else None,
            # validation: chooses a training curve's best point without touching the FID reference (vs_test)
            "vs_val": fid_kid_from_features(val_f, fake_f, extractor) if val_f is not None else None,
            "n_real": {"train": len(train_x), "test": len(test_x), "val": 0 if val_f is None else len(val_f)},
            # requested: the labels the samples were drawn for, so a right histogram of wrong labels shows
            "label_mix": compare_label_mix(fake, classifier, c.data.train_y, cfg.num_classes,
                                           requested=samples[c.index]["y"]
                                           if client_model_config(c.cfg).condition_on_class else None),
        }
        all_fake.append(fake_f)
        all_real.append(test_f if test_f is not None else train_f)
    overall = fid_kid_from_features(torch.cat(all_real), torch.cat(all_fake), extractor)
    return {"per_client": per_client, "overall_vs_test": overall}


def memorisation_section(fed: Federation, samples: dict[int, dict]) -> dict:
    """Per client: does it copy its training images (`collafuse.evaluation.memorisation`), on the FID samples,
    against every training image of the client and its held-out split."""
    return {c.node_id: memorisation(samples[c.index]["x0"], c.data.train_x, c.data.test_x, seed=400 + c.index)
            for c in fed.clients}


def disclosure_section(fed: Federation, samples: dict[int, dict]) -> dict:
    cfg, server = fed.cfg, fed.server
    if cfg.split.algorithm == "fedavg":  # no image view crosses; what does (weights) is out of these attacks' scope
        return {"skipped": "fedavg: no image or noised view crosses; the server holds every client's weights after "
                           "every round (gradient and weight inversion are out of scope, not shown to be safe)"}
    if not server.trains:
        return {"skipped": f"cut = T = {cfg.diffusion.timesteps}: nothing crosses, the server learns nothing"}
    # With fresh noise per round the server has received one view per round: the averaging attack at K = rounds is
    # then what it could actually do, not a what-if.
    views = fed.history.rounds_done if cfg.split.fresh_upload_noise else 1
    ks = tuple(sorted({*cfg.eval.averaging_ks, views}))
    out = {"views_per_image": views, "fresh_upload_noise": cfg.split.fresh_upload_noise}
    for c in fed.clients:
        abar = float(server.schedule.alpha_bar[c.cut])  # each client at its own cut (c.cfg: its [[clients]] view)
        n = min(cfg.eval.disclosure_n, len(c.data.train_y))
        uploads, labels = c.upload()
        # Distractors: every other image the project holds (other clients' train sets, all test sets).
        others = [d for d in fed.clients if d is not c]
        pool_x = torch.cat([c.data.test_x, *[d.data.train_x for d in others], *[d.data.test_x for d in others]])
        pool_y = torch.cat([c.data.test_y, *[d.data.train_y for d in others], *[d.data.test_y for d in others]])
        pool_x, pool_y = real_subset(pool_x, pool_y, max(0, cfg.eval.distractors - n), seed=200 + c.index)
        out[c.node_id] = disclosure_report(
            c.data.batch(torch.arange(n)), uploads[:n], abar, labels=labels[:n], server=server, client=c.index,
            distractors=pool_x, distractor_labels=pool_y, ks=ks,
            x_cut=samples[c.index]["x_cut"], x_cut_labels=samples[c.index]["y"],
            generator=generator(cfg.seeds.sample, "disclosure", c.index),
            node_id=c.node_id, shared_seeds=list(cfg.seeds.model_dump().values()), all_uploads=uploads,
            clip_norm=cfg.split.upload_clip_norm,
        )
        # The formal guarantee of the same upload: per image, delta = 1 / (this client's training images).
        out[c.node_id]["formal"] = upload_privacy(abar, int(c.data.train_images[0].numel()), len(c.data.train_y), views,
                                                  cfg.split.upload_clip_norm)
        out[c.node_id]["cut"] = c.cut
    return out


def compute_section(fed: Federation, run_dir: Path) -> dict:
    cfg = fed.cfg
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    node_flops = measure_node_flops(cfg)
    done = fed.history.rounds_done
    at_checkpoint = run_accounting(cfg.model_copy(update={"train": cfg.train.model_copy(update={"rounds": done})}),
                                   node_flops)["training"]
    section = {
        "flops": run_accounting(cfg, node_flops),
        "per_client": per_client_accounting(fed, node_flops),
        # what was spent up to the evaluated checkpoint (a point of the training curve; issue 28): equal-compute
        # comparisons interpolate FID over these, not over the configured budget
        "training_to_checkpoint": {"rounds": done, "server_flops": at_checkpoint["server"]["flops"],
                                   "client_flops": at_checkpoint["client"]["flops"],
                                   "total_flops": at_checkpoint["total_flops"]},
        "measured_train_seconds": metrics.get("train_seconds"),
        "measured_sample_seconds": metrics.get("sample_seconds"),
    }
    if cfg.eval.energy_steps:
        energy = {}
        for node, trains in (("server", fed.server.trains), ("client", fed.clients[0].trains)):
            if not trains:
                continue
            step = make_train_step(cfg, node)
            est = estimate_energy(lambda step=step: [step() for _ in range(cfg.eval.energy_steps)],
                                  cfg.eval.energy_country)
            est["steps_measured"] = cfg.eval.energy_steps
            if est.get("energy_kwh") is not None:
                steps = cfg.train.rounds * (cfg.train.server_steps if node == "server" else cfg.train.client_steps)
                est["run_energy_kwh_estimate"] = est["energy_kwh"] / cfg.eval.energy_steps * steps
            energy[node] = est
        section["energy"] = energy
    return section


def per_client_accounting(fed: Federation, shared_flops: dict) -> dict:
    """Each client's compute at its own cut, model, batch size and steps ([[clients]]): training FLOPs per round and
    over the run, and sampling FLOPs per image on its side and on the server's (the server's steps stop at the
    client's cut). Clients with the shared values reuse the shared measurement."""
    cfg, out = fed.cfg, {}
    for c in fed.clients:
        view = c.cfg
        flops = measure_node_flops(view) if cfg.clients and cfg._differs(c.index) else shared_flops
        acc = run_accounting(view, flops)
        steps_per_round = view.train.client_steps if c.trains else 0
        out[c.node_id] = {
            "cut": c.cut,
            "client_params": acc["per_step"]["client"].get("params"),
            "batch_size": view.train.batch_size,
            "client_steps_per_round": steps_per_round,
            "train_flops_per_round": steps_per_round * acc["per_step"]["client"]["train_step"],
            "train_flops_per_image_per_round": steps_per_round * acc["per_step"]["client"]["train_step"]
            / max(len(c.data.train_y), 1),
            "train_flops": acc["training"]["client"]["flops"],
            "sampling_per_image": acc["sampling_per_image"],
        }
    return out


def classifier_arrays(cfg: Config) -> dict | None:
    """What the classifier extractor trains on: None for Fashion-MNIST at its native size (its IDX folder, the cache
    key every committed number used), else the configured dataset's train and test splits (labelled data only)."""
    if cfg.data.dataset == "fashion-mnist" and cfg.image_shape == (1, 28, 28):
        return None
    if cfg.num_classes < 2:
        raise ConfigError(f"data.dataset = {cfg.data.dataset!r} has no labels, so eval.extractor = 'classifier' and "
                          f"the label histograms cannot be computed (allowed: a labelled dataset; for unlabelled data "
                          f"use eval.extractor = 'inception' with its weights file)")
    from ..data.partition import load_splits

    train, test = load_splits(cfg.data)

    def nchw(x):
        return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x

    return {"train_x": nchw(train.images), "train_y": train.labels, "test_x": nchw(test.images),
            "test_y": test.labels}


def evaluate_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), progress: bool = True,
                 output: str = "evaluation.json", checkpoint: str | None = None) -> dict:
    """Evaluate a trained run and write ``RUN_DIR/OUTPUT``; returns the same dict.

    Args:
        run_dir (`Path`): a directory written by ``collafuse run``.
        overrides (`list[str]`, defaults to `()`): ``KEY=VALUE`` settings for this evaluation (``eval.*``,
            ``sample.*``, ``run.device``).
        progress (`bool`, defaults to `True`): progress bars.
        output (`str`, defaults to ``"evaluation.json"``): the file name inside ``run_dir``. A second evaluation
            under other settings (``--set eval.extractor=inception``, ``--set sample.sampler=ddpm``) goes to its
            own file, so it never replaces the one ``sweep`` reads.
        checkpoint (`str`, *optional*): the checkpoint to score (``round_000025`` or ``25``, kept by
            ``train.keep_rounds``); the latest by default. Its training FLOPs up to that round are recorded
            (``compute.flops_to_checkpoint``).
    """
    run_dir = Path(run_dir)
    if not output.endswith(".json") or Path(output).name != output or output.startswith("."):
        raise ConfigError(f"evaluate --output: {output!r} is not allowed; give a plain file name ending in .json "
                          "(it is written inside the run directory)")
    fed = load_run(run_dir, overrides, checkpoint=checkpoint)
    cfg: Config = fed.cfg
    fed.set_progress(progress)
    t0 = time.perf_counter()
    samples = {c.index: generated_samples(fed, run_dir, c.index, cfg.eval.n_samples) for c in fed.clients}
    sample_s = time.perf_counter() - t0
    arrays = classifier_arrays(cfg)
    extractor = get_extractor(cfg.eval.extractor, cache_dir=cfg.eval.cache_dir or None, data_root=cfg.data.root,
                              weights=cfg.eval.inception_weights or None, arrays=arrays, progress=progress)
    classifier = extractor if cfg.eval.extractor == "classifier" else get_extractor(
        "classifier", cache_dir=cfg.eval.cache_dir or None, data_root=cfg.data.root, arrays=arrays,
        progress=progress)
    t1 = time.perf_counter()
    result = {
        "run_dir": str(run_dir),
        "cut": cfg.cut,
        "timesteps": cfg.diffusion.timesteps,
        "rounds": fed.history.rounds_done,
        "checkpoint": fed.restored_from.name,
        "n_samples_per_client": cfg.eval.n_samples,
        "sampler_grid": sampling_grid(cfg),
        # each client at its own cut ([[clients]]): its cut and its grid, which the server walks down to that cut
        "clients": {c.node_id: {"cut": c.cut, "sampler_grid": sampling_grid(c.cfg)} for c in fed.clients},
        "extractor": {"name": cfg.eval.extractor, **getattr(extractor, "info", {})},
        "fidelity": fidelity_section(fed, samples, extractor, classifier),
    }
    result["seconds"] = {"sampling": sample_s, "fidelity": time.perf_counter() - t1}
    t3 = time.perf_counter()
    result["memorisation"] = memorisation_section(fed, samples)
    result["seconds"]["memorisation"] = time.perf_counter() - t3
    t2 = time.perf_counter()
    result["disclosure"] = disclosure_section(fed, samples)
    result["seconds"]["disclosure"] = time.perf_counter() - t2
    result["compute"] = compute_section(fed, run_dir)
    log = run_dir / "message_log.jsonl"
    result["communication"] = communication_summary(log) if log.is_file() else None
    result["nodes"] = [SERVER, *(c.node_id for c in fed.clients)]
    write_text_atomic(run_dir / output, json.dumps(result, indent=1, allow_nan=False))
    return result
