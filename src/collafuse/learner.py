"""One node's trainable denoiser: model, Adam, EMA weights and the node's own random stream.

Client and server both train an epsilon-predictor with the same update; only what they noise and what they
regress on differ (client.py, server.py). Keeping the update here means both sides, and the benchmark's plain
loop, run the same optimizer code.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel

from .config import TrainConfig


class Learner:
    """Args:
        model (`torch.nn.Module`): the UNet, already initialised.
        cfg (`TrainConfig`): learning rate, EMA decay, gradient clipping.
        rng (`torch.Generator`): this node's CPU stream for batches, timesteps and noise.
        sample_rng (`torch.Generator`): this node's CPU stream for sampling noise.
        device (`str`): where the model runs.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, rng: torch.Generator, sample_rng: torch.Generator,
                 device: str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.cfg = cfg
        self.rng = rng
        self.sample_rng = sample_rng
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_decay)
        self.steps = 0
        self._ema_model: torch.nn.Module | None = None

    # -- randomness: always drawn on the CPU stream, then moved, so every device sees the same numbers ----------------
    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.rng).to(self.device)

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=self.rng).to(self.device)

    def step(self, x_t: torch.Tensor, t_index: torch.Tensor, ids: torch.Tensor | None, target: torch.Tensor) -> float:
        """One optimizer step on ||model(x_t, t, ids) - target||^2 (Ho et al. 2020, Algorithm 1)."""
        self.model.train()
        pred = self.model(x_t, t_index, class_labels=ids).sample
        loss = F.mse_loss(pred, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.ema.step(self.model.parameters())
        self.steps += 1
        self._ema_model = None
        return loss.item()

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
        self.rng.set_state(tensors["rng"])
        self.sample_rng.set_state(tensors["sample_rng"])
        self.steps = int(meta["steps"])
        self._ema_model = None
