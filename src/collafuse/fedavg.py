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
of the global weights it received, one update per round with decay ``ema_decay ** K``: the per-step EMA of a
trajectory that moves by one averaged round per K steps. Every client receives the same averages, so every
client holds the same EMA, and it costs no bytes.
"""

from __future__ import annotations

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


def ema_update(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float, first: bool) -> None:
    """shadow <- decay * shadow + (1 - decay) * params, in place; ``first`` copies params instead (the EMA starts
    at the first global weights a client receives)."""
    with torch.no_grad():
        for s, p in zip(shadow, params, strict=True):
            if first:
                s.copy_(p.detach())
            else:
                s.mul_(decay).add_(p.detach().to(s.dtype), alpha=1.0 - decay)
