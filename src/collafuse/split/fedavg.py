"""Federated averaging (McMahan et al. 2017, Algorithm 1 "FederatedAveraging"): the math the FedAvg baseline needs.

Under ``split.algorithm = "fedavg"`` every client trains a copy of the whole model (the server-model architecture,
t = 1..T) for K local steps from the global weights it was sent; the server replaces the global weights by the
average of the clients' weights, each weighted by its number of training images n_k:

    w_{r+1} = sum_k n_k w_k^{r} / sum_k n_k        (McMahan et al. 2017, Algorithm 1, over the clients that replied)

Only parameters are averaged. Each client's Adam moments stay on the client (they never cross and are not reset
when the global weights arrive), as in FedAvg with a local optimizer. The weights cross as one float32 vector in
``model.parameters()`` order (``torch.nn.utils.parameters_to_vector``), so a message has one array and its length
is the model's parameter count.

Sampling uses the averaged model. With ``sample.use_ema`` the client samples with an exponential moving average
of the global weights it received, one update per round: the per-step EMA that the other modes keep (diffusers'
``EMAModel``, decay ``min(ema_decay, (1 + s) / (10 + s))`` at step s, so it warms up), applied to a trajectory
that moves by one averaged round per K steps. A round therefore folds the new average in with the product of
its K per-step decays (``round_decay``). Every client receives the same averages, so every client holds the same
EMA, and it costs no bytes. (A constant ``ema_decay ** K`` from the first round instead, with no warm-up, kept
0.98^100 = 13% of the random initial weights after 100 rounds and gave dim, noisy samples.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters


def num_weights(model: torch.nn.Module) -> int:
    """The length of the vector that carries ``model``'s weights."""
    return sum(p.numel() for p in model.parameters())


def flatten(model: torch.nn.Module) -> torch.Tensor:
    """``model``'s parameters as one float32 CPU vector, in ``model.parameters()`` order (a copy)."""
    return parameters_to_vector([p.detach().float() for p in model.parameters()]).cpu().clone()


def load_flat(model: torch.nn.Module, weights: torch.Tensor) -> None:
    """Copy the vector ``weights`` into ``model``'s parameters (in place, same order as ``flatten``).

    Raises:
        ValueError: the vector's length is not the model's parameter count.
    """
    n = num_weights(model)
    if weights.ndim != 1 or weights.numel() != n:
        raise ValueError(f"weights hold {weights.numel()} values (allowed: exactly {n}, the model's parameter count)")
    with torch.no_grad():
        params = list(model.parameters())
        vector_to_parameters(weights.to(device=params[0].device, dtype=params[0].dtype), params)


def weighted_average(updates: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """sum_k n_k w_k / sum_k n_k over ``updates`` = [(w_k, n_k), ...], accumulated in float64, returned float32.

    Raises:
        ValueError: no update, a non-positive n_k, or vectors of different lengths.
    """
    if not updates:
        raise ValueError("weighted_average needs at least one update")
    lengths = {w.numel() for w, _ in updates}
    if len(lengths) > 1:
        raise ValueError(f"updates disagree on the number of weights: {sorted(lengths)}")
    if any(n < 1 for _, n in updates):
        raise ValueError(f"example counts {[n for _, n in updates]} (allowed: integers >= 1)")
    total = sum(n for _, n in updates)
    acc = torch.zeros(lengths.pop(), dtype=torch.float64)
    for w, n in updates:
        acc.add_(w.to(torch.float64), alpha=n / total)
    return acc.float()


def round_decay(decay_at_step: Callable[[int], float], first_step: int, steps: int) -> float:
    """The decay of ``steps`` EMA steps numbered ``first_step .. first_step + steps - 1`` that all see the same
    weights: the product of their per-step decays (``decay_at_step``, e.g. ``EMAModel.get_decay``), because
    s <- d_j s + (1 - d_j) w applied for j = 1..K equals s <- (prod_j d_j) s + (1 - prod_j d_j) w."""
    out = 1.0
    for j in range(first_step, first_step + steps):
        out *= decay_at_step(j)
    return out


def ema_update(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * params, in place (decay 0 copies params)."""
    with torch.no_grad():
        for s, p in zip(shadow, params, strict=True):
            s.mul_(decay).add_(p.detach().to(s.dtype), alpha=1.0 - decay)
