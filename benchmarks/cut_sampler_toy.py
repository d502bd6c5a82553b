"""The fast sampler near the cut, on a toy whose epsilon is known in closed form (issue 29, item 5).

A 2-D Gaussian mixture (8 components of std 0.1 on a circle of radius 2), T = 100 with the cosine schedule, cut
s = 30. The server's hand-off x_s is sampled with the project's DPM-Solver++(2M) SDE grid (``split_sampler``) and
compared with q(x_s) by the sliced Wasserstein-1 distance (256 directions, 20,000 points each). Three predictors
of epsilon drive the same grid:

- ``exact``: E[eps | x_t] in closed form (`collafuse.split.toy`);
- ``full``: an MLP trained as an unsplit model on t = 1..T from the images (fresh noise every step);
- ``server``: an MLP trained as the split's server on t = s+1..T from one noised view of each image at s (the
  upload, drawn once), with the relative-noise objective; eps_hat = k_t * f.

Then the remedies, each measured on the same images, budget and grids:

- ``grid``: the server's grid refined just above the cut (extra server steps halving toward the cut,
  `refined_server_grid`); the client is untouched;
- ``dense``: the server's whole segment gridded as a chain of 30 or 50 steps would be
  (``sample.server_grid_factor`` 1.5 and 2.5), the client's kept at 20 steps;
- ``weight``: the server's loss weighted by min(k_t^2, c) (normalised; the plain k_t^2 weight is c = inf);
- ``absolute``: the server's network outputs E[eps | x_t] itself (target k_t eps', loss weight 1 / k_t^2, the
  same optimum), so its error is not multiplied by k_t at sampling.

Run: ``.venv/bin/python benchmarks/cut_sampler_toy.py [--steps 6000] [--seeds 0,1,2] [--out results/cut-sampler]``.
It prints a table and writes ``results.json`` (and ``report.md``) under ``--out``. Everything runs on the CPU in
minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from collafuse.config import DiffusionConfig
from collafuse.evaluation.toy import GaussianMixture, sliced_w1
from collafuse.split.diffusion import DiffusionSchedule, denoise, to_index, to_step

T, CUT, N_IMAGES, N_EVAL = 100, 30, 5000, 20000


def refined_server_grid(server_steps: list[int], cut: int, extra: int) -> list[int]:
    """The server's part of a grid with ``extra`` more steps just above the cut, where its error is amplified by k_t
    (measured here: no gain): between the server's lowest grid index L and the hand-off index
    cut - 1, indices cut - 1 + (L - cut + 1) / 2^j for j = 1..extra, rounded and without repeats, so the steps
    halve toward the cut. The client's steps are untouched: every extra evaluation is the server's.

    Args:
        server_steps (`list[int]`): the server's diffusers indices, descending.
        cut (`int`): the cut s; the hand-off is at index s - 1.
        extra (`int`): at most this many indices are added (fewer when the gap holds fewer).
    """
    if not server_steps or extra <= 0:
        return list(server_steps)
    low, target = server_steps[-1], to_index(cut)
    gap = low - target
    added = sorted({target + round(gap / 2 ** j) for j in range(1, extra + 1)} - {target, low}, reverse=True)
    return list(server_steps) + [i for i in added if target < i < low]


class MLP(torch.nn.Module):
    """eps-predictor for 2-D points: (x, t) -> 2 numbers, with a sinusoidal embedding of t / T."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.freqs = torch.exp(torch.linspace(0, math.log(200.0), 16))
        self.net = torch.nn.Sequential(torch.nn.Linear(2 + 32, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, width), torch.nn.SiLU(),
                                       torch.nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = (t.float() / T)[:, None] * self.freqs[None]
        return self.net(torch.cat([x, a.sin(), a.cos()], dim=1))


def train(kind: str, images: torch.Tensor, sched: DiffusionSchedule, steps: int, seed: int, weight_cap: float = 0.0,
          batch: int = 512) -> MLP:
    """kind: 'full' (t ~ U{1..T}, fresh eps), 'server' (relative objective from one upload per image) or
    'absolute' (the server's data and optimum, output read as E[eps | x_t])."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    lr = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    ab = sched.alpha_bar
    uploads = ab[CUT].sqrt() * images + (1 - ab[CUT]).sqrt() * torch.randn(images.shape, generator=g)
    k_all = sched.server_eps_scale(torch.arange(CUT + 1, T + 1), CUT)
    w_all = torch.ones(T + 1)
    if weight_cap:
        w_all[CUT + 1:] = (k_all ** 2).clamp(max=weight_cap)
        w_all[CUT + 1:] /= w_all[CUT + 1:].mean()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        if kind == "full":
            t = torch.randint(1, T + 1, (batch,), generator=g)
            eps = torch.randn((batch, 2), generator=g)
            x_t = ab[t, None].sqrt() * images[idx] + (1 - ab[t, None]).sqrt() * eps
            loss = (model(x_t, t) - eps).pow(2).mean()
        else:
            t = torch.randint(CUT + 1, T + 1, (batch,), generator=g)
            eps_rel = torch.randn((batch, 2), generator=g)
            r = (ab[t] / ab[CUT])[:, None]
            x_t = r.sqrt() * uploads[idx] + (1 - r).sqrt() * eps_rel
            k = k_all[t - CUT - 1][:, None]
            w = w_all[t][:, None]
            if kind == "server":
                loss = (w * (model(x_t, t) - eps_rel).pow(2)).mean()
            else:  # absolute: f estimates E[eps | x_t]; ||f - k eps'||^2 / k^2 has the relative loss's optimum
                loss = (w * (model(x_t, t) - k * eps_rel).pow(2) / k ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
    return model.eval()


def eps_fn_of(kind: str, model: MLP | None, mix: GaussianMixture, sched: DiffusionSchedule):
    """(x [N, 2, 1, 1], diffusers index) -> standard eps, as the split's server hands to the scheduler."""

    def fn(x: torch.Tensor, t_index: int) -> torch.Tensor:
        t = to_step(int(t_index))
        flat = x.reshape(len(x), 2)
        if kind == "exact":
            eps = mix.eps(flat, float(sched.alpha_bar[t]))
        else:
            with torch.no_grad():
                eps = model(flat, torch.full((len(x),), t))
            if kind in ("server", "weight"):
                eps = float(sched.server_eps_scale(t, CUT)) * eps
        return eps.reshape(x.shape)

    return fn


def hand_off(eps_fn, sched: DiffusionSchedule, steps: int, refine: int, seed: int, dense: int = 0,
             sampler: str = "dpmsolver"):
    """x_T -> x_cut on the split's server grid (with ``refine`` extra steps above the cut, or the server's segment
    at the density of a ``dense``-step chain); returns (x_cut, server NFEs, client NFEs)."""
    split = sched.split_sampler(sampler, CUT, steps, dense)
    scheduler, server_steps = split.scheduler, split.server_steps
    if refine:
        grid = refined_server_grid(server_steps, CUT, refine)
        scheduler = sched.sampler(sampler, CUT, steps)
        scheduler.set_timesteps(timesteps=grid + split.client_steps)
        server_steps = grid
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((N_EVAL, 2, 1, 1), generator=g)
    out = denoise(eps_fn, x, server_steps, scheduler, g)
    return out.reshape(N_EVAL, 2), len(server_steps), len(split.client_steps)


def eps_rms(model: MLP, kind: str, mix: GaussianMixture, sched: DiffusionSchedule, t: int, seed: int) -> float:
    """RMS error of the standard eps a model gives at step t, over x_t ~ q(x_t), against the closed form."""
    g = torch.Generator().manual_seed(10_000 + seed)
    ab = float(sched.alpha_bar[t])
    x_t = mix.sample_noised(N_EVAL, ab, g)
    with torch.no_grad():
        eps = model(x_t, torch.full((N_EVAL,), t))
    if kind in ("server", "weight"):
        eps = float(sched.server_eps_scale(t, CUT)) * eps
    return float((eps - mix.eps(x_t, ab)).pow(2).mean().sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6000, help="training steps of every model")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (images, training, sampling)")
    ap.add_argument("--out", default="results/cut-sampler")
    ap.add_argument("--radius", type=float, default=2.0, help="the mixture's ring radius (its components' std: 0.1)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    sched = DiffusionSchedule(DiffusionConfig(timesteps=T, schedule="cosine", clip_sample=False))
    mix = GaussianMixture.ring(8, radius=args.radius, std=0.1)
    ab_cut = float(sched.alpha_bar[CUT])
    variants = [  # name, model kind, weight cap, sampler steps, refine, dense server grid
        ("exact", "exact", 0, 20, 0, 0), ("exact", "exact", 0, 50, 0, 0),
        ("full", "full", 0, 20, 0, 0), ("full", "full", 0, 50, 0, 0),
        ("server", "server", 0, 20, 0, 0), ("server", "server", 0, 50, 0, 0),
        ("server+grid2", "server", 0, 20, 2, 0),
        ("server, dense 30", "server", 0, 20, 0, 30), ("server, dense 50", "server", 0, 20, 0, 50),
        ("full, dense 30", "full", 0, 20, 0, 30), ("full, dense 50", "full", 0, 20, 0, 50),
        ("exact, dense 50", "exact", 0, 20, 0, 50),
        ("weight c=4", "weight", 4, 20, 0, 0), ("weight c=inf", "weight", 1e9, 20, 0, 0),
        ("absolute", "absolute", 0, 20, 0, 0), ("absolute", "absolute", 0, 50, 0, 0),
        ("absolute+grid2", "absolute", 0, 20, 2, 0), ("full+grid2", "full", 0, 20, 2, 0),
    ]
    rows: dict[tuple, list] = {}
    rms: dict[str, dict[int, list]] = {}
    t0 = time.perf_counter()
    for seed in seeds:
        images = mix.sample(N_IMAGES, torch.Generator().manual_seed(seed))
        ref = mix.sample_noised(N_EVAL, ab_cut, torch.Generator().manual_seed(1000 + seed))
        floor = sliced_w1(mix.sample_noised(N_EVAL, ab_cut, torch.Generator().manual_seed(2000 + seed)), ref)
        rows.setdefault(("noise floor", "-", 0, 0, 0), []).append((floor, 0, 0))
        models = {}
        for name, kind, cap, steps, refine, dense in variants:
            key_m = (kind, cap)
            if kind != "exact" and key_m not in models:
                models[key_m] = train("server" if kind == "weight" else kind, images, sched, args.steps, seed, cap)
                rms.setdefault(f"{kind}{'' if not cap else f' c={cap:g}'}", {})
                for t in (32, 35, 40, 60):
                    rms[f"{kind}{'' if not cap else f' c={cap:g}'}"].setdefault(t, []).append(
                        eps_rms(models[key_m], kind, mix, sched, t, seed))
            x_cut, nfe, client_nfe = hand_off(eps_fn_of(kind, models.get(key_m), mix, sched), sched, steps, refine,
                                              seed, dense)
            rows.setdefault((name, kind, steps, refine, dense), []).append((sliced_w1(x_cut, ref), nfe, client_nfe))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

    def mean_sd(v):
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    table = []
    for (name, _, steps, refine, dense), vals in rows.items():
        m, sd = mean_sd([v[0] for v in vals])
        table.append({"variant": name, "steps": steps, "refine": refine, "server_grid_steps": dense,
                      "server_nfe": vals[0][1], "client_nfe": vals[0][2],
                      "sliced_w1_mean": m, "sliced_w1_sd": sd, "per_seed": [v[0] for v in vals]})
    rms_table = {k: {t: mean_sd(v)[0] for t, v in d.items()} for k, d in rms.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": f"benchmarks/cut_sampler_toy.py --steps {args.steps} --seeds {args.seeds} "
                         f"--radius {args.radius} --out {args.out}",
              "toy": {"T": T, "cut": CUT, "mixture": f"8 components on a ring of radius {args.radius}, std 0.1",
                      "images": N_IMAGES,
                      "eval_points": N_EVAL, "train_steps": args.steps, "seeds": seeds},
              "sliced_w1": table, "eps_rms_after_k": rms_table, "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = ["| variant | sampler steps | server grid | server NFEs | client NFEs | sliced W1 to q(x_cut), "
             "mean ± sd |", "|---|---|---|---|---|---|"]
    for r in table:
        grid = f"+{r['refine']} near the cut" if r["refine"] else (f"as {r['server_grid_steps']} steps"
                                                                   if r["server_grid_steps"] else "-")
        lines.append(f"| {r['variant']} | {r['steps'] or '-'} | {grid} | {r['server_nfe']} | {r['client_nfe']} | "
                     f"{r['sliced_w1_mean']:.3f} ± {r['sliced_w1_sd']:.3f} |")
    lines += ["", "| model | " + " | ".join(f"RMS eps error t={t}" for t in (32, 35, 40, 60)) + " |",
              "|---|" + "---|" * 4]
    for k, d in rms_table.items():
        lines.append(f"| {k} | " + " | ".join(f"{d[t]:.3f}" for t in (32, 35, 40, 60)) + " |")
    text = "\n".join(lines)
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
