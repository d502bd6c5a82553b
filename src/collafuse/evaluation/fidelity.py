"""Sample fidelity: FID and KID against real images, and predicted-label histograms of generated images.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium"):
  the Frechet distance between Gaussians fitted to the features of real and generated images. Biased upwards for
  small sample counts, and the bias depends on n and the extractor, so an FID is only comparable to another FID
  with the same extractor and the same n: every result here carries both.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased squared MMD with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Unbiased, so two samples of one distribution give ~0
  (it can be slightly negative), which makes it the better number for small per-client sample sets.
- Label histograms: the domain classifier's predicted labels on generated images against the real class mix
  (total-variation distance), and the share of images classified as the label they were generated for. These catch
  mode collapse (classes missing) and wrong conditioning, which FID on a pooled set can hide.

Both distances are computed by torchmetrics (``FrechetInceptionDistance``, ``KernelInceptionDistance``) with a
custom feature module.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

KID_SUBSET_SIZE = 1000  # Binkowski et al. 2018 and torchmetrics' default
KID_SUBSETS = 100  # torchmetrics' default


class _Precomputed(nn.Module):
    """Identity "extractor" for torchmetrics: features are extracted once and fed to both FID and KID, which would
    otherwise each run the network over every image (twice the cost; with Inception, minutes)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def check_image_set(x: torch.Tensor, what: str, minimum: int = 2) -> None:
    """Raise a one-line ValueError unless ``x`` is a float image batch [N >= minimum, C, H, W] in [-1, 1]."""
    if not torch.is_tensor(x) or x.dim() != 4:
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{what} must be float images [N, C, H, W] in [-1, 1], got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{what} must be float images in [-1, 1], got {x.dtype} (convert uint8 with "
                         f"collafuse.data.images.to_model_range)")
    if len(x) < minimum:
        raise ValueError(f"{what} has {len(x)} images; FID and KID need at least {minimum}")
    # Generated samples may overshoot [-1, 1] a little (they are clamped); values far outside mean another range.
    if len(x) and float(x.detach().abs().max()) > 2:
        raise ValueError(f"{what} has values up to {float(x.detach().abs().max()):.1f}; expected images in [-1, 1] "
                         f"(not [0, 255])")


@torch.inference_mode()
def extract_features(images: torch.Tensor, extractor: nn.Module, batch_size: int | None = None) -> torch.Tensor:
    """Run ``extractor`` over ``images`` in batches on the extractor's device.

    Args:
        images (`torch.Tensor`): float [N, C, H, W] in [-1, 1], any device.
        extractor (`nn.Module`): from ``features.get_extractor``.
        batch_size (`int`, *optional*): defaults to the extractor's ``preferred_batch_size`` (or 256).

    Returns:
        `torch.Tensor`: float64 [N, num_features] on the CPU (float64: FID subtracts large near-equal traces).
    """
    batch_size = batch_size or getattr(extractor, "preferred_batch_size", 256)
    device = _device(extractor)
    out = [extractor(images[i:i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, extractor.num_features, dtype=torch.float64)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module, kid_subset_size: int | None = None,
            batch_size: int | None = None, kid_subsets: int = KID_SUBSETS, seed: int = 0) -> dict:
    """FID and KID between real and generated images with one extractor, via torchmetrics.

    Features are extracted once per image (batched) and both metrics are computed from them
    (`fid_kid_from_features`, which a caller scoring one set against several others can use directly).

    Args:
        real (`torch.Tensor`): float [N, C, H, W] in [-1, 1], N >= 2.
        fake (`torch.Tensor`): float [M, C, H, W] in [-1, 1], M >= 2 (generated samples; clamped to [-1, 1] and
            quantized to uint8 levels by the extractor, like a saved PNG).
        extractor (`nn.Module`): from ``features.get_extractor`` (``name``, ``num_features`` attributes).
        kid_subset_size (`int`, *optional*): images per KID subset; defaults to ``min(1000, N, M)`` so that small
            sets work. When it equals both N and M every subset is the whole set, so one subset is computed and
            ``kid_std`` is 0.
        batch_size (`int`, *optional*): images per extractor call; defaults to the extractor's preference.
        kid_subsets (`int`, defaults to 100): number of random KID subsets.
        seed (`int`, defaults to 0): seeds the KID subset draws (torchmetrics uses the global RNG; it is forked so
            the caller's stream is untouched), so the same inputs give the same KID.

    Returns:
        `dict`: ``fid``, ``kid_mean``, ``kid_std`` (floats), ``n_real``, ``n_fake``, ``kid_subset_size``,
        ``kid_subsets``, ``extractor`` (its name), ``extractor_id`` (which weights), ``num_features``, and ``label``,
        a human-readable tag such as ``"classifier (128-d), 1000 real vs 1000 generated"``.
    """
    check_image_set(real, "real")
    check_image_set(fake, "fake")
    return fid_kid_from_features(extract_features(real, extractor, batch_size),
                                 extract_features(fake, extractor, batch_size), extractor,
                                 kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, seed=seed)


def fid_kid_from_features(real: torch.Tensor, fake: torch.Tensor, extractor: nn.Module,
                          kid_subset_size: int | None = None, kid_subsets: int = KID_SUBSETS, seed: int = 0) -> dict:
    """`fid_kid` on features already extracted (`extract_features`), so that an evaluation scoring each client's
    samples against its train and held-out images and all clients pooled runs the extractor once per image.

    Args:
        real (`torch.Tensor`): float64 [N, num_features], N >= 2.
        fake (`torch.Tensor`): float64 [M, num_features], M >= 2.
        extractor (`nn.Module`): the one that made them (only its ``name``, ``identity``, ``num_features``).
        kid_subset_size, kid_subsets, seed: as in `fid_kid`.

    Returns:
        `dict`: as `fid_kid`.
    """
    num_features = int(extractor.num_features)
    for feats, what in ((real, "real"), (fake, "fake")):
        if feats.dim() != 2 or feats.shape[1] != num_features or len(feats) < 2:
            raise ValueError(f"{what} features must be [N >= 2, {num_features}], got {tuple(feats.shape)}")
    n_real, n_fake = len(real), len(fake)
    subset = min(kid_subset_size or KID_SUBSET_SIZE, n_real, n_fake)
    if subset < 2:
        raise ValueError(f"kid_subset_size = {kid_subset_size} is invalid (allowed: an integer >= 2)")
    subsets = 1 if subset == n_real == n_fake else kid_subsets
    feed = _Precomputed(num_features)
    fid = FrechetInceptionDistance(feature=feed, reset_real_features=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=feed, subsets=subsets, subset_size=subset)
    for feats, is_real in ((real, True), (fake, False)):
        fid.update(feats, real=is_real)
        kid.update(feats, real=is_real)
    fid_value = float(fid.compute())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    name = getattr(extractor, "name", type(extractor).__name__)
    return {
        "fid": fid_value, "kid_mean": float(kid_mean), "kid_std": float(kid_std),
        "n_real": n_real, "n_fake": n_fake, "kid_subset_size": subset, "kid_subsets": subsets,
        "extractor": name, "extractor_id": getattr(extractor, "identity", name), "num_features": num_features,
        "label": f"{name} ({num_features}-d), {n_real} real vs {n_fake} generated",
    }


# -- label histograms --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_labels(images: torch.Tensor, classifier: nn.Module, batch_size: int = 1000) -> torch.Tensor:
    """Predicted labels int64 [N]: ``classifier.predict`` if it has one (``ClassifierFeatures``), else the argmax of
    its output (any module returning logits, e.g. a bare ``LeNet``)."""
    if hasattr(classifier, "predict"):
        return classifier.predict(images, batch_size=batch_size).cpu()
    device = _device(classifier)
    out = [classifier(images[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def label_counts(labels: torch.Tensor | Sequence[int], num_classes: int) -> torch.Tensor:
    """Labels [N] -> counts int64 [num_classes]; raises on labels outside 0..num_classes-1."""
    labels = torch.as_tensor(labels, dtype=torch.int64).flatten()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return torch.bincount(labels, minlength=num_classes)


def label_histogram(images: torch.Tensor, classifier: nn.Module, num_classes: int | None = None,
                    batch_size: int = 1000) -> torch.Tensor:
    """Histogram of the classifier's predicted labels on ``images``.

    Args:
        images (`torch.Tensor`): float [N, C, H, W] in [-1, 1].
        classifier (`nn.Module`): ``ClassifierFeatures`` (or any module returning logits).
        num_classes (`int`, *optional*): histogram length; defaults to ``classifier.num_classes``.
        batch_size (`int`, defaults to 1000): images per forward pass.

    Returns:
        `torch.Tensor`: int64 counts [num_classes].
    """
    num_classes = num_classes or classifier.num_classes
    return label_counts(predict_labels(images, classifier, batch_size), num_classes)


def total_variation(p: torch.Tensor | Sequence[float], q: torch.Tensor | Sequence[float]) -> float:
    """Total-variation distance 0.5 * sum |p - q| between two histograms (normalised first): 0 = same mix,
    1 = disjoint classes."""
    p = torch.as_tensor(p, dtype=torch.float64)
    q = torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"histograms must be 1-d of equal length, got {tuple(p.shape)} and {tuple(q.shape)}")
    if float(p.sum()) <= 0 or float(q.sum()) <= 0 or bool((p < 0).any() or (q < 0).any()):
        raise ValueError("histograms must be non-negative with a positive total")
    return 0.5 * float((p / p.sum() - q / q.sum()).abs().sum())


def compare_histograms(generated_counts: torch.Tensor | Sequence[int], real_counts: torch.Tensor | Sequence[int],
                       class_names: Sequence[str] | None = None) -> dict:
    """Compare a generated class histogram with a real one.

    Args:
        generated_counts (`torch.Tensor` or `Sequence[int]`): counts [K], e.g. from ``label_histogram``.
        real_counts (`torch.Tensor` or `Sequence[int]`): counts [K] of the reference mix (``label_counts(labels, K)``).
        class_names (`Sequence[str]`, *optional*): K names for the ``per_class`` rows.

    Returns:
        `dict`: ``tv_distance`` (0 same mix, 1 disjoint), ``n_generated``, ``n_real``, ``generated_counts``,
        ``real_counts``, ``generated_shares``, ``real_shares`` (lists of K), ``missing_classes`` (classes in the real
        mix that no generated image was classified as: mode collapse), ``extra_classes`` (the reverse: leakage or
        wrong conditioning), and ``per_class`` rows ``{class, name, generated_share, real_share}``.
    """
    gen = torch.as_tensor(generated_counts, dtype=torch.int64)
    real = torch.as_tensor(real_counts, dtype=torch.int64)
    tv = total_variation(gen, real)
    gen_share = (gen / gen.sum()).tolist()
    real_share = (real / real.sum()).tolist()
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(gen))]
    return {
        "tv_distance": tv, "n_generated": int(gen.sum()), "n_real": int(real.sum()),
        "generated_counts": gen.tolist(), "real_counts": real.tolist(),
        "generated_shares": gen_share, "real_shares": real_share,
        "missing_classes": [k for k in range(len(gen)) if real[k] > 0 and gen[k] == 0],
        "extra_classes": [k for k in range(len(gen)) if gen[k] > 0 and real[k] == 0],
        "per_class": [{"class": k, "name": names[k], "generated_share": g, "real_share": r}
                      for k, (g, r) in enumerate(zip(gen_share, real_share))],
    }


def compare_label_mix(images: torch.Tensor, classifier: nn.Module,
                      real_labels: torch.Tensor | Sequence[int] | None = None, num_classes: int | None = None, *,
                      real_counts: torch.Tensor | Sequence[int] | None = None,
                      requested: torch.Tensor | Sequence[int] | None = None,
                      class_names: Sequence[str] | None = None, batch_size: int = 1000) -> dict:
    """Classify generated images and compare their label mix with a real class mix (given as labels or counts).

    Args:
        images (`torch.Tensor`): generated float [N, C, H, W] in [-1, 1].
        classifier (`nn.Module`): ``ClassifierFeatures`` (or any module returning logits).
        real_labels (`torch.Tensor` or `Sequence[int]`, *optional*): labels of the reference real images, e.g. the
            client's train labels. Exactly one of ``real_labels`` and ``real_counts``.
        num_classes (`int`, *optional*): defaults to ``classifier.num_classes``.
        real_counts (`torch.Tensor` or `Sequence[int]`, *optional*): the reference mix as counts [num_classes].
        requested (`torch.Tensor` or `Sequence[int]`, *optional*): the labels the images were conditioned on; adds
            ``label_agreement`` (see ``label_agreement``) from the same predictions.
        class_names (`Sequence[str]`, *optional*): names for the ``per_class`` rows.
        batch_size (`int`, defaults to 1000): images per forward pass.

    Returns:
        `dict`: ``compare_histograms``' keys, plus ``label_agreement`` if ``requested`` was given and
        ``classifier_test_accuracy`` (the classifier's accuracy on real test images, the ceiling for agreement) when
        the classifier carries it.
    """
    if (real_labels is None) == (real_counts is None):
        raise ValueError("compare_label_mix needs exactly one of real_labels and real_counts")
    num_classes = num_classes or classifier.num_classes
    preds = predict_labels(images, classifier, batch_size)
    if real_labels is not None:
        real = label_counts(real_labels, num_classes)
    else:
        real = torch.as_tensor(real_counts, dtype=torch.int64)
    if len(real) != num_classes:
        raise ValueError(f"real_counts has {len(real)} entries, expected num_classes = {num_classes}")
    out = compare_histograms(label_counts(preds, num_classes), real, class_names)
    if requested is not None:
        out["label_agreement"] = _agreement(preds, requested)
    accuracy = getattr(classifier, "meta", {}).get("test_accuracy")
    if accuracy is not None:
        out["classifier_test_accuracy"] = accuracy
    return out


def _agreement(preds: torch.Tensor, requested: torch.Tensor | Sequence[int]) -> float:
    requested = torch.as_tensor(requested, dtype=torch.int64).flatten()
    if len(requested) != len(preds) or len(preds) == 0:
        raise ValueError(f"need one requested label per image, got {len(requested)} labels for {len(preds)} images")
    return float((preds == requested).double().mean())


def label_agreement(images: torch.Tensor, requested: torch.Tensor | Sequence[int], classifier: nn.Module,
                    batch_size: int = 1000) -> float:
    """Share of class-conditional samples that the classifier assigns to the class they were generated for.

    Read it against the classifier's own test accuracy (``classifier.meta["test_accuracy"]``), its ceiling on real
    images. A histogram can match while every image has the wrong label (labels permuted); this cannot.

    Args:
        images (`torch.Tensor`): float [N, C, H, W] in [-1, 1].
        requested (`torch.Tensor` or `Sequence[int]`): the N labels the images were conditioned on.
        classifier (`nn.Module`): ``ClassifierFeatures`` (or any module returning logits).
        batch_size (`int`, defaults to 1000): images per forward pass.
    """
    return _agreement(predict_labels(images, classifier, batch_size), requested)
