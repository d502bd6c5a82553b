"""What an honest-but-curious server can learn from what crosses the split, measured as attacks.

shared/design/split-protocol.md, section "What the server can still learn (measure it)", lists what to measure; this
module implements each item so that an evaluation can report it per client next to the paper's proxies:

- **linkage** (from uploads): given a candidate pool that contains the true image, pick the maximum-likelihood
  candidate argmin_x ||u - sqrt(abar_s) x||^2 (u ~ N(sqrt(abar_s) x0, (1 - abar_s) I), so the log-likelihood is
  that distance up to constants) and report top-1 accuracy against chance 1/M;
- **reconstruction** (from uploads): the server's best estimate of x0, the posterior mean E[x0 | u], by Tweedie's
  formula from an epsilon-predictor (the server's own model, or a public/analytic denoiser), beside the plain
  rescaling u / sqrt(abar_s); scored with MSE, PSNR and SSIM;
- **exact seed** (from uploads and the shared config): regenerate the upload noise eps from every seed the server
  could know (the shared ``[seeds]``, small integers, the node id) and invert u exactly,
  x0 = (u - sqrt(1 - abar_s) eps) / sqrt(abar_s). It recovered every image while the upload seed was shared; with
  each client's secret (seeding.ClientSecret) it must fail, and the report shows that it does;
- **averaging** (only if views were ever re-drawn, an option that is off by default): K fresh views of the same
  image average to one view at a higher effective abar;
- **proxies** (not attacks): pixel MSE between what the server sees (uploads, sampling hand-offs x_cut) and the
  client's real images, as in the CollaFuse paper (arXiv 2406.14429, Sec. 4).

Conventions: images are float tensors [N, C, H, W] in the model range [-1, 1]; ``abar_s`` is ``alpha_bar[cut]`` in
protocol indexing (``DiffusionSchedule.alpha_bar``, abar_0 = 1). Every function works on CPU tensors of the size
of one client's training set; nothing here touches a client object, only what the server holds plus the ground
truth x0 the evaluator brings to score against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..split.diffusion import to_index
from ..split.models import predict_eps
from ..split.seeding import generator as shared_generator
from ..split.upload import clip_images

if TYPE_CHECKING:  # only for annotations: a Server pulls in the whole training stack
    from ..split.server import Server

# (x [B, C, H, W] at one fixed noise level, labels [B] or None) -> the standard epsilon prediction E[eps | x].
EpsPredictor = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _check_abar(abar: float) -> float:
    abar = float(abar)
    if not 0.0 <= abar <= 1.0 or math.isnan(abar):
        raise ValueError(f"abar = {abar} is invalid (allowed: a float in [0, 1])")
    return abar


def _chunk_rows(n_cols: int, max_elems: int) -> int:
    """Rows per chunk so that a [rows, n_cols] score matrix holds at most ``max_elems`` elements."""
    return max(1, max_elems // max(1, n_cols))


# ----------------------------------------------------------------------------------------------------------------------
# Linkage


@torch.no_grad()
def linkage_scores(
    uploads: torch.Tensor,
    abar_s: float,
    pool: torch.Tensor,
    upload_labels: torch.Tensor | None = None,
    pool_labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Negative log-likelihood scores, up to per-row constants: ||u_i - sqrt(abar_s) x_j||^2 - ||u_i||^2.

    Expanded as abar_s ||x_j||^2 - 2 sqrt(abar_s) <u_i, x_j> so that it is one matmul (no [N, M, D] tensor).
    Call on chunks of ``uploads``; ``linkage_attack`` and ``linkage_predict`` do.

    Args:
        uploads (`torch.Tensor`): [n, C, H, W] uploads u.
        abar_s (`float`): abar at the cut.
        pool (`torch.Tensor`): [M, C, H, W] candidate images.
        upload_labels (`torch.Tensor`, *optional*): [n] labels of the uploads (the server receives them).
        pool_labels (`torch.Tensor`, *optional*): [M] labels of the candidates; with both label tensors, candidates
            of another label score +inf (the server knows y, so it never has to consider them).
        dtype (`torch.dtype`, defaults to float32): accumulation type; float64 separates near-duplicates better.

    Returns:
        `torch.Tensor`: [n, M] scores, lower is more likely.
    """
    a = math.sqrt(_check_abar(abar_s))
    xf = pool.flatten(1).to(dtype)
    uf = uploads.flatten(1).to(dtype)
    scores = (a * a) * (xf * xf).sum(1)[None, :] - (2 * a) * (uf @ xf.T)
    if upload_labels is not None and pool_labels is not None:
        scores.masked_fill_(upload_labels.reshape(-1, 1) != pool_labels.reshape(1, -1), math.inf)
    return scores


@torch.no_grad()
def linkage_predict(
    uploads: torch.Tensor,
    abar_s: float,
    pool: torch.Tensor,
    upload_labels: torch.Tensor | None = None,
    pool_labels: torch.Tensor | None = None,
    max_elems: int = 2**24,
) -> torch.Tensor:
    """The maximum-likelihood candidate argmin_x ||u - sqrt(abar_s) x||^2 for every upload.

    Args:
        uploads, abar_s, pool, upload_labels, pool_labels: as in `linkage_scores`.
        max_elems (`int`, defaults to 2**24): score-matrix elements per chunk (64 MB in float32).

    Returns:
        `torch.Tensor`: [N] long indices into ``pool``; exact ties go to the lowest index (``linkage_attack``
        scores ties as a uniform random choice instead).
    """
    out = []
    step = _chunk_rows(len(pool), max_elems)
    for i in range(0, len(uploads), step):
        yl = None if upload_labels is None else upload_labels[i : i + step]
        out.append(linkage_scores(uploads[i : i + step], abar_s, pool, yl, pool_labels).argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def linkage_attack(
    uploads: torch.Tensor,
    abar_s: float,
    pool: torch.Tensor,
    true_index: torch.Tensor,
    upload_labels: torch.Tensor | None = None,
    pool_labels: torch.Tensor | None = None,
    topk: Sequence[int] = (1, 5),
    max_elems: int = 2**24,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Linkage attack (split-protocol.md, "What the server can still learn"): which candidate produced each upload?

    The server is handed a pool that contains every upload's true image plus distractors and picks the
    maximum-likelihood candidate. Accuracy is scored tie-aware: when k candidates share the best score the pick is a
    uniform random choice among them, so the expected hit is 1/k (this makes abar_s = 0, where every candidate
    scores the same, land exactly on chance instead of on "index 0 wins").

    Args:
        uploads (`torch.Tensor`): [N, C, H, W] uploads.
        abar_s (`float`): abar at the cut.
        pool (`torch.Tensor`): [M, C, H, W] candidates.
        true_index (`torch.Tensor`): [N] index into ``pool`` of each upload's true image.
        upload_labels, pool_labels (`torch.Tensor`, *optional*): restrict each upload to candidates of its label.
        topk (`Sequence[int]`, defaults to (1, 5)): report expected top-k accuracy for each k.
        max_elems (`int`, defaults to 2**24): score-matrix elements per chunk.
        dtype (`torch.dtype`, defaults to float32): see `linkage_scores`.

    Returns:
        `dict`: ``attack``, ``method``, ``n``, ``pool_size``, ``chance`` (expected top-1 of a random guess: 1/M,
        or the mean of 1/M_i over uploads when restricted to same-label candidates), ``chance_stderr`` (binomial
        standard error of a random guesser over n uploads), ``top1`` and ``top1_stderr``, ``top{k}`` and
        ``chance_top{k}`` for the other k, ``mean_rank`` and ``median_rank`` of the true image (1 = best).
    """
    n, m = len(uploads), len(pool)
    true_index = true_index.reshape(-1).long()
    restricted = upload_labels is not None and pool_labels is not None
    step = _chunk_rows(m, max_elems)
    less, ties, sizes = [], [], []
    for i in range(0, n, step):
        yl = upload_labels[i : i + step] if restricted else None
        s = linkage_scores(uploads[i : i + step], abar_s, pool, yl, pool_labels if restricted else None, dtype)
        true = s.gather(1, true_index[i : i + step, None])
        less.append((s < true).sum(1))
        ties.append((s == true).sum(1) - 1)  # other candidates exactly as likely as the true one
        sizes.append(torch.isfinite(s).sum(1))
    less_t, ties_t, size_t = (torch.cat(v).double() for v in (less, ties, sizes))
    # Expected rank under a uniform random tie-break: 1 + strictly better + half of the equally good others.
    rank = 1 + less_t + ties_t / 2
    out = {
        "attack": "linkage",
        "method": "max_likelihood_same_label" if restricted else "max_likelihood",
        "n": n,
        "pool_size": m,
        "abar_s": float(abar_s),
    }
    chance = float((1 / size_t).mean()) if n else 1 / m
    out["chance"] = chance
    out["chance_stderr"] = math.sqrt(chance * (1 - chance) / max(n, 1))
    for k in topk:
        # P(1 + less + U <= k) with U uniform on {0..ties}: the share of tie-break orders that keep it in the top k.
        hit = ((k - less_t) / (ties_t + 1)).clamp(0, 1)
        acc = float(hit.mean()) if n else math.nan
        out[f"top{k}"] = acc
        if k == 1:
            out["top1_stderr"] = math.sqrt(acc * (1 - acc) / max(n, 1))
        else:
            out[f"chance_top{k}"] = float((k / size_t).clamp(max=1).mean()) if n else math.nan
    out["mean_rank"] = float(rank.mean()) if n else math.nan
    out["median_rank"] = float(rank.median()) if n else math.nan
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Reconstruction


def rescale_reconstruct(uploads: torch.Tensor, abar_s: float, clip: bool = True) -> torch.Tensor:
    """Baseline reconstruction u / sqrt(abar_s): unbiased, with per-pixel noise variance (1 - abar_s) / abar_s.

    Args:
        uploads (`torch.Tensor`): [N, C, H, W] views at level abar_s.
        abar_s (`float`): abar of the views. At 0 the views carry nothing; zeros (the centre of the data range)
            are returned.
        clip (`bool`, defaults to True): clamp to the data range [-1, 1]. Projecting onto a convex set that holds
            x0 never increases any pixel's error, so the clipped estimate is at least as good.
    """
    abar_s = _check_abar(abar_s)
    if abar_s == 0:
        return torch.zeros_like(uploads)
    x = uploads / math.sqrt(abar_s)
    return x.clamp(-1, 1) if clip else x


def tweedie_x0(x: torch.Tensor, abar: float, eps_hat: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """Tweedie's formula: E[x0 | x] = (x - sqrt(1 - abar) E[eps | x]) / sqrt(abar).

    For x = sqrt(abar) x0 + sqrt(1 - abar) eps, Tweedie's formula (Robbins 1956; Efron 2011, "Tweedie's formula and
    selection bias", JASA) gives E[x0 | x] from the score of the marginal of x, and an epsilon-predictor trained with
    the DDPM loss estimates E[eps | x] = -sqrt(1 - abar) * score (Ho et al. 2020; Song et al. 2021), which yields
    the expression above: the posterior mean, the MSE-optimal estimate of x0 from x.

    Args:
        x (`torch.Tensor`): [N, C, H, W] noisy images at level abar.
        abar (`float`): abar of x, in (0, 1].
        eps_hat (`torch.Tensor`): [N, C, H, W] the standard epsilon prediction E[eps | x].
        clip (`bool`, defaults to True): clamp to [-1, 1] (see `rescale_reconstruct`).
    """
    abar = _check_abar(abar)
    if abar == 0:
        raise ValueError("tweedie_x0 needs abar > 0: at abar = 0 the view holds no information about x0")
    x0 = (x - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)
    return x0.clamp(-1, 1) if clip else x0


@torch.no_grad()
def tweedie_reconstruct(
    x: torch.Tensor,
    abar: float,
    eps_fn: EpsPredictor,
    labels: torch.Tensor | None = None,
    batch_size: int = 256,
    clip: bool = True,
) -> torch.Tensor:
    """Posterior-mean reconstruction E[x0 | x] with any standard epsilon-predictor at the level of x.

    Args:
        x (`torch.Tensor`): [N, C, H, W] views at level abar (e.g. the uploads, abar = abar_s).
        abar (`float`): abar of x, in (0, 1].
        eps_fn (`EpsPredictor`): (x_batch, labels_batch or None) -> E[eps | x_batch] at level abar.
        labels (`torch.Tensor`, *optional*): [N] labels passed to ``eps_fn`` batch by batch.
        batch_size (`int`, defaults to 256): images per ``eps_fn`` call.
        clip (`bool`, defaults to True): clamp to [-1, 1].
    """
    parts = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        yb = None if labels is None else labels[i : i + batch_size]
        parts.append(tweedie_x0(xb, abar, eps_fn(xb, yb).to(xb), clip))
    return torch.cat(parts) if parts else x.clone()


def gaussian_eps_fn(abar: float, mu: torch.Tensor | float, var: torch.Tensor | float) -> EpsPredictor:
    """The exact epsilon-predictor for x0 ~ N(mu, var) independently per pixel, at level abar.

    x = sqrt(abar) x0 + sqrt(1 - abar) eps is then Gaussian too, and regressing eps on x gives
    E[eps | x] = sqrt(1 - abar) (x - sqrt(abar) mu) / (abar var + 1 - abar). Through `tweedie_x0` this is the
    per-pixel Wiener filter mu + sqrt(abar) var (x - sqrt(abar) mu) / (abar var + 1 - abar). Used as the analytic
    reference in tests and, with (mu, var) fitted from the uploads (`gaussian_prior_from_uploads`), as a
    model-free empirical-Bayes attack (Robbins 1956; Efron 2011) that any server can run.

    Args:
        abar (`float`): the level the predictor is for.
        mu (`torch.Tensor` or `float`): prior mean, broadcastable to [C, H, W].
        var (`torch.Tensor` or `float`): prior variance, broadcastable to [C, H, W].
    """
    abar = _check_abar(abar)

    def eps_fn(x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        m = torch.as_tensor(mu, dtype=x.dtype, device=x.device)
        v = torch.as_tensor(var, dtype=x.dtype, device=x.device)
        # clamp: at abar = 1 with var = 0 the ratio is 0/0, and the answer (no noise to remove) is 0.
        return math.sqrt(1 - abar) * (x - math.sqrt(abar) * m) / (abar * v + (1 - abar)).clamp_min(1e-12)

    return eps_fn


def gaussian_prior_from_uploads(
    uploads: torch.Tensor, abar_s: float, var_floor: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel (mu, var) of x0 estimated by the server from the uploads alone (method of moments).

    E[u] = sqrt(abar_s) mu and Var[u] = abar_s var + 1 - abar_s, so mu = mean(u) / sqrt(abar_s) and
    var = (Var(u) - (1 - abar_s)) / abar_s. Both are projected onto what [-1, 1] data allows (|mu| <= 1,
    var in [var_floor, 1]): at small abar_s the raw estimates are dominated by sampling noise.

    Args:
        uploads (`torch.Tensor`): [N, C, H, W] uploads, N >= 2.
        abar_s (`float`): abar at the cut, > 0 (at 0 the prior is (0, 1): nothing can be estimated).
        var_floor (`float`, defaults to 1e-4): smallest variance returned.

    Returns:
        `tuple[torch.Tensor, torch.Tensor]`: mu and var, each [C, H, W].
    """
    abar_s = _check_abar(abar_s)
    if abar_s == 0 or len(uploads) < 2:
        return torch.zeros_like(uploads[0]), torch.ones_like(uploads[0])
    u = uploads.double()
    mu = (u.mean(0) / math.sqrt(abar_s)).clamp(-1, 1)
    var = ((u.var(0) - (1 - abar_s)) / abar_s).clamp(var_floor, 1)
    return mu.to(uploads.dtype), var.to(uploads.dtype)


def server_eps_fn(server: Server, client: int = 0, use_ema: bool = True, guidance_scale: float = 1.0) -> EpsPredictor:
    """The standard epsilon-predictor at the cut level that a trained `Server` can build from its own model.

    The server owns protocol steps t = s+1..T only. Its lowest step, t = s+1 (diffusers index s), is the nearest
    level to the uploads u ~ q(x_s | x0); its relative-noise prediction converts to the standard one with
    k_{s+1} = ``server_eps_scale(s+1, s)`` (split-protocol.md, Training). This treats x_s as if it were x_{s+1}:
    one step off, a small mismatch of the input noise level (abar_s vs abar_{s+1}; e.g. 0.8987 vs 0.8980 at
    s = 200 of the cosine T = 1000) that the evaluation accepts rather than leave the server's model out. (An exact
    alternative is to noise u forward to x_{s+1} with ``server_noise`` and apply Tweedie at abar_{s+1}, at the
    price of a little extra noise.)

    The server cannot go lower: it has no model for t <= s, so it cannot run the client's steps; Tweedie's one jump
    from level s (or from its own hand-off x_s) to x0 is the best continuation it has.

    Args:
        server (`Server`): a server with at least one step (cut < T), trained or not.
        client (`int`, defaults to 0): client index used for the conditioning when the server model is conditioned
            on the client (the server knows which client sent each upload).
        use_ema (`bool`, defaults to True): the EMA weights, as the server samples with.
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance weight; 1 is the plain conditional model.

    Returns:
        `EpsPredictor`: (x, labels or None) -> k_{s+1} * eps_S(x, s, ids); labels None uses the null label (the
        unconditional branch trained with ``cond_drop_prob``) when the model is conditional.
    """
    if not server.trains:
        raise ValueError(f"the server owns no step at cut = {server.cut} = T, so it has no model to denoise with")
    s = server.cut_of(client)  # the client's own cut (a heterogeneous federation's server learnt it from the upload)
    lowest = s + 1  # the server's lowest protocol step for this client
    k = float(server.schedule.server_eps_scale(lowest, server.cut))  # the model's output is relative to the reference
    model = server.learner.sampling_model(use_ema)
    enc = server.labels

    def eps_fn(x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        xd = x.to(server.device)
        if enc.null_id is None:
            ids = None
        elif labels is None:
            ids = torch.full((len(x),), enc.null_id, dtype=torch.long, device=server.device)
        else:
            ids = enc.encode(labels.to(server.device).long(), client)
        return (k * predict_eps(model, xd, to_index(lowest), ids, enc.null_id, guidance_scale)).to(x.device, x.dtype)

    return eps_fn


@torch.no_grad()
def score_reconstruction(x_hat: torch.Tensor, x0: torch.Tensor, psnr_cap: float = 100.0) -> dict:
    """MSE, PSNR and SSIM of reconstructions against the true images, averaged over images.

    PSNR and SSIM come from ``torchmetrics.functional.image`` with data_range = 2 (images in [-1, 1]); PSNR is computed
    per image and then averaged (the usual convention for reconstruction attacks), and capped at ``psnr_cap`` so an
    exact recovery (MSE 0, e.g. at cut 0) stays a finite, JSON-able number. SSIM uses the standard 11x11 Gaussian
    window (sigma 1.5; Wang et al. 2004) and needs images of at least 11x11.

    Args:
        x_hat (`torch.Tensor`): [N, C, H, W] reconstructions.
        x0 (`torch.Tensor`): [N, C, H, W] true images.
        psnr_cap (`float`, defaults to 100.0): largest PSNR reported, in dB.

    Returns:
        `dict`: ``mse`` (per pixel), ``psnr`` (dB), ``ssim``.
    """
    a, b = x_hat.float().cpu(), x0.float().cpu()
    mse = float(((a - b) ** 2).mean()) if len(a) else math.nan
    if not len(a):
        return {"mse": mse, "psnr": math.nan, "ssim": math.nan}
    psnr = peak_signal_noise_ratio(a, b, data_range=2.0, reduction="none", dim=(1, 2, 3))
    psnr = torch.nan_to_num(psnr, posinf=psnr_cap).clamp(max=psnr_cap)
    ssim = structural_similarity_index_measure(a, b, data_range=2.0, reduction="none")
    return {"mse": mse, "psnr": float(psnr.mean()), "ssim": float(ssim.mean())}


# ----------------------------------------------------------------------------------------------------------------------
# Exact seed


def seed_candidates(node_id: str, shared_seeds: Sequence[int] = (), small: int = 16) -> list[tuple[str, Callable]]:
    """Every upload-noise stream a server could try: (label, () -> torch.Generator).

    Bases: the shared ``[seeds]`` values and the integers 0..small-1. Streams: ``seeding.generator`` with the names
    a client might have used (its node id, "upload", the view number 1), and a plain ``manual_seed(base)``. The old
    scheme (base ``seeds.upload`` = 3, names (node id, "upload")) is among them.
    """
    bases = sorted({*map(int, shared_seeds), *range(small)})
    names = [(node_id, "upload"), (node_id, "upload", 1), ("upload", node_id), (node_id,), ("upload",), ()]
    out: list[tuple[str, Callable]] = []
    for b in bases:
        out.append((f"manual_seed({b})", lambda b=b: torch.Generator().manual_seed(b)))
        for n in names:
            out.append((f"generator({b}, {', '.join(map(repr, n))})", lambda b=b, n=n: shared_generator(b, *n)))
    return out


@torch.no_grad()
def exact_seed_attack(uploads: torch.Tensor, abar_s: float, node_id: str,
                      shared_seeds: Sequence[int] = (), screen: int = 512) -> tuple[torch.Tensor, dict]:
    """Invert every upload with each candidate noise stream and keep the one the server would believe.

    The server does not know x0, but it knows x0 lies in [-1, 1]: with the right eps the inversion
    (u - sqrt(1 - abar_s) eps) / sqrt(abar_s) lands inside the box (up to float error), with a wrong one it carries
    noise of std sqrt(2 (1 - abar_s) / abar_s) and leaves it. The candidate with the smallest mean squared excess
    outside [-1, 1] wins.

    Each candidate is scored on the first ``screen`` uploads only, then the winner is replayed over the whole upload.
    That is the same search: a CPU generator fills a tensor from one sequential stream, so the noise of the first
    ``screen`` rows is the first rows of the whole stream (for a multiple of 16 rows;
    tests/evaluation/test_disclosure.py checks it on this torch), and a wrong stream leaves the box by the same margin
    on the screened images as on all.
    It costs one stream of the whole upload instead of one per candidate (~220 of them: 3.6 G normal draws per
    client).

    Args:
        uploads (`torch.Tensor`): [N, C, H, W] one client's whole upload, in order (the stream covers all of it).
        abar_s (`float`): abar at the cut, in (0, 1].
        node_id (`str`): the client's node id (the server knows it).
        shared_seeds (`Sequence[int]`): the run config's ``[seeds]`` values (the server holds the config).
        screen (`int`, defaults to 512): uploads each candidate is scored on; a positive multiple of 16.

    Returns:
        `tuple[torch.Tensor, dict]`: the winning reconstruction (clipped to [-1, 1]) and ``candidates``, the winning
        ``stream``, its ``box_excess`` over the whole upload and the median over candidates on the screened uploads
        (``median_box_excess``; near 0 and far above it: recovered), and ``screened`` (how many uploads that was).
    """
    abar_s = _check_abar(abar_s)
    if screen <= 0 or screen % 16:
        raise ValueError(f"screen = {screen}: must be a positive multiple of 16 (the CPU normal sampler's block)")
    u = uploads.float().cpu()
    head = u[:screen]
    a, b = math.sqrt(abar_s), math.sqrt(1 - abar_s)

    def box_excess(x: torch.Tensor) -> float:
        return float((x.abs() - 1).clamp_min(0).pow(2).mean())

    best = None
    excess = []
    for label, make in seed_candidates(node_id, shared_seeds):
        e = box_excess((head - b * torch.randn(head.shape, generator=make())) / a)
        excess.append(e)
        if best is None or e < best[0]:
            best = (e, label, make)
    _, label, make = best
    x = (u - b * torch.randn(u.shape, generator=make())) / a
    info = {"candidates": len(excess), "stream": label, "box_excess": box_excess(x),
            "median_box_excess": float(torch.tensor(excess).median()), "screened": len(head)}
    return x.clamp(-1, 1), info


# ----------------------------------------------------------------------------------------------------------------------
# Averaging


def effective_alpha_bar(abar_s: float, k: int) -> float:
    """The level at which the mean of k independent views of the same x0 is an ordinary single view.

    Derivation: the mean is ubar = sqrt(abar_s) x0 + sqrt((1 - abar_s) / k) eps with eps ~ N(0, I). Scaling by
    c = 1 / sqrt(abar_s + (1 - abar_s) / k) gives c ubar = sqrt(abar') x0 + sqrt(1 - abar') eps with
    abar' = c^2 abar_s = k abar_s / (k abar_s + 1 - abar_s), i.e. (1 - abar') / abar' = (1 - abar_s) / (k abar_s):
    the noise-to-signal ratio falls by k. So c ubar ~ q(x_{abar'} | x0), and any denoiser for level abar' applies.

    Args:
        abar_s (`float`): level of each view.
        k (`int`): number of independent views averaged, >= 1.
    """
    abar_s = _check_abar(abar_s)
    if k < 1:
        raise ValueError(f"k = {k} is invalid (allowed: an integer >= 1)")
    den = k * abar_s + 1 - abar_s
    return k * abar_s / den if den > 0 else 1.0


@torch.no_grad()
def averaging_attack(
    x0: torch.Tensor,
    abar_s: float,
    ks: Sequence[int],
    generator: torch.Generator,
    eps_fn_at: Callable[[float], EpsPredictor] | None = None,
    labels: torch.Tensor | None = None,
    clip: bool = True,
    batch_size: int = 256,
    psnr_cap: float = 100.0,
    truth: torch.Tensor | None = None,
) -> list[dict]:
    """Averaging attack: what the server would get if the client re-drew its cut noise every round (off by default).

    For each K, draws K independent views sqrt(abar_s) x0 + sqrt(1 - abar_s) eps_k, averages them and reconstructs
    (a) by rescaling the mean by 1 / sqrt(abar_s), and (b) if ``eps_fn_at`` is given, by Tweedie at the effective
    level abar' = `effective_alpha_bar`(abar_s, K) after scaling the mean to an ordinary view at that level. The
    protocol itself uploads one fixed view (split-protocol.md, Training), so this measures the cost of the option.

    Args:
        x0 (`torch.Tensor`): [N, C, H, W] the images the views are drawn of (what the client uploads: with
            ``split.upload_clip_norm`` the clipped images).
        abar_s (`float`): abar at the cut, > 0.
        ks (`Sequence[int]`): numbers of views, e.g. (1, 4, 16, 64).
        generator (`torch.Generator`): CPU generator for the simulated noise.
        eps_fn_at (`Callable[[float], EpsPredictor]`, *optional*): abar -> epsilon-predictor at that level (e.g.
            ``lambda a: gaussian_eps_fn(a, mu, var)``). The server's own model covers only levels t > s, while
            abar' > abar_s is a lower noise level (the client's range), so its model does not apply here.
        labels (`torch.Tensor`, *optional*): [N] labels passed to the predictor.
        clip (`bool`, defaults to True): clamp reconstructions to [-1, 1].
        batch_size (`int`, defaults to 256): images per predictor call.
        psnr_cap (`float`, defaults to 100.0): see `score_reconstruction`.
        truth (`torch.Tensor`, *optional*): the images reconstructions are scored against; defaults to ``x0``
            (with clipping, the unclipped images: averaging recovers at best the clipped ones).

    Returns:
        `list[dict]`: one record per (K, method) with ``attack`` = "averaging", ``method``, ``k``, ``abar_eff``,
        ``n``, ``pool_size`` (None), ``expected_mse_unclipped`` for the rescale ((1 - abar') / abar'), and
        ``mse``, ``psnr``, ``ssim``.
    """
    abar_s = _check_abar(abar_s)
    if abar_s == 0:
        raise ValueError("averaging_attack needs abar_s > 0: averaging pure noise reveals nothing")
    a, b = math.sqrt(abar_s), math.sqrt(1 - abar_s)
    truth = x0 if truth is None else truth
    out = []
    for k in ks:
        total = torch.zeros_like(x0)
        for _ in range(k):  # K views one at a time: memory stays at one view whatever K is
            total += a * x0 + b * torch.randn(x0.shape, generator=generator).to(x0)
        mean = total / k
        ab_eff = effective_alpha_bar(abar_s, k)
        base = {"attack": "averaging", "k": int(k), "abar_s": abar_s, "abar_eff": ab_eff, "n": len(x0),
                "pool_size": None}
        rec = rescale_reconstruct(mean, abar_s, clip)
        out.append({**base, "method": "rescale", "expected_mse_unclipped": (1 - ab_eff) / ab_eff,
                    **score_reconstruction(rec, truth, psnr_cap)})
        if eps_fn_at is not None:
            view = mean / math.sqrt(abar_s + (1 - abar_s) / k)  # an ordinary view at level abar_eff
            rec = tweedie_reconstruct(view, ab_eff, eps_fn_at(ab_eff), labels, batch_size, clip)
            out.append({**base, "method": "tweedie", **score_reconstruction(rec, truth, psnr_cap)})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The paper's proxies


@torch.no_grad()
def paired_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Per-pixel MSE between matching images (an upload and the image it came from)."""
    return float(((a.double() - b.double()) ** 2).mean()) if len(a) else math.nan


@torch.no_grad()
def unpaired_mse(server_images: torch.Tensor, real_images: torch.Tensor, max_elems: int = 2**24) -> dict:
    """Per-pixel MSE between server-visible images that match no particular real image (hand-offs) and real ones.

    Two readings, both reported: ``mean_over_pairs``, the MSE averaged over all (server, real) pairs, which is the
    paper's set-to-set proxy but is dominated by the spread of both sets (computed in closed form,
    mean ||a||^2 + mean ||b||^2 - 2 <mean a, mean b>, no pair matrix); and ``nearest_real``, each server image's
    MSE to its nearest real image, averaged, which is the reading that would flag a hand-off copying a training
    image (as in memorisation checks, Carlini et al. 2023).

    Args:
        server_images (`torch.Tensor`): [N, C, H, W].
        real_images (`torch.Tensor`): [M, C, H, W].
        max_elems (`int`, defaults to 2**24): distance-matrix elements per chunk.

    Returns:
        `dict`: ``mean_over_pairs``, ``nearest_real`` (per-pixel MSE), ``n``, ``n_real``.
    """
    a, b = server_images.flatten(1).double(), real_images.flatten(1).double()
    d = a.shape[1]
    if not len(a) or not len(b):
        return {"mean_over_pairs": math.nan, "nearest_real": math.nan, "n": len(a), "n_real": len(b)}
    pairs = (a.pow(2).sum(1).mean() + b.pow(2).sum(1).mean() - 2 * a.mean(0) @ b.mean(0)) / d
    b_sq = b.pow(2).sum(1)
    nearest = []
    for i in range(0, len(a), _chunk_rows(len(b), max_elems)):
        ai = a[i : i + _chunk_rows(len(b), max_elems)]
        dist = (ai.pow(2).sum(1, keepdim=True) + b_sq[None, :] - 2 * ai @ b.T).clamp_min(0)
        nearest.append(dist.min(1).values / d)
    return {"mean_over_pairs": float(pairs), "nearest_real": float(torch.cat(nearest).mean()), "n": len(a),
            "n_real": len(b)}


# ----------------------------------------------------------------------------------------------------------------------
# One entry point


@torch.no_grad()
def disclosure_report(
    x0: torch.Tensor,
    uploads: torch.Tensor,
    abar_s: float,
    labels: torch.Tensor | None = None,
    server: Server | None = None,
    client: int = 0,
    distractors: torch.Tensor | None = None,
    distractor_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 4, 16, 64),
    x_cut: torch.Tensor | None = None,
    x_cut_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    psnr_cap: float = 100.0,
    node_id: str | None = None,
    shared_seeds: Sequence[int] = (),
    all_uploads: torch.Tensor | None = None,
    clip_norm: float | None = None,
) -> dict:
    """Everything an honest-but-curious server could learn about one client's training images, as plain numbers.

    Runs, for one client (split-protocol.md, "What the server can still learn"):

    - ``linkage``: max-likelihood linkage of the uploads over the pool x0 + distractors; and
      ``linkage_same_label`` restricted to candidates with the upload's label, when labels are known for the pool;
    - ``reconstruction_rescale``, ``reconstruction_tweedie_gaussian`` (empirical-Bayes Wiener filter with the
      per-pixel prior the server can fit from the uploads), ``reconstruction_tweedie_server`` (Tweedie with the
      server's own model, `server_eps_fn`, when ``server`` is given and owns a step);
    - ``reconstruction_exact_seed``: `exact_seed_attack` with the shared seeds, when ``node_id`` is given;
      ``recovered`` says whether it rebuilt x0 exactly (max error below 1e-3);
    - ``averaging_k{K}_rescale`` / ``averaging_k{K}_tweedie`` for each K in ``ks`` (simulated: the protocol does
      not re-draw views by default);
    - proxies: ``proxy_upload_mse`` (uploads vs their own images, paired), and with ``x_cut`` (the server's sampling
      hand-offs for this client) ``proxy_handoff_mse`` (unpaired, `unpaired_mse`) and, with a server,
      ``proxy_handoff_tweedie_mse`` (the server's one-jump continuation of its own hand-offs towards x0).

    Every record carries ``attack``, ``method``, ``n``, ``pool_size`` (None where there is no pool) and ``chance``:
    1/M for linkage; for reconstruction, the scores of the per-pixel mean of x0, the best image-independent guess
    (an oracle baseline: the server only knows an estimate of it). Cut T (nothing uploaded) has nothing to report;
    at cut 0 (abar_s = 1) the upload is x0 and every attack is exact.

    Args:
        x0 (`torch.Tensor`): [N, C, H, W] the client's true training images, in upload order (ground truth).
        uploads (`torch.Tensor`): [N, C, H, W] what the client uploaded for them.
        abar_s (`float`): abar at the cut, ``schedule.alpha_bar[cut]``.
        labels (`torch.Tensor`, *optional*): [N] the uploaded labels.
        server (`Server`, *optional*): the trained server, for its own-model attacks.
        client (`int`, defaults to 0): this client's index (conditioning of a client-conditioned server model).
        distractors (`torch.Tensor`, *optional*): [D, C, H, W] extra candidates for linkage (e.g. other clients'
            images and held-out images); without them the pool is x0 alone (M = N).
        distractor_labels (`torch.Tensor`, *optional*): [D] their labels, for the same-label linkage.
        ks (`Sequence[int]`, defaults to (1, 4, 16, 64)): view counts for the averaging attack; empty skips it.
        x_cut (`torch.Tensor`, *optional*): [n, C, H, W] hand-offs the server sent this client when sampling.
        x_cut_labels (`torch.Tensor`, *optional*): [n] the labels they were requested for (the server knows them);
            without them the server model's null label is used.
        generator (`torch.Generator`, *optional*): for the averaging simulation; defaults to a fresh CPU generator
            seeded 0, so the report is deterministic without touching the global RNG.
        batch_size (`int`, defaults to 256): images per model call.
        psnr_cap (`float`, defaults to 100.0): see `score_reconstruction`.
        node_id (`str`, *optional*): the client's node id; with it the exact-seed attack runs.
        shared_seeds (`Sequence[int]`): the ``[seeds]`` values of the shared config, for the exact-seed attack.
        all_uploads (`torch.Tensor`, *optional*): the client's whole upload when ``uploads`` is its first N rows
            (a noise stream can only be replayed over the whole upload); defaults to ``uploads``.
        clip_norm (`float`, *optional*): ``split.upload_clip_norm`` (public in the config): linkage then scores each
            candidate as the client would have uploaded it, clipped to this norm.

    Returns:
        `dict`: ``{"abar_s", "n", "pool_size", "results": {name: record}}``, JSON-able (no NaN for N >= 2).
    """
    abar_s = _check_abar(abar_s)
    x0, uploads = x0.float().cpu(), uploads.float().cpu()
    n = len(x0)
    if uploads.shape != x0.shape:
        raise ValueError(f"uploads {tuple(uploads.shape)} and x0 {tuple(x0.shape)} must have the same shape")
    labels = None if labels is None else labels.long().cpu()
    distractor_labels = None if distractor_labels is None else distractor_labels.long().cpu()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    pool = x0 if distractors is None else torch.cat([x0, distractors.float().cpu()])
    truth = torch.arange(n)
    results: dict[str, dict] = {}

    scored_pool = pool if clip_norm is None else clip_images(pool, clip_norm)
    results["linkage"] = linkage_attack(uploads, abar_s, scored_pool, truth)
    if labels is not None and (distractors is None or distractor_labels is not None):
        pool_labels = labels if distractors is None else torch.cat([labels, distractor_labels])
        results["linkage_same_label"] = linkage_attack(uploads, abar_s, scored_pool, truth, labels, pool_labels)

    prior = score_reconstruction(x0.mean(0, keepdim=True).expand_as(x0), x0, psnr_cap)

    def record(attack: str, method: str, x_hat: torch.Tensor, **extra) -> dict:
        return {"attack": attack, "method": method, "n": len(x_hat), "pool_size": None, "chance": prior,
                **extra, **score_reconstruction(x_hat, x0, psnr_cap)}

    results["reconstruction_rescale"] = record("reconstruction", "rescale", rescale_reconstruct(uploads, abar_s))
    mu, var = gaussian_prior_from_uploads(uploads, abar_s)
    if abar_s > 0:
        rec = tweedie_reconstruct(uploads, abar_s, gaussian_eps_fn(abar_s, mu, var), None, batch_size)
        results["reconstruction_tweedie_gaussian"] = record("reconstruction", "tweedie_gaussian_empirical_bayes", rec)
    if node_id is not None and abar_s > 0:
        full = uploads if all_uploads is None else all_uploads.float().cpu()
        x_hat, info = exact_seed_attack(full, abar_s, node_id, shared_seeds)
        err = float((x_hat[:n] - x0).abs().max()) if n else math.nan
        results["reconstruction_exact_seed"] = record("reconstruction", "exact_seed_from_shared_config", x_hat[:n],
                                                      recovered=err < 1e-3, max_error=err, **info)
    server_eps = server_eps_fn(server, client) if server is not None and server.trains else None
    if server_eps is not None and abar_s > 0:
        rec = tweedie_reconstruct(uploads, abar_s, server_eps, labels, batch_size)
        results["reconstruction_tweedie_server"] = record("reconstruction", "tweedie_server_model", rec)

    if abar_s > 0:
        # Re-drawn views are views of what the client uploads: with clipping, of the clipped images.
        viewed = x0 if clip_norm is None else clip_images(x0, clip_norm)
        for r in averaging_attack(viewed, abar_s, ks, gen, lambda ab: gaussian_eps_fn(ab, mu, var), None, True,
                                  batch_size, psnr_cap, truth=x0):
            r["chance"] = prior
            r["views_of"] = "images" if clip_norm is None else f"images clipped to L2 norm {clip_norm}"
            results[f"averaging_k{r['k']}_{r['method']}"] = r

    # The paper's proxies: raw pixel distances. They track the noise level more than what can be inferred:
    # E||u - x0||^2 / D = (1 - sqrt(abar_s))^2 E[x0^2] + (1 - abar_s), whatever the attacks above achieve.
    results["proxy_upload_mse"] = {"attack": "proxy", "method": "upload_vs_own_image_paired", "n": n,
                                   "pool_size": None, "chance": None, "mse": paired_mse(uploads, x0)}
    if x_cut is not None:
        xc = x_cut.float().cpu()
        results["proxy_handoff_mse"] = {"attack": "proxy", "method": "handoff_vs_real_unpaired", "pool_size": n,
                                        "chance": None, **unpaired_mse(xc, x0)}
        if server_eps is not None and abar_s > 0:
            # The server's own continuation of a hand-off: it cannot run the client's steps (no model for
            # t <= s), so one Tweedie jump from x_s is the closest to x0 it can get.
            jump = tweedie_reconstruct(xc, abar_s, server_eps, x_cut_labels, batch_size)
            results["proxy_handoff_tweedie_mse"] = {"attack": "proxy", "method": "handoff_tweedie_vs_real_unpaired",
                                                    "pool_size": n, "chance": None, **unpaired_mse(jump, x0)}
    return {"abar_s": abar_s, "n": n, "pool_size": len(pool), "results": results}
