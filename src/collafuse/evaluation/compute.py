"""What a CollaFuse run costs in compute: exact FLOPs per node and phase, the client's share, wall time, energy.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real forward (and backward) of each node's
own model, built from the config exactly as ``Server`` and ``Client`` build it (``node_model`` + ``node_labels``),
so architecture and conditioning match the run. Convention: 2 FLOPs per multiply-add. Counted are the
matmul-like ops (Linear, convolutions, attention); elementwise work (bias adds, GroupNorm, SiLU, the loss, gradient
clipping, Adam, EMA, the samplers' update rule) is not in FlopCounterMode's registry and is left out: a handful of
FLOPs per activation or parameter, where a 3x3 convolution spends 18 x C_in per output element.

On the CPU, torch routes ``scaled_dot_product_attention`` to ``aten._scaled_dot_product_flash_attention_for_cpu``,
which FlopCounterMode (torch 2.13) does not know and would count as 0; ``flop_counter`` adds it (and its backward)
with torch's own SDPA formulas, so the server's mid-block attention is counted on every device.

The run accounting multiplies measured per-step FLOPs by what the run does: ``rounds x steps`` training steps per
node (mirroring ``Client.trains`` / ``Server.trains``), and per generated image the number of the node's steps in the
sampler's timestep list (``DiffusionSchedule.split_sampler``, the lists ``Server.sample_to_cut`` and
``Client.finish`` walk) times one guided forward (``predict_eps``: 2 forwards when ``guidance_scale != 1``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..config import Config
from ..data.partition import ClientData
from ..split.client import Client
from ..split.diffusion import DiffusionSchedule
from ..split.models import LabelEncoder, Node, count_params, node_labels, node_model, node_model_config, predict_eps
from ..split.protocol import SERVER, client_node
from ..split.server import Server

FLOPS_UNIT = ("FLOPs (torch FlopCounterMode, 2 per multiply-add; matmuls, convolutions and attention; "
              "elementwise ops, optimizer and EMA not counted)")
ENERGY_LABEL = "estimate (codecarbon, no power meter: TDP x load)"


# ----------------------------------------------------------------------------------------------------------------------
# Counting


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU attention kernel (see the module docstring)."""
    aten = torch.ops.aten
    mapping = {}
    # Looked up by name so a torch without these kernels still gets a working counter.
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward_flop)):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once under ``flop_counter`` and return what it counted.

    Args:
        fn (`Callable[[], object]`): the work to count; it really runs (forward, backward, ...).

    Returns:
        `dict`: ``{"total": int, "by_op": {aten op name: int}}`` in FLOPs.
    """
    with flop_counter() as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": dict(sorted(by_op.items()))}


# ----------------------------------------------------------------------------------------------------------------------
# Per-step FLOPs of the two node models


def build_node_model(cfg: Config, node: Node) -> tuple[torch.nn.Module, LabelEncoder]:
    """The node's UNet and label encoder, built exactly as ``Server.__init__`` / ``Client.__init__`` build them.

    Args:
        cfg (`Config`): the run configuration.
        node (`"server"` or `"client"`): which role's model; every client has the same architecture.
    """
    labels = node_labels(cfg, node)
    node_id = SERVER if node == "server" else client_node(0)
    return node_model(node_model_config(cfg, node), labels, cfg.seeds.init, node_id, cfg.image_shape), labels


def guidance_factor(labels: LabelEncoder, guidance_scale: float) -> int:
    """Forwards per sampling step and image: 2 with classifier-free guidance on a conditional model, else 1.

    Mirrors ``predict_eps``; ``measure_node_flops`` measures through ``predict_eps`` and checks this factor.
    """
    return 2 if labels.null_id is not None and guidance_scale != 1.0 else 1


@dataclass
class NodeFlops:
    """Measured FLOPs of one node's model.

    Args:
        node (`str`): ``"server"`` or ``"client"``.
        params (`int`): parameter count of the model.
        batch_size (`int`): the batch of ``train_step``.
        train_step (`int`): one training step (forward + MSE + backward) at ``batch_size``.
        forward_per_image (`int`): one plain forward of one image.
        guidance_factor (`int`): forwards per sampling step (2 with classifier-free guidance).
        sample_step_per_image (`int`): one sampling step of one image through ``predict_eps``
            (= ``forward_per_image x guidance_factor``).
        key (`str`): what the numbers depend on (model config, embeddings, image shape, batch, guidance); a
            ``NodeFlops`` is only reused for a config with the same key.
    """

    node: str
    params: int
    batch_size: int
    train_step: int
    forward_per_image: int
    guidance_factor: int
    sample_step_per_image: int
    key: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _node_key(cfg: Config, node: Node, labels: LabelEncoder, batch_size: int) -> str:
    g = guidance_factor(labels, cfg.sample.guidance_scale)
    return json.dumps({"model": node_model_config(cfg, node).model_dump(), "num_embeds": labels.num_embeds,
                       "image_shape": list(cfg.image_shape), "batch_size": batch_size, "guidance_factor": g},
                      sort_keys=True)


def _measure(model: torch.nn.Module, labels: LabelEncoder, cfg: Config, batch_size: int) -> dict:
    """Count one training step at ``batch_size`` and one (guided) sampling step of one image."""
    g = torch.Generator().manual_seed(0)
    shape = cfg.image_shape
    # Inputs only need the right shapes and dtypes: the counted ops do not depend on values.
    x = torch.randn((batch_size, *shape), generator=g)
    t_index = torch.randint(0, cfg.diffusion.timesteps, (batch_size,), generator=g)  # diffusers indices
    ids = labels.encode(torch.zeros(batch_size, dtype=torch.long), 0)
    target = torch.randn((batch_size, *shape), generator=g)

    def train_step():  # Learner.step without the optimizer, clipping and EMA (elementwise, not counted)
        loss = F.mse_loss(model(x, t_index, class_labels=ids).sample, target)
        loss.backward()

    model.train()
    train = count_flops(train_step)["total"]
    model.zero_grad(set_to_none=True)

    model.eval()
    x1, ids1 = x[:1], None if ids is None else ids[:1]
    forward = count_flops(lambda: predict_eps(model, x1, 0, ids1, labels.null_id, 1.0))["total"]
    guided = count_flops(lambda: predict_eps(model, x1, 0, ids1, labels.null_id, cfg.sample.guidance_scale))["total"]
    return {"train_step": train, "forward_per_image": forward, "sample_step_per_image": guided}


def measure_node_flops(cfg: Config, batch_size: int | None = None) -> dict[str, NodeFlops]:
    """Measure the server's and the client's model once each (once in all when their keys are equal).

    The cut does not change the models, so one result serves ``run_accounting`` at every cut.

    Args:
        cfg (`Config`): the run configuration (models, conditioning, image shape, guidance scale).
        batch_size (`int`, *optional*): training batch; defaults to ``cfg.train.batch_size``.

    Returns:
        `dict[str, NodeFlops]`: ``{"server": ..., "client": ...}``.
    """
    batch = batch_size or cfg.train.batch_size
    cache: dict[str, dict] = {}  # key -> measured numbers; counting runs a real forward/backward, so once per key
    out = {}
    with torch.random.fork_rng(devices=[]):  # model init and inputs must not move the caller's global RNG
        for node in ("server", "client"):
            model, labels = build_node_model(cfg, node)
            key = _node_key(cfg, node, labels, batch)
            if key not in cache:
                cache[key] = _measure(model, labels, cfg, batch)
            m = cache[key]
            factor = guidance_factor(labels, cfg.sample.guidance_scale)
            if m["sample_step_per_image"] != factor * m["forward_per_image"]:
                raise RuntimeError(f"{node}: predict_eps counted {m['sample_step_per_image']} FLOPs, expected "
                                   f"{factor} x {m['forward_per_image']} (guidance factor out of sync with "
                                   "split/models.py)")
            out[node] = NodeFlops(node, count_params(model), batch, m["train_step"], m["forward_per_image"], factor,
                                  m["sample_step_per_image"], key)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Per-run accounting


def sampling_steps(cfg: Config) -> tuple[list[int], list[int]]:
    """The server's and the client's sampling timesteps (diffusers indices), as ``Server``/``Client`` walk them.

    Args:
        cfg (`Config`): sampler kind, DDIM steps, cut and T are taken from it.
    """
    _, server_steps, client_steps = DiffusionSchedule(cfg.diffusion).split_sampler(cfg.sample.sampler, cfg.cut,
                                                                                   cfg.sample.ddim_steps,
                                                                                   cfg.sample.server_grid_steps)
    return server_steps, client_steps


def _share(part: float, total: float) -> float | None:
    return part / total if total > 0 else None


def run_accounting(cfg: Config, node_flops: dict[str, NodeFlops] | None = None) -> dict:
    """FLOPs of a whole run per node and phase, and the clients' share of them.

    Training: every client takes ``rounds x client_steps`` steps when it owns any (cut >= 1, ``Client.trains``), the
    server ``rounds x server_steps`` when it owns any (cut < T, ``Server.trains``). Sampling, per generated image:
    each node's number of sampler steps times one guided sampling step of one image. The one-time upload (one
    noising per image) and the samplers' update rule are elementwise and not counted.

    Args:
        cfg (`Config`): the run configuration.
        node_flops (`dict[str, NodeFlops]`, *optional*): a ``measure_node_flops`` result to reuse (e.g. across cuts);
            measured here when omitted. Refused if it was measured for different models, batch or guidance.

    Returns:
        `dict`: JSON-able; FLOP counts are ints, shares floats in [0, 1] (None when nothing is computed).
    """
    if node_flops is None:
        node_flops = measure_node_flops(cfg)
    for node, nf in node_flops.items():
        if nf.key != _node_key(cfg, node, node_labels(cfg, node), cfg.train.batch_size):
            raise ValueError(f"node_flops[{node!r}] was measured for another model, batch or guidance than this "
                             "config (measure again with measure_node_flops(cfg))")
    server, client = node_flops["server"], node_flops["client"]
    tr, T, cut, n_clients = cfg.train, cfg.diffusion.timesteps, cfg.cut, cfg.data.num_clients

    client_steps = tr.rounds * tr.client_steps if cut >= 1 else 0  # Client.trains
    server_steps = tr.rounds * tr.server_steps if cut < T else 0  # Server.trains
    per_client = client_steps * client.train_step
    clients_total = n_clients * per_client
    server_total = server_steps * server.train_step
    train_total = clients_total + server_total

    s_steps, c_steps = sampling_steps(cfg)
    s_img = len(s_steps) * server.sample_step_per_image
    c_img = len(c_steps) * client.sample_step_per_image

    return {
        "units": {"flops": FLOPS_UNIT, "share": "fraction of the total FLOPs of that phase"},
        "config": {"timesteps": T, "cut": cut, "num_clients": n_clients, "rounds": tr.rounds,
                   "client_steps": tr.client_steps, "server_steps": tr.server_steps, "batch_size": tr.batch_size,
                   "sampler": cfg.sample.sampler, "ddim_steps": cfg.sample.ddim_steps,
                   "guidance_scale": cfg.sample.guidance_scale},
        "per_step": {"server": server.to_dict(), "client": client.to_dict()},
        "training": {
            "server": {"trains": cut < T, "steps": server_steps, "flops": server_total},
            "client": {"trains": cut >= 1, "steps": client_steps, "flops": per_client},  # each client
            "clients_total_flops": clients_total,
            "total_flops": train_total,
            "client_share": _share(per_client, train_total),  # one client's part of everything computed
            "clients_share": _share(clients_total, train_total),  # all clients together
        },
        "sampling_per_image": {
            "server": {"steps": len(s_steps), "flops": s_img},
            "client": {"steps": len(c_steps), "flops": c_img},
            "total_flops": s_img + c_img,
            "client_share": _share(c_img, s_img + c_img),
        },
    }


# ----------------------------------------------------------------------------------------------------------------------
# Wall time


def wall_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict:
    """Wall-clock seconds of ``fn``: ``warmup`` untimed calls (allocator, caches), then ``repeats`` timed ones.

    Args:
        fn (`Callable[[], object]`): the work to time.
        repeats (`int`, defaults to 3): timed calls.
        warmup (`int`, defaults to 1): untimed calls first.

    Returns:
        `dict`: ``{"unit": "s", "median_s", "min_s", "all_s", "repeats", "warmup"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats = {repeats} is invalid (allowed: an integer >= 1)")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"unit": "s", "median_s": statistics.median(times), "min_s": min(times), "all_s": times,
            "repeats": repeats, "warmup": warmup}


def make_train_step(cfg: Config, node: Node, n_images: int | None = None, seed: int = 0) -> Callable[[], float]:
    """One real training step of a node (``Server.train_step`` / ``Client.train_step``) on synthetic images.

    Time and FLOPs do not depend on pixel values, so random images in [-1, 1] stand in for the client's data (and
    for the server's uploads); nothing is read from disk and nothing crosses a transport.

    Args:
        cfg (`Config`): the run configuration (models, cut, batch size, device).
        node (`"server"` or `"client"`): which role's step.
        n_images (`int`, *optional*): synthetic images held; defaults to 4 batches.
        seed (`int`, defaults to 0): seed of the synthetic images.

    Returns:
        `Callable[[], float]`: runs one step and returns its loss.
    """
    n = n_images or 4 * cfg.train.batch_size
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *cfg.image_shape), generator=g) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (n,), generator=g)
    if node == "server":
        if cfg.cut >= cfg.diffusion.timesteps:
            raise ValueError(f"the server owns no step at cut = {cfg.cut} = T")
        server = Server(cfg)
        server.receive_upload(0, x, y)
        return server.train_step
    if node == "client":
        if cfg.cut < 1:
            raise ValueError("a client owns no step at cut = 0")
        return Client(0, ClientData(0, x, y, x[:1], y[:1]), cfg).train_step
    raise ValueError(f"node = {node!r} is invalid (allowed: 'server', 'client')")


# ----------------------------------------------------------------------------------------------------------------------
# Energy


class _CodecarbonLog(logging.Filter):
    """Keeps codecarbon quiet but remembers what it said.

    codecarbon wraps its tracker's ``__init__``, ``start`` and ``stop`` in ``suppress(Exception)``: a failure is
    logged as a warning and swallowed, leaving a tracker without data. This filter on the ``codecarbon`` logger
    records warnings and errors (so the reason can be returned) and lets only errors reach its handlers.
    """

    def __init__(self):
        super().__init__()
        self.errors: list[str] = []  # exceptions codecarbon caught, in order: the first is the root cause
        self.messages: list[str] = []
        self.logged_errors: list[str] = []  # error-level lines, e.g. an unknown country code (it then falls back)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                self.messages.append(record.getMessage())
            if record.levelno >= logging.ERROR:
                self.logged_errors.append(record.getMessage())
        return record.levelno >= logging.ERROR

    def reason(self) -> str:
        if self.errors:
            return "; ".join(dict.fromkeys(self.errors))
        said = [m for m in dict.fromkeys(self.messages) if "Multiple instances" not in m]
        return " | ".join(said) or "nothing"


def _energy_result(country_iso_code: str, tracking_mode: str, wall_s: float, reason: str | None,
                   data=None, logged_errors: list[str] | None = None) -> dict:
    def num(name):
        v = getattr(data, name, None) if data is not None else None
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    energy = num("energy_consumed")
    if reason is None and (energy is None or energy <= 0):
        reason = f"codecarbon reported no energy ({energy!r})"
    ok = reason is None
    return {
        "label": ENERGY_LABEL,
        "ok": ok,
        "reason": reason,
        "energy_kwh": energy if ok else None,
        "emissions_kg_co2eq": num("emissions") if ok else None,
        "cpu_energy_kwh": num("cpu_energy"),
        "ram_energy_kwh": num("ram_energy"),
        "cpu_power_w": num("cpu_power"),
        "ram_power_w": num("ram_power"),
        "tracked_s": num("duration"),
        "wall_s": wall_s,
        "cpu_model": getattr(data, "cpu_model", None),
        "country_iso_code": country_iso_code,
        "tracking_mode": tracking_mode,
        "codecarbon_errors": list(logged_errors or []),
    }


def estimate_energy(fn: Callable[[], object], country_iso_code: str = "DEU", tracking_mode: str = "process",
                    measure_power_secs: float = 1.0, **tracker_kwargs) -> dict:
    """Run ``fn`` under codecarbon's ``OfflineEmissionsTracker`` and return its energy and CO2eq estimate.

    There is no power meter (RAPL) on the machines this was written on: codecarbon then estimates CPU power as
    the CPU's TDP (from its table, or 4 W per thread when the model is unknown) times the tracked load, adds a RAM
    power estimate, and converts energy to CO2eq with the country's average grid intensity. Hence the ``label``.

    ``fn`` always runs. If codecarbon is missing, fails, or produces no positive energy, the result holds
    ``ok = False``, ``energy_kwh = None`` and the ``reason`` (with codecarbon's own warnings) instead of raising;
    exceptions raised by ``fn`` itself propagate. Errors codecarbon logs but works around are returned in
    ``codecarbon_errors``: with an unknown country code, for one, it falls back to a world-average grid intensity
    and the CO2eq figure is not the country's. Nothing is written to disk (no output methods), and codecarbon's
    logger only lets errors through during the call (its level and filters are restored afterwards).

    Args:
        fn (`Callable[[], object]`): the work to measure.
        country_iso_code (`str`, defaults to "DEU"): 3-letter ISO code whose grid intensity converts kWh to CO2eq.
        tracking_mode (`str`, defaults to "process"): ``"process"`` attributes only this process's CPU time (the
            machine may be shared); ``"machine"`` counts the whole machine's load.
        measure_power_secs (`float`, defaults to 1.0): codecarbon's sampling interval.
        **tracker_kwargs: passed on to ``OfflineEmissionsTracker`` (e.g. ``force_cpu_power`` if the TDP is known).

    Returns:
        `dict`: ``label``, ``ok``, ``reason``, ``energy_kwh``, ``emissions_kg_co2eq`` (kg CO2eq), the CPU and RAM
        parts in kWh, powers in W, tracked and wall seconds, the CPU model codecarbon saw, country code, mode and
        ``codecarbon_errors``.
    """
    try:
        from codecarbon import OfflineEmissionsTracker  # optional: the package works without it
    except ImportError as e:
        t0 = time.perf_counter()
        fn()
        return _energy_result(country_iso_code, tracking_mode, time.perf_counter() - t0,
                              f"codecarbon is not installed ({e})")

    # Imported first: its first import resets the logger to INFO, which would undo the quieting below.
    cc_logger = logging.getLogger("codecarbon")
    old_level, capture = cc_logger.level, _CodecarbonLog()
    cc_logger.addFilter(capture)
    cc_logger.setLevel(logging.WARNING)
    tracker, reason, data = None, None, None
    try:
        try:
            kwargs = dict(country_iso_code=country_iso_code, tracking_mode=tracking_mode,
                          measure_power_secs=measure_power_secs, log_level="warning", allow_multiple_runs=True,
                          output_methods=[])  # no CSV, API, logger or Prometheus output
            kwargs.update(tracker_kwargs)
            tracker = OfflineEmissionsTracker(**kwargs)
            tracker.start()
        except Exception as e:  # any codecarbon failure: report it, still do the work
            tracker, reason = None, f"codecarbon could not start: {type(e).__name__}: {e}"
        t0 = time.perf_counter()
        try:
            fn()
        finally:
            wall = time.perf_counter() - t0
            if tracker is not None:
                try:
                    tracker.stop()
                    data = getattr(tracker, "final_emissions_data", None)
                except Exception as e:
                    reason = f"codecarbon could not stop: {type(e).__name__}: {e}"
                if reason is None and data is None:
                    reason = f"codecarbon produced no emissions data (it swallows its own errors): {capture.reason()}"
    finally:
        cc_logger.removeFilter(capture)
        cc_logger.setLevel(old_level)
    return _energy_result(country_iso_code, tracking_mode, wall, reason, data, capture.logged_errors)
