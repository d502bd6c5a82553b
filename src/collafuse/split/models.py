"""Denoiser networks (diffusers UNet2DModel), their label conditioning and classifier-free guidance."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import UNet2DModel

from ..config import Config, ModelConfig
from .seeding import derive_seed

Node = Literal["server", "client"]


class LabelEncoder:
    """Maps (class label, client index) to the model's class-embedding id; the last id is the null label.

    Args:
        num_classes (`int`): classes in the dataset.
        num_clients (`int`): clients in the federation (used when ``on_client``).
        on_class (`bool`): embed the class label.
        on_client (`bool`): embed the client index ("client-specific conditioning y_i", arXiv 2406.14429 Fig. 1).
    """

    def __init__(self, num_classes: int, num_clients: int, on_class: bool, on_client: bool):
        self.num_classes, self.num_clients = num_classes, num_clients
        self.on_class, self.on_client = on_class, on_client
        n = (num_classes if on_class else 1) * (num_clients if on_client else 1)
        self.null_id = n if (on_class or on_client) else None  # None: unconditional model
        self.num_embeds = n + 1 if self.null_id is not None else None

    def encode(self, y: torch.Tensor, client_index: int | torch.Tensor = 0) -> torch.Tensor | None:
        if self.null_id is None:
            return None
        ids = torch.zeros_like(y)
        if self.on_class:
            ids = ids + y
        if self.on_client:
            ids = ids + torch.as_tensor(client_index, device=y.device) * (self.num_classes if self.on_class else 1)
        return ids

    def drop(self, ids: torch.Tensor | None, prob: float, generator: torch.Generator) -> torch.Tensor | None:
        """Replace a random share ``prob`` of ids with the null id (trains the unconditional branch for CFG)."""
        if ids is None or prob <= 0:
            return ids
        mask = torch.rand(ids.shape, generator=generator, device=generator.device).to(ids.device) < prob
        return torch.where(mask, torch.full_like(ids, self.null_id), ids)


def client_model_config(cfg: Config) -> ModelConfig:
    """The architecture a client trains: its own small model, or under FedAvg a copy of the global (server) model."""
    return cfg.server_model if cfg.split.algorithm == "fedavg" else cfg.client_model


def node_model_config(cfg: Config, node: Node) -> ModelConfig:
    """The architecture of a node's model: ``server_model`` for the server, `client_model_config` for a client.

    Args:
        cfg (`Config`): the run configuration.
        node (`"server"` or `"client"`): which role; every client has the same architecture.
    """
    if node == "server":
        return cfg.server_model
    if node == "client":
        return client_model_config(cfg)
    raise ValueError(f"node = {node!r} is invalid (allowed: 'server', 'client')")


def node_labels(cfg: Config, node: Node) -> LabelEncoder:
    """A node's label encoder: the one builder that ``Server``, ``Client`` and the compute accounting share.

    The server embeds what its model config asks for. A CollaFuse client model never embeds the client id (config
    validation enforces it); a FedAvg client encodes labels exactly as the global model does, its own index included
    where that embeds it.

    Args:
        cfg (`Config`): the run configuration.
        node (`"server"` or `"client"`): which role.
    """
    m = node_model_config(cfg, node)
    on_client = m.condition_on_client and (node == "server" or cfg.split.algorithm == "fedavg")
    return LabelEncoder(cfg.num_classes, cfg.data.num_clients, m.condition_on_class, on_client)


def build_unet(cfg: ModelConfig, num_embeds: int | None, seed: int, in_channels: int = 1, size: int = 28):
    """A UNet2DModel without attention in the resolution levels (small images) and optional mid attention."""
    levels = len(cfg.block_out_channels)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's global RNG
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            add_attention=cfg.mid_attention,
            attention_head_dim=8,
            norm_num_groups=cfg.norm_num_groups,
            num_class_embeds=num_embeds,
        )


def node_model(cfg: ModelConfig, labels: LabelEncoder, init_seed: int, node_id: str,
               image_shape: tuple[int, int, int] = (1, 28, 28)) -> UNet2DModel:
    """One node's UNet for images of ``image_shape`` (C, H, W): grayscale or RGB, 28, 32, 64 pixels...; the depth
    is ``len(cfg.block_out_channels)`` (config validation keeps every level's size even)."""
    c, h, _ = image_shape
    return build_unet(cfg, labels.num_embeds, derive_seed(init_seed, "init", node_id), in_channels=c, size=h)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_eps(
    model: UNet2DModel,
    x: torch.Tensor,
    t_index: int,
    ids: torch.Tensor | None,
    null_id: int | None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Model epsilon with classifier-free guidance eps_u + w (eps_c - eps_u) (Ho & Salimans 2022); w = 1: plain.
    ``t_index`` is the diffusers timestep index (collafuse.split.diffusion, Indexing)."""
    tt = torch.full((x.shape[0],), t_index, device=x.device, dtype=torch.long)
    if ids is None or guidance_scale == 1.0:
        return model(x, tt, class_labels=ids).sample
    null = torch.full_like(ids, null_id)
    both = model(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([ids, null])).sample
    eps_c, eps_u = both.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)
