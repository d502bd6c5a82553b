"""The diffusion process and the exact split of it (shared/design/split-protocol.md).

Indexing. The protocol numbers steps t = 1..T with abar_0 = 1 (Ho et al. 2020). diffusers numbers them 0..T-1:
protocol step t is diffusers timestep t-1, and ``alphas_cumprod[t-1]`` is abar_t. The model's timestep input is
always the diffusers index. With cut s the client owns t = 1..s (indices 0..s-1) and the server t = s+1..T
(indices s..T-1); the hand-off tensor is x_s, noised with abar_s = ``alpha_bar[s]`` below. `to_index` and `to_step`
are the only places that shift between the two numberings; names ending in ``_index`` (or ``i``) hold diffusers
indices, ``t`` and ``step`` protocol steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, TypeVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

from ..config import DiffusionConfig

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]  # (x_t, diffusers index) -> standard epsilon prediction

BETA_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}

Step = TypeVar("Step", int, torch.Tensor)


def to_index(step: Step) -> Step:
    """The diffusers timestep index of protocol step ``step``: t = 1..T -> t - 1 = 0..T-1 (module docstring,
    Indexing). Works on ints and tensors alike."""
    return step - 1


def to_step(index: Step) -> Step:
    """The protocol step of diffusers timestep ``index``: 0..T-1 -> index + 1 = 1..T; the inverse of `to_index`."""
    return index + 1


class DiffusionSchedule:
    """Noise schedule plus the three noising rules of the split protocol.

    Args:
        cfg (`DiffusionConfig`): number of steps T, ``cosine`` (default) or ``linear`` betas, sample clipping.
    """

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.T = cfg.timesteps
        self.scheduler_kwargs = dict(
            num_train_timesteps=cfg.timesteps,
            beta_schedule=BETA_SCHEDULES[cfg.schedule],
            prediction_type="epsilon",
            clip_sample=cfg.clip_sample,
        )
        train = DDPMScheduler(**self.scheduler_kwargs)
        # alpha_bar[t] = abar_t in protocol indexing, t = 0..T, with abar_0 = 1.
        self.alpha_bar = torch.cat([torch.ones(1), train.alphas_cumprod.float()])

    def _ab(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast against an image batch ``like`` [B, C, H, W]."""
        ab = self.alpha_bar.to(like.device)[torch.as_tensor(t, device=like.device)]
        return ab.reshape(-1, *([1] * (like.ndim - 1))) if ab.ndim else ab

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Client training and the upload: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, i.e. q(x_t | x0).

        With t = cut this is the upload u_i of the protocol; with t = 0 it returns x0 exactly.
        """
        ab = self._ab(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def relative_ratio(self, t: torch.Tensor, cut: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """r_t = abar_t / abar_s for server steps t > s (``cut``: one s, or one per image of a mixed batch)."""
        return self._ab(t, like) / self._ab(cut, like)

    def server_noise(self, u: torch.Tensor, eps_rel: torch.Tensor, t: torch.Tensor,
                     cut: int | torch.Tensor) -> torch.Tensor:
        """Server training: x_t = sqrt(r_t) u + sqrt(1 - r_t) eps' from the upload u ~ q(x_s | x0).

        Gaussian transitions compose, so x_t has exactly the marginal q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t).
        """
        r = self.relative_ratio(t, cut, u)
        return r.sqrt() * u + (1 - r).sqrt() * eps_rel

    def server_eps_scale(self, t: torch.Tensor | int, cut: int | torch.Tensor) -> torch.Tensor:
        """k_t = sqrt(1 - abar_t) / sqrt(1 - r_t): E[eps | x_t] = k_t E[eps' | x_t] (split-protocol.md, Training).
        ``cut`` is one s, or one per entry of ``t``; k_t = 1 at s = 0, where eps' is eps."""
        ab_t = self.alpha_bar[torch.as_tensor(t)]
        r = ab_t / self.alpha_bar[torch.as_tensor(cut)]
        return (1 - ab_t).sqrt() / (1 - r).sqrt()

    def loss_weights(self, steps: range, min_snr_gamma: float = 0.0, cut: int | None = None) -> torch.Tensor | None:
        """Per-step loss weights for a node owning protocol ``steps``, indexed by protocol t (0..T), normalised to
        mean 1 over ``steps``; None when unweighted. They depend on the absolute t only, so the node's optimum (the
        conditional mean of its target) is unchanged.

        - ``min_snr_gamma`` > 0: min(SNR_t, gamma) / SNR_t with SNR_t = abar_t / (1 - abar_t) (Min-SNR-gamma, Hang
          et al. 2023, epsilon prediction);
        - ``cut`` (the server): times k_t^2, so the relative-noise error counts as the absolute epsilon error
          k_t^2 ||eps_S - eps'||^2 that an unsplit model minimises (split-protocol.md, near the cut).
        """
        if min_snr_gamma <= 0 and cut is None:
            return None
        t = torch.arange(self.T + 1)
        w = torch.ones(self.T + 1, dtype=torch.float64)
        ab = self.alpha_bar.double()
        if min_snr_gamma > 0:
            snr = ab[1:] / (1 - ab[1:])
            w[1:] = snr.clamp(max=min_snr_gamma) / snr
        if cut is not None:
            w[cut + 1:] *= self.server_eps_scale(t[cut + 1:], cut).double() ** 2
        idx = torch.tensor(list(steps))
        w[idx] /= w[idx].mean()
        return w.float()

    # ------------------------------------------------------------------------------------------------------------------
    # Sampling

    def sampler(self, kind: Literal["ddpm", "ddim", "dpmsolver"], cut: int, ddim_steps: int = 50,
                server_grid_steps: int = 0):
        """A diffusers scheduler whose timestep sequence contains the hand-off to x_cut.

        DDPM runs all T steps. DDIM uses a uniform stride r = T // ddim_steps anchored on the cut: the sequence is
        every index congruent to cut-1 mod r, so the server's last step lands on index cut-1 (= x_cut) exactly.
        (DDIMScheduler steps from t to t - T // num_inference_steps, so any list with that stride is valid.)
        The sequence may hold one step more or fewer than ``ddim_steps``; when the server's segment T - cut is shorter
        than the stride, DDIM's stride shrinks until the server gets a step (its ``step`` only knows one stride).

        ``dpmsolver`` is DPM-Solver++(2M) with SDE noise (Lu et al. 2022, "DPM-Solver++", Sec. 4 and its SDE variant
        in diffusers) on the same cut-anchored grid: it steps from each listed timestep to the next one, so the
        server's last step also ends on x_cut. It is a multistep solver, and each side runs it on a scheduler of its
        own: the client's first step (from x_cut) is first order, with no history from the server's steps.
        It takes any descending list, so when the server's segment holds no grid point the stride stays and index
        T - 1 is put in front: the server takes one step, from x_T to x_cut, and the client keeps the ``ddim_steps``
        grid of the independent client model (a shrunk stride would give the client several times ICM's steps).
        ``clip_sample`` becomes thresholding at 1, the same clamp of the predicted x0 to [-1, 1].
        ``server_grid_steps`` > 0 (``dpmsolver`` only) grids the server's segment as a chain of that many steps
        would be, anchored on the same cut, while the client keeps the ``ddim_steps`` grid: the server's error is
        multiplied by k_t near the cut, and more stochastic steps absorb it (docs/benchmarks.md, "The sampler near
        the cut"). Every extra network evaluation is the server's.
        """
        if kind == "ddpm":
            sched = DDPMScheduler(**self.scheduler_kwargs)
            sched.set_timesteps(num_inference_steps=self.T)
            return sched
        if kind not in ("ddim", "dpmsolver"):
            raise ValueError(f"sampler = {kind!r} is invalid (allowed: 'ddpm', 'ddim', 'dpmsolver')")
        n = ddim_steps
        while kind == "ddim" and cut < self.T and self.T // n > self.T - cut:
            n += 1  # the server's segment must hold at least one stride, or it would get no step at all
        grid = self._anchored_grid(n, cut)
        if kind == "ddim":
            sched = DDIMScheduler(**self.scheduler_kwargs, set_alpha_to_one=True)
            sched.set_timesteps(n)  # sets num_inference_steps, hence the stride T // n used by step()
            sched.timesteps = grid
            return sched
        kw = {k: v for k, v in self.scheduler_kwargs.items() if k != "clip_sample"}
        sched = DPMSolverMultistepScheduler(**kw, algorithm_type="sde-dpmsolver++", solver_order=2,
                                            final_sigmas_type="zero", thresholding=self.cfg.clip_sample,
                                            sample_max_value=1.0)
        if server_grid_steps and server_grid_steps != n:
            server, _ = split_timesteps(self._anchored_grid(server_grid_steps, cut), cut)
            grid = torch.tensor(server + split_timesteps(grid, cut)[1])
        sched.set_timesteps(timesteps=grid.tolist())
        return sched

    def _anchored_grid(self, n: int, cut: int) -> torch.Tensor:
        """Every index congruent to cut-1 mod T // n, descending; index T - 1 in front when the server's segment
        would hold no point (module docstring of `sampler`)."""
        stride = self.T // n
        grid = torch.arange(to_index(cut) % stride, self.T, stride).flip(0)  # anchored on the index of step cut
        if cut < self.T and to_step(int(grid[0])) <= cut:  # dpmsolver only: no grid point on the server's side
            grid = torch.cat([torch.tensor([to_index(self.T)]), grid])
        return grid

    def split_sampler(self, kind: Literal["ddpm", "ddim", "dpmsolver"], cut: int, ddim_steps: int = 50,
                      server_grid_steps: int = 0) -> SplitSampler:
        """A fresh `sampler` for ``cut`` with its timesteps split between the nodes (`split_timesteps`): what
        ``Server.sample_to_cut`` and ``Client.finish`` walk, and what the compute accounting counts. Fresh on every
        call: a multistep scheduler keeps the history of the steps it took."""
        sched = self.sampler(kind, cut, ddim_steps, server_grid_steps)
        return SplitSampler(sched, *split_timesteps(sched.timesteps, cut))


class SplitSampler(NamedTuple):
    """A sampler and its timesteps (diffusers indices, in sampling order) on either side of the cut."""

    scheduler: SchedulerMixin  # DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler
    server_steps: list[int]
    client_steps: list[int]


def step_kwargs(kind: str, eta: float = 0.0) -> dict:
    """Extra arguments of ``scheduler.step`` for a sampler: DDIM's ``eta`` (DDPM takes none)."""
    return {"eta": float(eta)} if kind == "ddim" else {}


def split_timesteps(timesteps: torch.Tensor, cut: int) -> tuple[list[int], list[int]]:
    """Server steps (protocol t > cut) and client steps (t <= cut), as diffusers indices in sampling order."""
    indices = [int(i) for i in timesteps]
    return [i for i in indices if to_step(i) > cut], [i for i in indices if to_step(i) <= cut]


@torch.no_grad()
def denoise(
    eps_fn: EpsFn,
    x: torch.Tensor,
    timesteps: list[int],
    scheduler,
    generator: torch.Generator | None = None,
    progress: Callable | None = None,
    step_kwargs: dict | None = None,
) -> torch.Tensor:
    """Run ``scheduler.step`` over ``timesteps`` from ``x``. Either side of the split calls this on its own steps.
    ``timesteps`` are diffusers indices; ``step_kwargs`` go to every step (DDIM's ``eta``: see `step_kwargs`)."""
    for t_index in timesteps:
        x = scheduler.step(eps_fn(x, t_index), t_index, x, generator=generator, **(step_kwargs or {})).prev_sample
        if progress is not None:
            progress()
    return x
