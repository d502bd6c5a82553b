"""The upload's formal guarantee: the accountant's epsilon against the analytic Gaussian mechanism's closed form.

Balle & Wang (ICML 2018), Theorem 8: the Gaussian mechanism with noise sigma and L2 sensitivity Delta is
(eps, delta)-DP iff

    delta >= Phi(Delta / (2 sigma) - eps sigma / Delta) - e^eps Phi(-Delta / (2 sigma) - eps sigma / Delta),

and K releases with fresh noise are one release with sigma / sqrt(K) (their sum is a sufficient statistic). The
closed form is written out here with scipy; the code under test asks dp_accounting.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_ndtr, ndtr

from collafuse.evaluation.accounting import gaussian_epsilon, image_sensitivity, upload_noise_std, upload_privacy


def closed_form_delta(eps: float, sigma: float, sensitivity: float) -> float:
    a, b = sensitivity / (2 * sigma), eps * sigma / sensitivity
    return float(ndtr(a - b) - np.exp(eps + log_ndtr(-a - b)))  # e^eps Phi(.) in log space: eps may be in the 1000s


@pytest.mark.parametrize("ratio", [0.2, 1.0, 4.0, 30.0, 170.0])  # Delta / sigma: strong privacy ... cut-200-like
@pytest.mark.parametrize("views", [1, 10])
def test_epsilon_is_the_tight_analytic_gaussian_epsilon(ratio, views):
    sens, delta = 56.0, 1e-4
    sigma = sens / ratio
    eps = gaussian_epsilon(sigma, sens, delta, compositions=views)
    sigma_k = sigma / math.sqrt(views)  # K views = one view with sigma / sqrt(K)
    assert closed_form_delta(eps, sigma_k, sens) <= delta * (1 + 1e-6)  # a valid guarantee...
    assert closed_form_delta(eps * 0.99 - 1e-3, sigma_k, sens) > delta  # ...and within 1% of the smallest one


def test_sigma_and_sensitivity_follow_the_upload_formula():
    # u / sqrt(abar) = x0 + sqrt((1 - abar) / abar) eps, written out for abar = 0.8: sqrt(0.25) = 0.5
    assert upload_noise_std(0.8) == pytest.approx(0.5)
    assert upload_noise_std(1.0) == 0.0
    assert image_sensitivity(28 * 28) == pytest.approx(56.0)  # two opposite corners of [-1, 1]^784
    assert image_sensitivity(28 * 28, clip_norm=3.0) == pytest.approx(6.0)
    assert image_sensitivity(4, clip_norm=100.0) == pytest.approx(4.0)  # a bound above the diameter binds nothing


def test_epsilon_falls_with_the_cut_and_is_infinite_at_cut_0():
    def cosine_abar(t, T=1000, s=0.008):  # Nichol & Dhariwal 2021, eq. 17
        f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return f(t) / f(0)

    eps = [upload_privacy(cosine_abar(s), 784, 5000)["epsilon"] for s in (200, 500, 700, 900, 999)]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    assert upload_privacy(1.0, 784, 5000)["epsilon"] is None  # JSON has no infinity: the raw image, no guarantee
    rep = upload_privacy(cosine_abar(500), 784, 5000, views=3, clip_norm=2.0)
    assert rep["delta"] == pytest.approx(1 / 5000) and rep["sensitivity"] == 4.0 and rep["views"] == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"delta": 0.0}, r"delta = 0.0 is invalid \(allowed: 0 < delta < 1\)"),
    ({"compositions": 0}, r"compositions = 0 is invalid \(allowed: an integer >= 1\)"),
])
def test_bad_arguments_are_one_line_errors(kwargs, match):
    args = {"noise_std": 1.0, "sensitivity": 1.0, "delta": 1e-5, **kwargs}
    with pytest.raises(ValueError, match=match):
        gaussian_epsilon(**args)
