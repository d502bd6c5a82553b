"""What the ServerApp and the ClientApp share: the run configuration from Flower's run config, and a client node
whose whole state lives in its own directory.

Run config (``flwr run ... --run-config``, or ``[tool.flwr.app.config]`` in flower/pyproject.toml):

- ``config``: path of the CollaFuse TOML (absolute, or relative to the process's working directory);
- ``set``: ``;``-separated overrides, as ``--set`` takes them (``"train.rounds=2;split.cut=300"``);
- ``out``: the server's run directory (checkpoints, message log, metrics); in simulation also the default parent
  of the clients' state directories;
- ``overlap-server-steps`` (default true): the server takes its steps of a round while the clients take theirs
  (they read nothing of each other's, so the weights are the same bit for bit); false takes them after the
  clients' replies, as the in-process loop does.

Node config (``flower-supernode --node-config``; in simulation Flower sets ``partition-id``):

- ``client-id`` (or ``partition-id``): which client this node is;
- ``data-dir``: a folder holding only this client's images, in the ``data.dataset`` layout (IDX files, or an image
  folder with ``dataset = "image-folder"``; ``collafuse export-client-data`` writes IDX ones); without
  it the node takes its partition of ``data.root`` (convenient in simulation, where all nodes share a machine);
- ``state-dir``: where this client's model, optimizer, EMA, RNG, round counter and secret are kept between
  messages (default ``<out>/nodes/client<i>``: in simulation every node shares the machine; in deployment each
  SuperNode has its own);
- ``local-config`` (optional): a TOML file of this site's own values, the keys of one ``[[clients]]`` table
  (``cut``, ``[model]``, ``batch_size``, ``client_steps``; collafuse.config.ClientSettings). They replace the run
  config's values for this client only; the server learns the cut from the site's upload and refuses one outside
  its ``[split.min_cut, split.max_cut]``;
- ``secret-file`` (optional): a client-side file holding this client's secret as hex (``collafuse secrets``
  writes one), for reproducible experiments. Without it the node makes its secret from OS entropy the first time
  it is needed and keeps it in ``<state-dir>/client.secret`` (mode 0600). Never pass a secret in the run config:
  the server reads that.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from safetensors.torch import save_file

from ..config import Config, ConfigError, config_from_dict, load_config, read_toml
from ..data.images import save_grid
from ..data.partition import load_client_datasets, load_client_source
from ..split.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_text_atomic
from ..split.client import Client
from ..split.protocol import ANY_CLIENT, Message, ProtocolError, bounded_reason, check_message, client_node
from ..split.runner import Orchestrator
from ..split.seeding import load_or_create_secret, read_secret_file
from ..split.server import Server
from ..split.transport import MessageLog, handle_checked
from .codec import decode, encode

logger = logging.getLogger("collafuse.flower")

# Messages after which the client's state has changed and is written back to its directory.
_STATEFUL = {"train_request", "sample_order", "sample_response", "upload_request", "model_push"}


def config_from_run_config(run_config) -> Config:
    if "config" not in run_config:
        raise ConfigError("run config key 'config' is missing (allowed: the path of a CollaFuse TOML file)")
    overrides = [s.strip() for s in str(run_config.get("set", "")).split(";") if s.strip()]
    return load_config(Path(str(run_config["config"])), overrides)


def with_local_settings(cfg: Config, index: int, path: str | Path) -> Config:
    """``cfg`` with client ``index``'s values replaced by a site's local config (the keys of one ``[[clients]]``
    table), validated like the run config; errors name the file."""
    local = read_toml(path, what="node config local-config", example="site.toml")
    data = cfg.to_dict()
    clients = data.get("clients") or [{} for _ in range(cfg.data.num_clients)]
    clients[index] = {**clients[index], **local}
    data["clients"] = clients
    if "cut" in local:  # the server checks the site's cut against its own range when it uploads; here only 0..T
        data["split"].update(min_cut=0, max_cut=cfg.diffusion.timesteps)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _node_int(node_config, key: str) -> int | None:
    v = node_config.get(key)
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key} = {v!r} is invalid (allowed: an integer)") from None


class ClientNode:
    """A ``Client`` role restored from its node's directory, for one message; saved back after it.

    Args:
        cfg (`Config`): the run configuration.
        node_config (`Mapping`): this node's ``--node-config`` (see the module docstring).
        out (`str`): the run's ``out`` (only for the default state directory).
    """

    def __init__(self, cfg: Config, node_config, out: str):
        index = _node_int(node_config, "client-id")
        index = _node_int(node_config, "partition-id") if index is None else index
        if index is None or not 0 <= index < cfg.data.num_clients:
            raise ConfigError(f"node config client-id = {index!r} is invalid "
                              f"(allowed: an integer in [0, {cfg.data.num_clients - 1}])")
        if node_config.get("local-config"):
            cfg = with_local_settings(cfg, index, str(node_config["local-config"]))
        self.cfg = cfg
        self.state_dir = Path(str(node_config.get("state-dir") or Path(out) / "nodes" / f"client{index}"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if node_config.get("data-dir"):
            data = load_client_source(str(node_config["data-dir"]), index, cfg.data, cfg.num_classes)
        else:
            data = load_client_datasets(cfg.data, cfg.num_classes, cfg.seeds.data)[index]
        if node_config.get("secret-file"):
            secret = read_secret_file(Path(str(node_config["secret-file"])))
        else:  # written atomically before anything derived from it leaves this node
            secret = load_or_create_secret(self.state_dir / "client.secret")
        self.role = Client(index, data, cfg, secret=secret)
        self.saves = 0
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is not None:
            nodes, state = load_checkpoint(ckpt, self.identity)
            self.role.load_state(*nodes[self.role.node_id])
            self.saves = int(state["round"])
        self.log = MessageLog(self.state_dir / "message_log.jsonl")

    @property
    def identity(self) -> str:
        """The identity of this node's own run: the shared config with its own values in place."""
        return self.role.cfg.identity_hash()

    @property
    def ckpt_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    def save(self) -> None:
        """Atomically write the role's state as the next save number (never overwriting the current one)."""
        self.saves += 1
        save_checkpoint(self.ckpt_dir, self.saves, {self.role.node_id: self.role.state()},
                        {"config_hash": self.identity, "rounds_done": self.role.rounds_done})

    def _keep_samples(self) -> None:
        out = self.state_dir / "samples"
        out.mkdir(exist_ok=True)
        for batch in self.role.finished:
            k = len(list(out.glob("batch_*.safetensors")))
            save_file({k2: v.contiguous() for k2, v in batch.items()}, str(out / f"batch_{k:04d}.safetensors"))
            save_grid(batch["x0"], out / f"batch_{k:04d}.png")
        self.role.finished.clear()

    def handle(self, content) -> Message | None:
        """Decode, check and answer one message; a malformed one gets an ``error`` reply, never an exception.

        Every reply passes ``check_message``: the error for a message that did not decode is built from this node's
        id and a bounded reason, and everything else comes through ``handle_checked``, which checks the role's
        reply (the request was checked, so its sender is the server and an ``error`` back to it is allowed)."""
        try:
            msg = decode(content)
            check_message(msg, self.cfg.split.algorithm)
            if msg.receiver not in (self.role.node_id, ANY_CLIENT):
                raise ProtocolError(f"message for {msg.receiver} reached {self.role.node_id}")
        except ProtocolError as e:
            logger.warning("%s refused a message: %s", self.role.node_id, e)
            return Message("error", self.role.node_id, "server", meta={"reason": bounded_reason(str(e))})
        self.log.append(msg)
        reply = handle_checked(self.role, msg, self.log)
        if msg.kind in _STATEFUL and (reply is None or reply.kind != "error"):
            self.save()
        if self.role.finished:
            self._keep_samples()
        if reply is not None:
            self.log.append(reply)
        return reply


def encode_reply(reply: Message | None):
    from flwr.app import RecordDict

    return RecordDict() if reply is None else encode(reply)


def run_server(grid, run_config) -> dict:
    """The ServerApp's work: resume or start the run in ``out``, train, order samples, write metrics.json."""
    cfg = config_from_run_config(run_config)
    out = Path(str(run_config.get("out", "runs/flower")))
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.toml").is_file():
        write_text_atomic(out / "config.toml", cfg.to_toml())
    from .transport import FlowerTransport  # flwr-dependent; task's client half does not need it

    server = Server(cfg, state_dir=out / "server")  # its stored upload pool lives there (split.upload_pool)
    transport = FlowerTransport(grid, MessageLog(out / "message_log.jsonl"), cfg.data.num_clients,
                                reply_timeout=float(run_config.get("reply-timeout", 600)),
                                algorithm=cfg.split.algorithm,
                                overlap=_flag(run_config, "overlap-server-steps", True))
    orch = Orchestrator(cfg, server, transport, [client_node(i) for i in range(cfg.data.num_clients)], [server])
    resumed = orch.restore(out / "checkpoints")
    orch.resume_records()  # records past the checkpoint (a killed ServerApp's last round) are marked replayed
    _say(f"run {out}: cut {cfg.cut}, {cfg.data.num_clients} clients, "
         + (f"resuming after round {orch.history.rounds_done}" if resumed else "starting"))
    present = transport.wait_for_clients(cfg.data.num_clients, float(run_config.get("join-timeout", 300)))
    if not present:
        raise RuntimeError(f"no client joined within {run_config.get('join-timeout', 300)} s")
    _say(f"clients present: {', '.join(present)} (nodes {transport.nodes})")
    round_seconds: list[float] = []
    clock = [time.perf_counter()]

    def on_round(r: int) -> None:
        now = time.perf_counter()
        round_seconds.append(now - clock[0])
        clock[0] = now
        losses = {k: v[-1] for k, v in orch.history.losses.items()}
        _say(f"round {r}/{cfg.train.rounds} ({round_seconds[-1]:.1f} s): "
             + ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in losses.items()))

    orch.train(out / "checkpoints", progress=False, on_round=on_round)
    t0 = time.perf_counter()
    n = int(run_config.get("samples", cfg.sample.n_per_client))
    finished = orch.order_samples(n) if n else {}
    sample_s = time.perf_counter() - t0
    _say(f"sampling: {finished} images finished on the clients ({sample_s:.1f} s)")
    metrics = {
        "transport": "flower",
        "rounds_done": orch.history.rounds_done,
        "resumed": resumed,
        "history": orch.history.to_dict(),
        "round_seconds_this_session": round_seconds,
        "samples_finished": finished,
        "sample_seconds": sample_s,
        "events": orch.events,
        "messages": transport.log.summary(),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=False))
    return metrics


def _flag(run_config, key: str, default: bool) -> bool:
    v = run_config.get(key, default)
    if isinstance(v, bool):
        return v
    if str(v).strip().lower() in ("true", "false"):
        return str(v).strip().lower() == "true"
    raise ConfigError(f"run config {key} = {v!r} is invalid (allowed: true or false)")


def _say(line: str) -> None:
    """ServerApp output: print (shown by ``flwr run --stream`` and in the SuperLink's log) and log."""
    print(f"[collafuse] {line}", flush=True)
    logger.info(line)


__all__ = ["ClientNode", "config_from_run_config", "encode_reply", "run_server"]
