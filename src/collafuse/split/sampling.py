"""The two segments of the split sampling chain, as functions of a model and the settings alone: what
``Server.sample_to_cut`` and ``Client.finish`` run, and what the exported pipeline (collafuse.export.pipeline)
runs on the weights it loads, so both compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import SampleConfig
from .diffusion import DiffusionSchedule, denoise, step_kwargs, to_step
from .learner import forward_context
from .models import predict_eps


def server_segment(model, schedule: DiffusionSchedule, sp: SampleConfig, cut: int, reference_cut: int,
                   ids: torch.Tensor | None, null_id: int | None, x_T: torch.Tensor, generator: torch.Generator,
                   precision: str, progress: Callable | None = None) -> torch.Tensor:
    """Server steps t = T..cut+1 from ``x_T`` with eps_hat = k_t * eps_S(x_t, t, y); returns x_cut (float, CPU).
    k_t is that of ``reference_cut``, which the model's output is relative to, whatever the client's cut
    (docs/protocol.md, Heterogeneous cuts); the grid is anchored on the client's ``cut``."""
    sched, steps, _ = schedule.split_sampler(sp.sampler, cut, sp.ddim_steps, sp.server_grid_steps)
    scale = {i: float(schedule.server_eps_scale(to_step(i), reference_cut)) for i in steps}  # by diffusers index

    def eps_fn(x_t, t_index):
        with forward_context(precision, x_t.device):
            eps = predict_eps(model, x_t, t_index, ids, null_id, sp.guidance_scale)
        return scale[t_index] * eps.float()

    return denoise(eps_fn, x_T, steps, sched, generator, progress, step_kwargs(sp.sampler, sp.eta)).float().cpu()


def client_segment(model, schedule: DiffusionSchedule, sp: SampleConfig, cut: int, ids: torch.Tensor | None,
                   null_id: int | None, x_cut: torch.Tensor, generator: torch.Generator, precision: str,
                   progress: Callable | None = None) -> torch.Tensor:
    """Client steps t = cut..1 from the hand-off ``x_cut`` (on the model's device) to x0."""
    sched, _, steps = schedule.split_sampler(sp.sampler, cut, sp.ddim_steps, sp.server_grid_steps)

    def eps_fn(x, t_index):
        with forward_context(precision, x.device):
            return predict_eps(model, x, t_index, ids, null_id, sp.guidance_scale).float()

    return denoise(eps_fn, x_cut, steps, sched, generator, progress, step_kwargs(sp.sampler, sp.eta))


def segment_steps(schedule: DiffusionSchedule, sp: SampleConfig, cut: int) -> tuple[int, int]:
    """How many steps each side takes at ``cut``: (server, client), for progress bars."""
    s = schedule.split_sampler(sp.sampler, cut, sp.ddim_steps, sp.server_grid_steps)
    return len(s.server_steps), len(s.client_steps)
