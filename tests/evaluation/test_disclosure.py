"""Disclosure attacks (split-protocol.md, "What the server can still learn"): linkage, reconstruction, averaging,
the paper's proxies and the report, on data whose answer is known (exact copies, pure noise, Gaussian pixels)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from collafuse.evaluation.disclosure import (
    averaging_attack,
    disclosure_report,
    effective_alpha_bar,
    exact_seed_attack,
    gaussian_eps_fn,
    gaussian_prior_from_uploads,
    linkage_attack,
    linkage_predict,
    rescale_reconstruct,
    score_reconstruction,
    server_eps_fn,
    tweedie_reconstruct,
    unpaired_mse,
)
from collafuse.split.client import Client
from collafuse.split.diffusion import DiffusionSchedule
from collafuse.split.models import predict_eps
from collafuse.split.server import Server
from collafuse.split.upload import clip_images
from conftest import synthetic_clients, tiny_config

SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models on cores shared with other jobs: one intra-op thread is many times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 ~ N(mu, sigma^2) independently per pixel, with a per-pixel mean and spread (known prior)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(SHAPE, generator=g) - 0.5
    var = (0.1 + 0.4 * torch.rand(SHAPE, generator=g)) ** 2
    x0 = mu + var.sqrt() * torch.randn((n, *SHAPE), generator=g)
    return x0, mu, var


def noised(x0: torch.Tensor, abar: float, seed: int) -> torch.Tensor:
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps


def posterior_mean(x: torch.Tensor, abar: float, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for Gaussian x0, written directly (Wiener filter), independently of Tweedie."""
    return mu + math.sqrt(abar) * var * (x - math.sqrt(abar) * mu) / (abar * var + 1 - abar)


# -- linkage -----------------------------------------------------------------------------------------------------------
def test_linkage_is_exact_at_cut_0():
    """cut 0: abar_0 = 1, the real Client's upload is x0 itself, so the max-likelihood pick is always right."""
    cfg = tiny_config(split={"cut": 0})
    data = synthetic_clients(cfg, n=32)
    client = Client(0, data[0], cfg)
    u, y = client.upload()
    abar = float(client.schedule.alpha_bar[0])
    assert abar == 1.0 and torch.equal(u, data[0].train_x)
    pool = torch.cat([data[0].train_x, data[1].train_x, data[0].test_x, data[1].test_x])
    ylab = torch.cat([data[0].train_y, data[1].train_y, data[0].test_y, data[1].test_y])
    truth = torch.arange(len(u))
    r = linkage_attack(u, abar, pool, truth)
    assert r["top1"] == 1.0 and r["mean_rank"] == 1.0 and r["top5"] == 1.0
    assert r["pool_size"] == len(pool) and r["chance"] == pytest.approx(1 / len(pool))
    assert torch.equal(linkage_predict(u, abar, pool), truth)
    same = linkage_attack(u, abar, pool, truth, y, ylab)
    assert same["top1"] == 1.0 and same["chance"] > r["chance"]  # fewer candidates per upload, same answer


def test_linkage_is_chance_on_pure_noise():
    """Uploads at the end of the cosine chain (abar_T ~ 2e-9) or at abar = 0 carry nothing: accuracy ~ 1/M."""
    g = torch.Generator().manual_seed(1)
    m, n = 40, 3000
    pool = torch.rand((m, *SHAPE), generator=g) * 2 - 1
    truth = torch.randint(0, m, (n,), generator=g)
    abar_T = float(DiffusionSchedule(tiny_config(diffusion={"timesteps": 1000}).diffusion).alpha_bar[-1])
    assert abar_T < 1e-6
    r = linkage_attack(noised(pool[truth], abar_T, 2), abar_T, pool, truth)
    sigma = math.sqrt((1 / m) * (1 - 1 / m) / n)
    assert r["chance"] == pytest.approx(1 / m) and r["chance_stderr"] == pytest.approx(sigma)
    assert abs(r["top1"] - 1 / m) < 4 * sigma, r
    # abar = 0: every candidate scores the same; the tie-aware score is exactly chance (not "index 0 always wins").
    r0 = linkage_attack(noised(pool[truth], 0.0, 3), 0.0, pool, truth)
    assert r0["top1"] == pytest.approx(1 / m) and r0["top5"] == pytest.approx(5 / m)
    assert r0["mean_rank"] == pytest.approx((m + 1) / 2)


def test_linkage_grows_with_signal_and_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    m, n = 300, 200
    pool = torch.rand((m, *SHAPE), generator=g) * 2 - 1
    truth = torch.randint(0, m, (n,), generator=g)
    accs = []
    for abar in (1e-4, 3e-3, 1e-2, 0.1):
        u = noised(pool[truth], abar, 5)
        brute = torch.cdist(u.flatten(1).double(), math.sqrt(abar) * pool.flatten(1).double()).argmin(1)
        assert torch.equal(linkage_predict(u, abar, pool, max_elems=1000), brute)  # chunked = brute force
        accs.append(linkage_attack(u, abar, pool, truth, max_elems=1000)["top1"])
    assert accs == sorted(accs) and accs[-1] == 1.0 and accs[0] < 0.1, accs


# -- reconstruction ----------------------------------------------------------------------------------------------------
def test_reconstruction_psnr_falls_with_noise():
    x0 = torch.rand((200, *SHAPE), generator=torch.Generator().manual_seed(6)) * 2 - 1
    psnr = {"rescale": [], "tweedie": []}
    for i, abar in enumerate((0.99, 0.9, 0.5, 0.1, 0.01)):
        u = noised(x0, abar, 10 + i)
        psnr["rescale"].append(score_reconstruction(rescale_reconstruct(u, abar), x0)["psnr"])
        mu, var = gaussian_prior_from_uploads(u, abar)
        rec = tweedie_reconstruct(u, abar, gaussian_eps_fn(abar, mu, var))
        psnr["tweedie"].append(score_reconstruction(rec, x0)["psnr"])
    for name, values in psnr.items():
        assert all(a > b for a, b in zip(values, values[1:])), (name, values)
    # the empirical-Bayes posterior mean is never worse than rescaling by more than estimation noise
    assert all(t >= r - 0.1 for t, r in zip(psnr["tweedie"], psnr["rescale"])), psnr
    exact = score_reconstruction(x0, x0)
    assert exact["mse"] == 0 and exact["psnr"] == 100.0 and exact["ssim"] == pytest.approx(1.0)


def test_tweedie_with_analytic_denoiser_is_the_posterior_mean():
    x0, mu, var = gaussian_images(4000, seed=7)
    abar = 0.3
    x = noised(x0, abar, 8)
    rec = tweedie_reconstruct(x, abar, gaussian_eps_fn(abar, mu, var), batch_size=1000, clip=False)
    torch.testing.assert_close(rec, posterior_mean(x, abar, mu, var), rtol=1e-4, atol=1e-5)
    mse_tweedie = float(((rec - x0) ** 2).mean())
    mse_rescale = float(((rescale_reconstruct(x, abar, clip=False) - x0) ** 2).mean())
    assert mse_tweedie < 0.5 * mse_rescale
    # and both sit on their theory: posterior variance vs (1 - abar) / abar
    post_var = float((var * (1 - abar) / (abar * var + 1 - abar)).mean())
    assert mse_tweedie == pytest.approx(post_var, rel=0.03)
    assert mse_rescale == pytest.approx((1 - abar) / abar, rel=0.03)
    # the server can fit that prior from the uploads alone, and loses little against the true prior
    mu_hat, var_hat = gaussian_prior_from_uploads(x, abar)
    assert float((mu_hat - mu).abs().max()) < 0.15
    rec_eb = tweedie_reconstruct(x, abar, gaussian_eps_fn(abar, mu_hat, var_hat), batch_size=1000, clip=False)
    assert float(((rec_eb - x0) ** 2).mean()) < 1.05 * mse_tweedie


# -- averaging ---------------------------------------------------------------------------------------------------------
def test_averaging_follows_the_effective_alpha_bar():
    x0, mu, var = gaussian_images(500, seed=9)
    abar = 0.2
    for k in (1, 3, 10):
        ab = effective_alpha_bar(abar, k)
        assert (1 - ab) / ab == pytest.approx((1 - abar) / (k * abar))
    assert effective_alpha_bar(abar, 1) == pytest.approx(abar)
    ks = (1, 4, 16)
    recs = averaging_attack(x0, abar, ks, torch.Generator().manual_seed(10),
                            lambda a: gaussian_eps_fn(a, mu, var), clip=False)
    by = {(r["k"], r["method"]): r for r in recs}
    assert set(by) == {(k, m) for k in ks for m in ("rescale", "tweedie")}
    for method in ("rescale", "tweedie"):
        psnr = [by[k, method]["psnr"] for k in ks]
        assert all(a < b for a, b in zip(psnr, psnr[1:])), (method, psnr)
        # the posterior mean is better at every K; its gain is smaller since the prior already bounds its error
        assert all(by[k, "tweedie"]["psnr"] > by[k, "rescale"]["psnr"] for k in ks)
    for k in ks:
        ab = by[k, "rescale"]["abar_eff"]
        assert ab == pytest.approx(effective_alpha_bar(abar, k))
        assert by[k, "rescale"]["mse"] == pytest.approx((1 - ab) / ab, rel=0.03)
        assert by[k, "rescale"]["expected_mse_unclipped"] == pytest.approx((1 - ab) / ab)
        post_var = float((var * (1 - ab) / (ab * var + 1 - ab)).mean())
        assert by[k, "tweedie"]["mse"] == pytest.approx(post_var, rel=0.03)
    # rescaling K views gains 10 log10(K) dB in MSE terms
    gain = 10 * math.log10(by[1, "rescale"]["mse"] / by[16, "rescale"]["mse"])
    assert gain == pytest.approx(10 * math.log10(16), abs=0.3)


def test_averaging_views_of_clipped_images_are_scored_against_the_real_ones():
    """With ``split.upload_clip_norm`` the views are of the clipped images: the rescale's error against the real image
    is the clipping's own error plus the noise's, E||c + n - x||^2 = ||c - x||^2 + (1 - abar') / abar' per pixel,
    however many views are averaged."""
    x0, _, _ = gaussian_images(400, seed=12)
    clipped = clip_images(x0, 1.0)
    abar = 0.3
    recs = averaging_attack(clipped, abar, (1, 64), torch.Generator().manual_seed(13), clip=False, truth=x0)
    clip_err = float(((clipped - x0) ** 2).mean())
    for r in recs:
        ab = effective_alpha_bar(abar, r["k"])
        assert r["mse"] == pytest.approx(clip_err + (1 - ab) / ab, rel=0.03)
    assert recs[-1]["mse"] > 0.9 * clip_err  # 64 views cannot undo the clipping
    # The report draws its what-if views of the clipped images when the config clips (C is public).
    g = torch.Generator().manual_seed(14)
    uploads = math.sqrt(abar) * clipped + math.sqrt(1 - abar) * torch.randn(x0.shape, generator=g)
    report = disclosure_report(x0, uploads, abar, ks=(64,), generator=g, clip_norm=1.0)
    assert report["results"]["averaging_k64_rescale"]["views_of"] == "images clipped to L2 norm 1.0"
    assert report["results"]["averaging_k64_rescale"]["mse"] > 0.9 * clip_err


# -- proxies -----------------------------------------------------------------------------------------------------------
def test_unpaired_mse_matches_brute_force():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn((30, *SHAPE), generator=g), torch.rand((50, *SHAPE), generator=g)
    d = ((a.flatten(1)[:, None].double() - b.flatten(1)[None].double()) ** 2).mean(-1)
    r = unpaired_mse(a, b, max_elems=64)
    assert r["mean_over_pairs"] == pytest.approx(float(d.mean()), rel=1e-9)
    assert r["nearest_real"] == pytest.approx(float(d.min(1).values.mean()), rel=1e-9)
    assert unpaired_mse(b[:5], b)["nearest_real"] == pytest.approx(0, abs=1e-12)


# -- the server's own model --------------------------------------------------------------------------------------------
def test_server_eps_helper_on_a_tiny_server():
    cfg = tiny_config(server_model={"condition_on_client": True})
    data = synthetic_clients(cfg, n=16)
    server, client = Server(cfg), Client(1, data[1], cfg)
    u, y = client.upload()
    s = cfg.cut
    fn = server_eps_fn(server, client=1)
    eps = fn(u, y)
    assert eps.shape == u.shape and eps.dtype == u.dtype and torch.isfinite(eps).all()
    # it is the EMA model at diffusers index s (protocol step s+1), scaled by k_{s+1}
    k = float(server.schedule.server_eps_scale(s + 1, s))
    ids = server.labels.encode(y, 1)
    ref = k * predict_eps(server.learner.sampling_model(True), u, s, ids, server.labels.null_id)
    torch.testing.assert_close(eps, ref)
    assert fn(u, None).shape == u.shape  # null label: the unconditional branch
    abar = float(server.schedule.alpha_bar[s])
    rec = tweedie_reconstruct(u, abar, fn, y, batch_size=5)
    assert rec.shape == u.shape and rec.abs().max() <= 1
    with pytest.raises(ValueError, match="owns no step"):
        server_eps_fn(Server(tiny_config(split={"cut": cfg.diffusion.timesteps})))


def test_disclosure_report_is_labelled_and_json_able():
    cfg = tiny_config()
    data = synthetic_clients(cfg, n=16)
    server, client = Server(cfg), Client(0, data[0], cfg)
    u, y = client.upload()
    abar = float(client.schedule.alpha_bar[cfg.cut])
    x_cut = server.sample_to_cut(y[:4], 0, torch.Generator().manual_seed(0))
    distractors = torch.cat([data[1].train_x, data[0].test_x])
    distractor_labels = torch.cat([data[1].train_y, data[0].test_y])
    rep = disclosure_report(data[0].train_x, u, abar, labels=y, server=server, client=0, distractors=distractors,
                            distractor_labels=distractor_labels, ks=(1, 4), x_cut=x_cut, x_cut_labels=y[:4])
    json.dumps(rep, allow_nan=False)
    res = rep["results"]
    expected = {"linkage", "linkage_same_label", "reconstruction_rescale", "reconstruction_tweedie_gaussian",
                "reconstruction_tweedie_server", "averaging_k1_rescale", "averaging_k1_tweedie",
                "averaging_k4_rescale", "averaging_k4_tweedie", "proxy_upload_mse", "proxy_handoff_mse",
                "proxy_handoff_tweedie_mse"}
    assert set(res) == expected
    for rec in res.values():
        assert {"attack", "method", "n", "pool_size", "chance"} <= set(rec)
    assert rep["pool_size"] == res["linkage"]["pool_size"] == 16 + len(distractors)
    assert res["linkage"]["chance"] == pytest.approx(1 / rep["pool_size"])
    assert res["linkage"]["top1"] == 1.0  # abar_6 of T = 20 is ~0.8: random-pixel images are easy to link
    assert res["proxy_handoff_mse"]["n"] == 4 and res["reconstruction_rescale"]["n"] == 16
    # the same call at cut 0: the upload is x0 and everything is exact
    cfg0 = tiny_config(split={"cut": 0})
    c0 = Client(0, data[0], cfg0)
    u0, y0 = c0.upload()
    rep0 = disclosure_report(data[0].train_x, u0, 1.0, labels=y0, server=Server(cfg0), ks=(1,))
    assert rep0["results"]["reconstruction_rescale"]["mse"] == 0.0
    assert rep0["results"]["reconstruction_tweedie_server"]["mse"] == 0.0
    json.dumps(rep0, allow_nan=False)


# -- exact seed ----------------------------------------------------------------------------------------------------
def test_exact_seed_attack_recovers_a_shared_seed_upload_and_fails_on_a_client_secret():
    """The report's exact-seed row: with noise from a seed in the shared config (the old scheme) the server
    rebuilds x0 to float precision; with the client's secret it gets a noisy image and ``recovered`` is False."""
    from collafuse.split.seeding import generator

    cfg = tiny_config()
    data = synthetic_clients(cfg, n=32)
    x0 = data[1].train_x
    abar = float(Client(1, data[1], cfg).schedule.alpha_bar[cfg.cut])
    seeds = [0, 1, 2, 3, 4]  # [seeds] of the shared config as it was (upload = 3)
    old = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * torch.randn(x0.shape, generator=generator(3, "client1",
                                                                                                  "upload"))
    rep = disclosure_report(x0[:8], old[:8], abar, node_id="client1", shared_seeds=seeds, all_uploads=old, ks=())
    hit = rep["results"]["reconstruction_exact_seed"]
    assert hit["recovered"] and hit["max_error"] < 1e-5 and hit["stream"] == "generator(3, 'client1', 'upload')"
    assert hit["psnr"] == 100.0 and hit["box_excess"] < 1e-12 < hit["median_box_excess"]
    u, _ = Client(1, data[1], cfg).upload()
    miss = disclosure_report(x0[:8], u[:8], abar, node_id="client1", shared_seeds=seeds, all_uploads=u,
                             ks=())["results"]["reconstruction_exact_seed"]
    rescale = rescale_reconstruct(u[:8], abar)
    assert not miss["recovered"] and miss["max_error"] > 0.5
    assert miss["psnr"] < score_reconstruction(rescale, x0[:8])["psnr"]  # worse than not trying
    assert miss["candidates"] == len(set(seeds) | set(range(16))) * 7
    json.dumps(rep, allow_nan=False)


@pytest.mark.parametrize("row_shape", [(1, 28, 28), (3, 5, 5)])
def test_cpu_normal_stream_is_sequential_so_a_screen_of_rows_is_the_prefix_of_the_whole_stream(row_shape):
    """What the exact-seed attack's screening relies on: a CPU generator's randn over N rows starts with its randn
    over the first 512 rows (a multiple of 16, the sampler's block), whatever the row size, also when N * row is not
    a multiple of 16 (the sampler re-draws only the last block then)."""
    from collafuse.split.seeding import generator

    whole = torch.randn((601, *row_shape), generator=generator(7, "client0", "upload"))
    head = torch.randn((512, *row_shape), generator=generator(7, "client0", "upload"))
    assert torch.equal(whole[:512], head)


def test_exact_seed_attack_screens_candidates_on_a_prefix_and_replays_the_winner_over_the_whole_upload():
    """1,000 uploads, twice the screen: the planted stream still wins, and the reconstruction of the rows past the
    screen is the closed-form inversion with that stream (x0 to float precision)."""
    from collafuse.split.seeding import generator

    g = torch.Generator().manual_seed(11)
    x0 = torch.rand((1000, 1, 8, 8), generator=g) * 2 - 1
    abar = 0.3
    eps = torch.randn(x0.shape, generator=generator(2, "client4", "upload", 1))
    u = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    x_hat, info = exact_seed_attack(u, abar, "client4", shared_seeds=[0, 1, 2, 3, 4], screen=480)
    assert info["stream"] == "generator(2, 'client4', 'upload', 1)" and info["screened"] == 480
    assert info["box_excess"] < 1e-12 < info["median_box_excess"]
    assert float((x_hat[480:] - x0[480:]).abs().max()) < 1e-5 and float((x_hat - x0).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="screen = 100: must be a positive multiple of 16"):
        exact_seed_attack(u, abar, "client4", screen=100)
