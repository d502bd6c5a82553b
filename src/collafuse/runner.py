"""The in-process federation and its training loop (one readable loop, nanoGPT-style).

The loop is the server's orchestration: it talks to clients only through the transport, so a networked transport
(Flower) runs the same rounds. Each round:

1. every client without a cached upload on the server answers an ``upload_request`` (first round only; every
   round with ``split.fresh_upload_noise``);
2. every client takes K local steps on t = 1..cut (``train_request`` -> ``train_reply`` with its mean loss);
3. the server takes S steps on t = cut+1..T from the mixed uploads;
4. a checkpoint of every node is written atomically.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .client import Client
from .config import Config, ConfigError, load_config
from .data import ClientData, load_client_datasets
from .protocol import SERVER, Message
from .server import Server
from .transport import InProcessTransport, MessageLog


@dataclass
class History:
    """Per-round mean losses of every node and per-node wall time, kept in checkpoints for exact resume."""

    losses: dict[str, list[float | None]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rounds_done: int = 0

    def add(self, node: str, loss: float, seconds: float) -> None:
        self.losses.setdefault(node, []).append(None if math.isnan(loss) else loss)
        self.seconds[node] = self.seconds.get(node, 0.0) + seconds

    def to_dict(self) -> dict:
        return {"losses": self.losses, "seconds": self.seconds, "rounds_done": self.rounds_done}

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(d["losses"], d["seconds"], d["rounds_done"])


class Federation:
    """A server, N clients and an in-process transport, built from one config.

    Args:
        cfg (`Config`): the run configuration.
        clients_data (`list[ClientData]`, *optional*): the clients' data; loaded from ``cfg.data`` when omitted.
        log (`MessageLog`, *optional*): message log; in memory when omitted.
    """

    def __init__(self, cfg: Config, clients_data: list[ClientData] | None = None, log: MessageLog | None = None):
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.cfg = cfg
        data = clients_data if clients_data is not None else load_client_datasets(
            cfg.data, cfg.num_classes, cfg.seeds.data)
        self.server = Server(cfg)
        self.clients = [Client(i, d, cfg) for i, d in enumerate(data)]
        self.log = log or MessageLog()
        self.transport = InProcessTransport([self.server, *self.clients], self.log)
        self.history = History()

    # -- one round ----------------------------------------------------------------------------------------------------
    def run_round(self, round_: int) -> dict[str, float]:
        cfg, tp, server = self.cfg, self.transport, self.server
        losses = {}
        for c in self.clients:
            if server.trains and (c.index not in server.uploads or cfg.split.fresh_upload_noise):
                t0 = time.perf_counter()
                server.handle(tp.request(Message("upload_request", SERVER, c.node_id, meta={"round": round_})))
                self.history.seconds[c.node_id] = self.history.seconds.get(c.node_id, 0.0) + time.perf_counter() - t0
        for c in self.clients:
            t0 = time.perf_counter()
            meta = {"round": round_, "steps": cfg.train.client_steps}
            reply = tp.request(Message("train_request", SERVER, c.node_id, meta=meta))
            server.handle(reply)
            losses[c.node_id] = reply.meta.get("loss", math.nan)
            self.history.add(c.node_id, losses[c.node_id], time.perf_counter() - t0)
        t0 = time.perf_counter()
        losses[SERVER] = server.train(cfg.train.server_steps)
        self.history.add(SERVER, losses[SERVER], time.perf_counter() - t0)
        self.history.rounds_done = round_
        return losses

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def node_states(self) -> dict:
        return {SERVER: self.server.state(), **{c.node_id: c.state() for c in self.clients}}

    def save(self, ckpt_dir: Path) -> Path:
        run_state = {"config_hash": self.cfg.identity_hash(), "history": self.history.to_dict()}
        return save_checkpoint(ckpt_dir, self.history.rounds_done, self.node_states(), run_state)

    def restore(self, ckpt_dir: Path) -> bool:
        """Load the latest checkpoint if there is one. Raises ``CheckpointError`` if it is corrupt or mismatched."""
        path = latest_checkpoint(ckpt_dir)
        if path is None:
            return False
        nodes, state = load_checkpoint(path, self.cfg.identity_hash())
        expected = {SERVER, *(c.node_id for c in self.clients)}
        if set(nodes) != expected:
            raise CheckpointError(f"checkpoint {path} holds nodes {sorted(nodes)}, this run has {sorted(expected)}")
        try:
            self.server.load_state(*nodes[SERVER])
            for c in self.clients:
                c.load_state(*nodes[c.node_id])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit the configured models: {e}") from None
        self.history = History.from_dict(state["history"])
        return True

    # -- the loop ------------------------------------------------------------------------------------------------------
    def train(self, ckpt_dir: Path | None = None, progress: bool = True, on_round=None) -> History:
        """Run rounds from the last completed one up to ``cfg.train.rounds``, checkpointing as configured."""
        tr = self.cfg.train
        start = self.history.rounds_done
        bar = tqdm(range(start + 1, tr.rounds + 1), initial=start, total=tr.rounds, desc="rounds",
                   disable=not progress, dynamic_ncols=True)
        for round_ in bar:
            losses = self.run_round(round_)
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items() if not math.isnan(v)}, refresh=False)
            if ckpt_dir is not None and (round_ % tr.checkpoint_every == 0 or round_ == tr.rounds):
                self.save(ckpt_dir)
            if on_round is not None:
                on_round(round_)
        return self.history

    def sample(self, client: int, n: int, generator: torch.Generator | None = None) -> dict:
        c = self.clients[client]
        return c.sample(n, self.transport, generator)

    def set_progress(self, show: bool) -> None:
        for role in (self.server, *self.clients):
            role.show_progress = show


def load_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), log: MessageLog | None = None) -> Federation:
    """A Federation restored from a run directory's config.toml and latest checkpoint (log in memory by default)."""
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"run_dir = '{run_dir}' has no config.toml (expected a directory written by collafuse run)")
    fed = Federation(load_config(run_dir / "config.toml", overrides), log=log)
    if not fed.restore(run_dir / "checkpoints"):
        raise CheckpointError(f"{run_dir}/checkpoints has no checkpoint; train first with collafuse run")
    return fed
