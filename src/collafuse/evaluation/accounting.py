"""The upload as a Gaussian mechanism: its formal per-image (epsilon, delta) from a maintained accountant.

A client uploads, once, u = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps for each of its images (split-protocol.md,
Upload). Rescaled, u / sqrt(abar_s) = x0 + sigma_s eps with

    sigma_s = sqrt((1 - abar_s) / abar_s),

so releasing u is the Gaussian mechanism on the image x0 with noise standard deviation sigma_s (rescaling by a
public constant changes nothing). The guarantee is local and per image: any image of the domain against any other
(replace-one on the image itself), so the L2 sensitivity is the domain's diameter,

    Delta = 2 sqrt(d)   for pixels in [-1, 1] (d = C x H x W; 56 for 28 x 28), or
    Delta = 2 C         when every image is first clipped to L2 norm C (``split.upload_clip_norm``;
                        ``collafuse.split.upload.clip_images``).

K views of the same image (``split.fresh_upload_noise``, one per round) compose; the server then holds K Gaussian
releases of one x0. The (epsilon, delta) pairs come from Google's ``dp_accounting`` privacy-loss-distribution
accountant, which is exact for the Gaussian mechanism up to its discretisation (pessimistic: it never reports a
smaller epsilon than the true one); the analytic Gaussian mechanism of Balle & Wang (ICML 2018, Theorem 8) is the
closed form it is tested against. delta defaults to 1 / (training images), as is usual.
"""

from __future__ import annotations

import math


def upload_noise_std(alpha_bar_s: float) -> float:
    """sigma_s of u / sqrt(abar_s) = x0 + sigma_s eps; 0 at abar_s = 1 (cut 0: the upload is the image itself).

    Args:
        alpha_bar_s (`float`): abar at the cut, in (0, 1].
    """
    if not 0.0 < alpha_bar_s <= 1.0:
        raise ValueError(f"alpha_bar_s = {alpha_bar_s!r} is invalid (allowed: 0 < alpha_bar_s <= 1)")
    return math.sqrt((1.0 - alpha_bar_s) / alpha_bar_s)


def image_sensitivity(num_pixels: int, clip_norm: float | None = None) -> float:
    """Replace-one L2 sensitivity of an image: the diameter of [-1, 1]^d, or 2 C after clipping to norm C.

    Args:
        num_pixels (`int`): d = channels x height x width.
        clip_norm (`float`, *optional*): the L2 bound C images are clipped to before noising; None: no clipping.
    """
    full = 2.0 * math.sqrt(num_pixels)
    return full if clip_norm is None else min(full, 2.0 * clip_norm)


def gaussian_epsilon(noise_std: float, sensitivity: float, delta: float, compositions: int = 1) -> float:
    """The smallest epsilon such that ``compositions`` releases of the Gaussian mechanism are (epsilon, delta)-DP.

    Args:
        noise_std (`float`): sigma of each release; 0 gives infinity (no noise, no guarantee).
        sensitivity (`float`): L2 sensitivity Delta of the released quantity.
        delta (`float`): the delta of the guarantee, in (0, 1).
        compositions (`int`, defaults to 1): K releases with fresh noise, composed.
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta = {delta!r} is invalid (allowed: 0 < delta < 1)")
    if compositions < 1:
        raise ValueError(f"compositions = {compositions!r} is invalid (allowed: an integer >= 1)")
    if noise_std == 0.0:
        return math.inf
    from dp_accounting.pld import privacy_loss_distribution  # here: importing it costs every client a second
    # The privacy loss of one release is N(r^2/2, r^2) with r = Delta/sigma. The accountant's default grid step
    # (1e-4) suits r of order 1; at the useful cuts r is in the hundreds and that grid would hold ~1e8 points. A step
    # of 1e-4 max(1, r^2) keeps one release's grid at a few thousand points and its pessimistic rounding, which adds
    # at most one step per release, below 2e-4 of epsilon there (and below 1e-4 per release where r <= 1).
    step = 1e-4 * max(1.0, (sensitivity / noise_std) ** 2)
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        noise_std, sensitivity=sensitivity, value_discretization_interval=step)
    if compositions > 1:
        pld = pld.self_compose(compositions)
    return float(pld.get_epsilon_for_delta(delta))


def upload_privacy(alpha_bar_s: float, num_pixels: int, n_train_images: int, views: int = 1,
                   clip_norm: float | None = None, delta: float | None = None) -> dict:
    """The per-image guarantee of what a client uploaded at the cut, as ``evaluation.json`` reports it.

    Args:
        alpha_bar_s (`float`): abar at the cut.
        num_pixels (`int`): d = channels x height x width of one image.
        n_train_images (`int`): the client's training images (delta = 1 / n by default).
        views (`int`, defaults to 1): noised views of each image the server received (K rounds with
            ``split.fresh_upload_noise``, else 1).
        clip_norm (`float`, *optional*): ``split.upload_clip_norm``; None when images are not clipped.
        delta (`float`, *optional*): overrides 1 / n_train_images.
    """
    delta = 1.0 / n_train_images if delta is None else delta
    sigma = upload_noise_std(alpha_bar_s)
    sens = image_sensitivity(num_pixels, clip_norm)
    eps = gaussian_epsilon(sigma, sens, delta, views)
    return {
        "mechanism": "Gaussian, replace-one on the image (local DP); PLD accountant (dp_accounting)",
        "noise_std": sigma,  # of u / sqrt(abar_s)
        "sensitivity": sens,
        "noise_multiplier": sigma / sens,
        "clip_norm": clip_norm,
        "views": views,
        "delta": delta,
        # JSON has no infinity: None where the upload is the image itself (cut 0)
        "epsilon": None if math.isinf(eps) else eps,
    }
