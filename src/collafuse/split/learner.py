"""One node's trainable denoiser: model, Adam, EMA weights and the node's own random stream.

Client and server both train an epsilon-predictor with the same update; only what they noise and what they
regress on differ (client.py, server.py). Keeping the update here means both sides, and the benchmark's plain
loop, run the same optimizer code.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import TrainConfig


def forward_context(precision: str, device: str | torch.device) -> contextlib.ExitStack:
    """How a node's forward passes run: bf16 autocast (fp32 weights; matmuls and convolutions in bf16) when
    ``precision`` is ``"bf16"``, and on the CPU attention through the math kernel. Shared by `Learner` and the
    exported pipeline (collafuse.export.pipeline), so both compute the same numbers.

    Why the math kernel: the UNet's only attention is its mid-block, over 7x7 = 49 tokens. For so few tokens the
    CPU flash-attention kernel's backward cost 37 ms of a 240 ms bf16 server step; two batched matmuls and a
    softmax make the step 1.15x faster (benchmarks/precision_variants.py, results/precision/). On CUDA the
    default kernel choice stays.
    """
    device = torch.device(device)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"))
    if device.type == "cpu":
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """"fp32" or "bf16" for ``train.precision`` on ``device``: "auto" is bf16 only where the hardware has it natively
    (emulated bf16 is slower than fp32)."""
    if precision != "auto":
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if dev.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if native else "fp32"
    return "fp32"


def machine_record(precision: str, device: str | torch.device) -> dict:
    """What a stretch of training ran on, for the run's records (``History.segments``, metrics.json): timings and
    the precision "auto" resolves to depend on it, so results can be labelled with the machine that made them.

    Args:
        precision (`str`): ``train.precision`` as configured ("fp32", "bf16" or "auto").
        device (`str` or `torch.device`): where the nodes of this process run.

    Returns:
        `dict`: JSON-able: ``device``, ``precision`` (as resolved here), ``cpu`` (the model name the OS reports),
        ``cpu_flags`` (which of the vector extensions that set the speed it has: a virtual machine may report only
        "AMD EPYC", with or without AVX-512), ``logical_cpus``, ``torch_threads``, ``native_bf16`` (avx512_bf16 or
        AMX on a CPU), ``gpu`` (the CUDA device's name, else None) and ``torch`` (its version). No host name: a
        site's records name no machine of its network.
    """
    dev = torch.device(device)
    model, flags = None, set()
    try:  # the first core's lines (every core reports the same)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the model name from platform, no flags
        pass
    return {"device": str(dev), "precision": resolve_precision(precision, dev),
            "cpu": model or platform.processor() or platform.machine(),
            "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags],
            "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "native_bf16": bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, "torch": torch.__version__}


class Learner:
    """Args:
        model (`torch.nn.Module`): the UNet, already initialised.
        cfg (`TrainConfig`): learning rate, EMA decay, gradient clipping.
        rng (`torch.Generator`): this node's CPU stream for batches, timesteps and noise.
        sample_rng (`torch.Generator`): this node's CPU stream for sampling noise.
        device (`str`): where the model runs.
        total_steps (`int`, defaults to 0): the node's training steps over the whole run (rounds x steps per round),
            the length of a cosine learning-rate schedule.
        ema_per_step (`bool`, defaults to True): update the EMA weights after every step. A FedAvg client does not:
            its EMA follows the averaged global weights instead, once per round (collafuse.split.fedavg).
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, rng: torch.Generator, sample_rng: torch.Generator,
                 device: str = "cpu", total_steps: int = 0, ema_per_step: bool = True):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.cfg = cfg
        self.rng = rng
        self.sample_rng = sample_rng
        # fused: one kernel for the whole update, the same Adam (2-6% of a bf16 step; benchmarks/precision_variants.py)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, fused=True)
        # None keeps the constant learning rate of runs from before the option (no scheduler state to save).
        self.lr_scheduler = None
        if cfg.lr_schedule != "constant" or cfg.lr_warmup_steps:
            name = "cosine" if cfg.lr_schedule == "cosine" else "constant_with_warmup"
            self.lr_scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                              num_training_steps=max(total_steps, cfg.lr_warmup_steps + 1))
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_decay)
        self.ema_per_step = ema_per_step
        self.steps = 0
        self._ema_model: torch.nn.Module | None = None
        self.precision = resolve_precision(cfg.precision, self.device)

    def forward_mode(self) -> contextlib.ExitStack:
        """How the forward passes (training and sampling) run: `forward_context` for this node's precision."""
        return forward_context(self.precision, self.device)

    # -- randomness: always drawn on the CPU stream, then moved, so every device sees the same numbers ----------------
    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng).to(self.device)

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=self.rng).to(self.device)

    def step(self, x_t: torch.Tensor, t_index: torch.Tensor, ids: torch.Tensor | None, target: torch.Tensor,
             weights: torch.Tensor | None = None) -> float:
        """One optimizer step on ||model(x_t, t, ids) - target||^2 (Ho et al. 2020, Algorithm 1), each sample's
        squared error times ``weights`` [B] when given."""
        self.model.train()
        with self.forward_mode():
            pred = self.model(x_t, t_index, class_labels=ids).sample
        if weights is None:
            loss = F.mse_loss(pred.float(), target)  # the loss and everything after it in fp32
        else:
            per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
            loss = (weights.to(per_sample) * per_sample).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        if self.ema_per_step:
            self.ema.step(self.model.parameters())
        self.steps += 1
        self._ema_model = None
        return loss.item()

    def forget_sampling_model(self) -> None:
        """Drop the cached EMA copy after the weights or the EMA changed outside ``step`` (a FedAvg push)."""
        self._ema_model = None

    def sampling_model(self, use_ema: bool = True) -> torch.nn.Module:
        """The model to sample with: a copy holding the EMA weights (cached until the next step), or the live one."""
        if not use_ema:
            return self.model.eval()
        if self._ema_model is None:
            self._ema_model = copy.deepcopy(self.model)
            self.ema.copy_to(self._ema_model.parameters())
        return self._ema_model.eval()

    # -- state: tensors go to safetensors, the rest to JSON ------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        ema = self.ema.state_dict()
        for i, p in enumerate(ema.pop("shadow_params")):
            tensors[f"ema.{i}"] = p.detach().cpu()
        opt = self.optimizer.state_dict()
        for idx, slots in opt["state"].items():
            for name, v in slots.items():
                tensors[f"optim.{idx}.{name}"] = v.detach().cpu()
        tensors["rng"] = self.rng.get_state()
        tensors["sample_rng"] = self.sample_rng.get_state()
        meta = {"steps": self.steps, "ema": ema, "optim_param_groups": opt["param_groups"]}
        if self.lr_scheduler is not None:
            meta["lr_scheduler"] = {k: v for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore exactly what ``state`` saved; raises KeyError/RuntimeError on a mismatched state."""
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_sd, strict=True)
        n_params = len(list(self.model.parameters()))
        ema = dict(meta["ema"])
        ema["shadow_params"] = [tensors[f"ema.{i}"].to(self.device) for i in range(n_params)]
        self.ema.load_state_dict(ema)
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        # JSON turned tuples (Adam's betas) into lists; give the optimizer back exactly what it saved.
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["optim_param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        if self.lr_scheduler is not None and "lr_scheduler" in meta:
            self.lr_scheduler.load_state_dict({**meta["lr_scheduler"], "lr_lambdas": [None]})
        self.rng.set_state(tensors["rng"])
        self.sample_rng.set_state(tensors["sample_rng"])
        self.steps = int(meta["steps"])
        self._ema_model = None
