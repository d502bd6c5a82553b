"""A diffusion toy whose every quantity is known in closed form: a Gaussian mixture in 2-D, and the sliced
Wasserstein-1 distance between point clouds. The sampler tests (tests/split/test_cut_sampler_toy.py) and
benchmarks/cut_sampler_toy.py measure the split's hand-off against it.

For x0 ~ sum_k pi_k N(mu_k, sigma^2 I) and x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, the marginal is
q(x_t) = sum_k pi_k N(sqrt(abar) mu_k, (abar sigma^2 + 1 - abar) I), and Tweedie's formula gives the exact
eps-prediction E[eps | x_t] = -sqrt(1 - abar) grad log q(x_t)
                            = sqrt(1 - abar) sum_k w_k(x_t) (x_t - sqrt(abar) mu_k) / (abar sigma^2 + 1 - abar),
with w_k(x_t) the posterior responsibility of component k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Args:
        means (`torch.Tensor`): [K, D] component means.
        std (`float`): the components' common standard deviation sigma.
        weights (`torch.Tensor`, *optional*): [K] mixture weights (uniform when omitted).
    """

    means: torch.Tensor
    std: float
    weights: torch.Tensor | None = None

    @classmethod
    def ring(cls, k: int = 8, radius: float = 0.7, std: float = 0.08) -> GaussianMixture:
        """k equal components on a circle of ``radius``."""
        a = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
        return cls(torch.stack([radius * a.cos(), radius * a.sin()], dim=1), std)

    @property
    def pi(self) -> torch.Tensor:
        k = len(self.means)
        return torch.full((k,), 1.0 / k, dtype=torch.float64) if self.weights is None else self.weights.double()

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n points x0 ~ the mixture, float32 [n, D]."""
        comp = torch.multinomial(self.pi, n, replacement=True, generator=generator)
        noise = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.std * noise).float()

    def sample_noised(self, n: int, abar: float, generator: torch.Generator) -> torch.Tensor:
        """n points of q(x_t) at noise level ``abar`` (drawn exactly: x0, then the forward noise)."""
        x0 = self.sample(n, generator).double()
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return (math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps).float()

    def eps(self, x_t: torch.Tensor, abar: float) -> torch.Tensor:
        """The exact E[eps | x_t] at noise level ``abar`` (module docstring), float32 like ``x_t``."""
        x = x_t.double()
        var = abar * self.std ** 2 + 1 - abar
        diff = x[:, None, :] - math.sqrt(abar) * self.means[None]  # [N, K, D]
        logits = self.pi.log()[None] - diff.pow(2).sum(-1) / (2 * var)
        w = torch.softmax(logits, dim=1)  # responsibilities
        return (math.sqrt(1 - abar) * (w[..., None] * diff).sum(1) / var).to(x_t.dtype)


def sliced_w1(a: torch.Tensor, b: torch.Tensor, directions: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two equal-size point clouds [N, D]: the mean, over random unit
    directions, of the 1-D W1 of the projections (sorted samples, matched in order)."""
    if a.shape != b.shape:
        raise ValueError(f"point clouds of shapes {list(a.shape)} and {list(b.shape)} (allowed: equal shapes)")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn((a.shape[1], directions), generator=g, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    pa, _ = (a.double() @ d).sort(dim=0)
    pb, _ = (b.double() @ d).sort(dim=0)
    return float((pa - pb).abs().mean())
