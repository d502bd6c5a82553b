"""``CollaFusePipeline``: a trained federation as a diffusers ``DiffusionPipeline``.

An export folder (written by `collafuse.export.writer.export_run`, ``collafuse export``) holds::

    model_index.json        the components, as diffusers lists them
    scheduler/              the training noise schedule (DDPMScheduler config)
    server/                 the server's denoiser, a UNet2DModel (save_pretrained, safetensors); absent in a client's
    client_0/ client_1/ ... each client's denoiser; a party's export holds only its own
    collafuse.toml          the run's config (public: the server holds it too); sampler, cuts, labels, precision
    README.md               the model card

The pipeline walks the same split chain as the project's sampler (arXiv 2406.14429, Sec. 3): the server's model
from x_T down to x_{t_zeta} of the client's cut (its epsilon rescaled by k_t, docs/protocol.md, Heterogeneous cuts),
then the client's model from x_{t_zeta} to x_0, on the cut-anchored grid of `DiffusionSchedule.split_sampler` and
under the nodes' precision (`forward_context`). With one generator, per batch it draws the server's x_T and server
steps first, then the client's steps: what ``Federation.sample(..., seed=S)`` (``collafuse sample --seed S``) does,
so both give the same tensors.

A client's export without the server's model can only finish hand-offs (``pipe.finish``): x_{t_zeta} from the
server, its own steps to x_0. Drawing from x_T needs the server's steps, unless the client's cut is T (it was trained
alone, or FedAvg's full-chain copy).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput
from PIL import Image

from ..config import Config, ConfigError, load_config
from ..data.images import to_uint8
from ..split.diffusion import DiffusionSchedule
from ..split.learner import resolve_precision
from ..split.models import node_labels
from ..split.sampling import client_segment, segment_steps, server_segment

CONFIG_NAME = "collafuse.toml"
SAMPLERS = ("ddpm", "ddim", "dpmsolver")


class CollaFuseOutput(BaseOutput):
    """``images``: PIL images (``output_type="pil"``), a uint8 numpy array [N, H, W, C] (``"np"``) or the float
    tensor [N, C, H, W] in [-1, 1] (``"pt"``); ``labels``: the class of each image; ``x_cut``: the hand-offs."""

    images: list[Image.Image] | torch.Tensor
    labels: torch.Tensor
    x_cut: torch.Tensor


class CollaFusePipeline(DiffusionPipeline):
    """Sample a trained CollaFuse federation: the server's high-noise steps, then one client's low-noise steps.

    Args:
        scheduler (`DDPMScheduler`): the training schedule; must agree with ``collafuse_config``'s ``[diffusion]``.
        server (`UNet2DModel`, *optional*): the server's denoiser; None in a client's own export.
        clients (`dict[int, UNet2DModel]`, *optional*): client index -> its denoiser (one in a client's export).
        collafuse_config (`Config`): the run's configuration (``collafuse.toml`` of the export).
        client_classes (`dict[int, list[int]]`, *optional*): the classes each client may draw (those it held, plus
            ``sample.shared_labels``): the server refuses the rest, and so does the pipeline.
    """

    def __init__(self, scheduler: DDPMScheduler, server: UNet2DModel | None = None,
                 clients: dict[int, UNet2DModel] | None = None, collafuse_config: Config | None = None,
                 client_classes: dict[int, list[int]] | None = None):
        super().__init__()
        if collafuse_config is None:
            raise ConfigError(f"collafuse_config = None is invalid (allowed: the run's Config, from {CONFIG_NAME})")
        clients = dict(clients or {})
        self.register_modules(scheduler=scheduler, server=server,
                              **{f"client_{i}": m for i, m in sorted(clients.items())})
        self.clients = clients
        self.cfg = collafuse_config
        self.client_classes = {int(k): list(v) for k, v in (client_classes or {}).items()}
        self.schedule = DiffusionSchedule(self.cfg.diffusion)
        want = self.schedule.scheduler_kwargs
        got = {k: scheduler.config.get(k) for k in want}
        if got != want:
            raise ConfigError(f"scheduler config {got} disagrees with {CONFIG_NAME}'s [diffusion] (allowed: {want})")

    # -- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> CollaFusePipeline:
        """Load an export folder: whichever of ``server/`` and ``client_*/`` it holds.

        Args:
            path (`str` or `Path`): the folder ``collafuse export`` wrote.
            kwargs: passed to each ``UNet2DModel.from_pretrained`` (e.g. ``torch_dtype``).
        """
        root = Path(path)
        index_file = root / "model_index.json"
        if not index_file.is_file():
            raise ConfigError(f"path = '{root}' has no model_index.json (expected a folder written by collafuse "
                              f"export)")
        index = json.loads(index_file.read_text())
        if index.get("_class_name") != cls.__name__:
            raise ConfigError(f"{index_file} names _class_name = {index.get('_class_name')!r} (allowed: "
                              f"{cls.__name__!r})")
        cfg = load_config(root / CONFIG_NAME)
        kwargs.setdefault("low_cpu_mem_usage", False)  # its True needs accelerate, which we do not install
        scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
        server = UNet2DModel.from_pretrained(root / "server", **kwargs) if "server" in index else None
        clients = {int(k.split("_", 1)[1]): UNet2DModel.from_pretrained(root / k, **kwargs)
                   for k in index if k.startswith("client_") and k[len("client_"):].isdigit()}
        return cls(scheduler, server, clients, cfg, index.get("client_classes", {}))

    # -- sampling -------------------------------------------------------------------------------------------------
    def _client(self, client: int) -> UNet2DModel:
        n = self.cfg.data.num_clients
        if not isinstance(client, int) or not 0 <= client < n:
            raise ConfigError(f"client = {client!r} is invalid (allowed: 0..{n - 1})")
        if client not in self.clients:
            raise ConfigError(f"client = {client} is not in this export (allowed: {sorted(self.clients)}; a party's "
                              f"export holds only its own model)")
        return self.clients[client]

    def _labels(self, client: int, class_labels, n: int | None) -> torch.Tensor:
        ccfg = self.cfg.for_client(client)
        if class_labels is None:
            if node_labels(ccfg, "client").on_class:
                raise ConfigError("class_labels = None is invalid for a class-conditional model (allowed: a list of "
                                  "class ids)")
            if n is None or n < 1:
                raise ConfigError(f"num_images = {n!r} is invalid (allowed: an integer >= 1)")
            return torch.zeros(n, dtype=torch.long)
        y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(y) == 0:
            raise ConfigError("class_labels = [] is invalid (allowed: at least one class id)")
        allowed = self.client_classes.get(client)
        if allowed is not None and (bad := sorted(set(y.tolist()) - set(allowed))):
            raise ConfigError(f"class_labels {bad} are invalid for client {client} (allowed: {allowed}, the classes "
                              f"it held or that sample.shared_labels shares)")
        return y

    def _settings(self, num_inference_steps: int | None, sampler: str | None = None) -> Config:
        """The export's config, with ``sample.ddim_steps`` / ``sample.sampler`` replaced where given."""
        update = {}
        if num_inference_steps is not None:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ConfigError(f"num_inference_steps = {num_inference_steps!r} is invalid (allowed: an integer "
                                  f">= 1)")
            update["ddim_steps"] = num_inference_steps
        if sampler is not None:
            if sampler not in SAMPLERS:
                raise ConfigError(f"sampler = {sampler!r} is invalid (allowed: {', '.join(map(repr, SAMPLERS))})")
            update["sampler"] = sampler
        return self.cfg.model_copy(update={"sample": self.cfg.sample.model_copy(update=update)}) if update else self.cfg

    def _server_to_cut(self, cfg: Config, y: torch.Tensor, client: int, generator: torch.Generator | None
                       ) -> torch.Tensor:
        """What ``Server.sample_to_cut`` computes: x_T ~ N(0, I), then the server's steps down to the client's cut."""
        sp, cut = cfg.sample, cfg.client_cut(client)
        labels = node_labels(cfg, "server")
        ids = labels.encode(y.to(self.device), client)
        x = torch.randn((len(y), *cfg.image_shape), generator=generator).to(self.device)
        with self.progress_bar(total=segment_steps(self.schedule, sp, cut)[0]) as bar:
            return server_segment(self.server, self.schedule, sp, cut, cfg.reference_cut, ids, labels.null_id, x,
                                  generator, resolve_precision(cfg.train.precision, self.device), bar.update)

    @torch.no_grad()
    def finish(self, client: int, x_cut: torch.Tensor, class_labels, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None, sampler: str | None = None) -> torch.Tensor:
        """What ``Client.finish`` computes: the client's steps t = t_zeta..1 from the hand-offs ``x_cut`` to x_0
        (float [N, C, H, W]); all a client's export can do without the server's model."""
        model = self._client(client)
        ccfg = self._settings(num_inference_steps, sampler).for_client(client)
        sp = ccfg.sample
        y = self._labels(client, class_labels, len(x_cut))
        if len(y) != len(x_cut):
            raise ConfigError(f"class_labels has {len(y)} entries for {len(x_cut)} hand-offs (allowed: one each)")
        labels = node_labels(ccfg, "client")
        ids = labels.encode(y.to(self.device), client if ccfg.split.algorithm == "fedavg" else 0)
        with self.progress_bar(total=segment_steps(self.schedule, sp, ccfg.cut)[1]) as bar:
            return client_segment(model, self.schedule, sp, ccfg.cut, ids, labels.null_id, x_cut.to(self.device),
                                  generator, resolve_precision(ccfg.train.precision, self.device), bar.update).cpu()

    @torch.no_grad()
    def __call__(self, client: int = 0, class_labels=None, num_inference_steps: int | None = None,
                 generator: torch.Generator | None = None, num_images: int | None = None,
                 output_type: str = "pil", batch_size: int | None = None, sampler: str | None = None
                 ) -> CollaFuseOutput:
        """Draw images for ``client``.

        Args:
            client (`int`, defaults to 0): whose low-noise steps finish the chain.
            class_labels (`list[int]`, *optional*): one class per image; required for a class-conditional model.
            num_inference_steps (`int`, *optional*): the grid's steps (``sample.ddim_steps``; the export's by
                default). Ignored by ``ddpm``, which runs every step.
            generator (`torch.Generator`, *optional*): a CPU generator; per batch it draws the server's x_T and
                steps, then the client's steps (the order of ``collafuse sample --seed``).
            num_images (`int`, *optional*): how many, for an unconditional model.
            sampler (`str`, *optional*): ``"ddpm"``, ``"ddim"`` or ``"dpmsolver"`` (``sample.sampler`` by default).
            output_type (`str`, defaults to ``"pil"``): ``"pil"``, ``"np"`` (uint8 [N, H, W, C]) or ``"pt"``.
            batch_size (`int`, *optional*): images per batch (``sample.batch_size`` by default); the batches change
                which random numbers each image gets, so keep it to reproduce ``collafuse sample``.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ConfigError(f"output_type = {output_type!r} is invalid (allowed: 'pil', 'np', 'pt')")
        self._client(client)
        cfg = self._settings(num_inference_steps, sampler)
        y_all = self._labels(client, class_labels, num_images)
        cut = cfg.client_cut(client)
        own_chain = cut >= cfg.diffusion.timesteps or cfg.split.algorithm == "fedavg"
        if not own_chain and self.server is None:
            raise ConfigError(f"this export holds no server model, and client {client}'s cut {cut} < T = "
                              f"{self.cfg.diffusion.timesteps} needs the server's steps (allowed here: "
                              f"pipe.finish(client, x_cut, class_labels) on hand-offs from the server)")
        out_x, out_cut = [], []
        for y in y_all.split(batch_size or cfg.sample.batch_size):
            if own_chain:
                x_cut = torch.randn((len(y), *cfg.image_shape), generator=generator)
            else:
                x_cut = self._server_to_cut(cfg, y, client, generator)
            out_x.append(self.finish(client, x_cut, y, generator, num_inference_steps, sampler))
            out_cut.append(x_cut.cpu())
        x0 = torch.cat(out_x)
        if output_type == "pt":
            images = x0
        else:
            arr = to_uint8(x0.permute(0, 2, 3, 1))
            images = arr if output_type == "np" else [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
                                                      for a in arr]
        return CollaFuseOutput(images=images, labels=y_all, x_cut=torch.cat(out_cut))
