"""The in-process federation and its training loop (one readable loop, nanoGPT-style).

The loop is the server's orchestration: it talks to clients only through the transport, so a networked transport
(Flower) runs the same rounds. Each round:

1. every client without a cached upload on the server answers an ``upload_request`` (first round only; every
   round with ``split.fresh_upload_noise``), all clients at once (one coarse message each);
2. every client takes K local steps on t = 1..cut (``train_request`` -> ``train_reply`` with its mean loss); a
   client that drops out or whose reply is refused sits the round out and the round completes without it;
3. the server takes S steps on t = cut+1..T from the mixed uploads;
4. a checkpoint of every node is written atomically.

Under ``split.algorithm = "fedavg"`` (the baseline) a round is instead: the server pushes the global weights to
every client (``model_push``), each trains K steps on t = 1..T and returns its weights (``model_update``), and the
server averages them weighted by the clients' training images (collafuse.split.fedavg); after the last round the final
average is pushed once more (``steps = 0``) so that every client samples with it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, ConfigError, load_config
from ..data.partition import ClientData, load_client_datasets
from .checkpoint import CheckpointError, load_checkpoint, named_checkpoint, save_checkpoint
from .client import Client
from .learner import machine_record
from .protocol import SERVER, Message, bounded_reason, client_index
from .seeding import ClientSecret, SecretError
from .server import Server
from .transport import Delivery, InProcessTransport, MessageLog, Transport, handle_checked

logger = logging.getLogger("collafuse.runner")


@dataclass
class History:
    """Per-round mean losses of every node and per-node wall time, kept in checkpoints for exact resume; and the
    run's training segments: each start or resume that trained rounds, from which round, on what machine
    (`learner.machine_record`), so that timings and the precision "auto" chose stay labelled across resumes."""

    losses: dict[str, list[float | None]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    rounds_done: int = 0
    segments: list[dict] = field(default_factory=list)

    def add(self, node: str, loss: float, seconds: float) -> None:
        self.losses.setdefault(node, []).append(None if math.isnan(loss) else loss)
        self.seconds[node] = self.seconds.get(node, 0.0) + seconds

    def to_dict(self) -> dict:
        return {"losses": self.losses, "seconds": self.seconds, "rounds_done": self.rounds_done,
                "segments": self.segments}

    @classmethod
    def from_dict(cls, d: dict) -> History:
        # checkpoints written before segments were recorded have none
        return cls(d["losses"], d["seconds"], d["rounds_done"], d.get("segments", []))


class Orchestrator:
    """The server side of a run: the round loop, driven only through a transport, and per-round checkpoints of the
    nodes that live in this process. ``Federation`` (everything in one process) and the Flower ServerApp
    (collafuse.flower.server_app: only the server here, clients on their own nodes) both run this loop.

    Args:
        cfg (`Config`): the run configuration.
        server (`Server`): the server role.
        transport (`Transport`): how requests reach the clients.
        client_ids (`list[str]`): the clients of the run (``client0``...).
        local_roles (`list`): the roles whose state this process checkpoints (the server, plus in-process clients).
    """

    def __init__(self, cfg: Config, server: Server, transport: Transport, client_ids: list[str], local_roles: list):
        self.cfg = cfg
        self.server = server
        self.transport = transport
        self.client_ids = list(client_ids)
        self.all_client_ids = list(client_ids)  # dropped ones included: their losses stay None from then on
        self.local_roles = list(local_roles)
        self.history = History()
        self.events: list[str] = []  # dropped or refused clients, one line each (also logged)
        self.dropped: list[str] = []  # clients left out for good after a refused upload
        # The log length the restored checkpoint was written at (0: nothing restored; None: a checkpoint from before
        # the field, whose records past it cannot be told apart).
        self.restored_log_seq: int | None = 0

    def _note(self, line: str) -> None:
        logger.warning(line)
        self.events.append(line)

    def _tell(self, node: str, reason: str) -> None:
        """Send a client the ``error`` that says why its message was refused (once; its answer does not matter)."""
        self.transport.exchange([Message("error", SERVER, node, meta={"reason": bounded_reason(reason)})])

    def _to_server(self, deliveries: list[Delivery], context: str,
                   refused: list[str] | None = None) -> dict[str, tuple[Message, Message | None]]:
        """Hand every usable reply to the server (checked; a refusal is logged and told to the client, never
        raised). Returns, by client, the accepted reply and the server's answer to it; the clients whose reply the
        server refused are appended to ``refused``."""
        accepted = {}
        for d in deliveries:
            node = d.request.receiver
            if d.error is not None:
                self._note(f"{context}: {node} skipped ({d.error})")
                if d.refused:
                    self._tell(node, d.error)
                continue
            answer = handle_checked(self.server, d.reply, self.transport.log)
            if answer is not None and answer.kind == "error":
                self._note(f"{context}: {node} skipped (refused {d.reply.kind}: {answer.meta['reason']})")
                self._tell(node, answer.meta["reason"])
                if refused is not None:
                    refused.append(node)
                continue
            accepted[node] = (d.reply, answer)
        return accepted

    def drop(self, node: str, context: str) -> None:
        """Leave client ``node`` out of every later request of this run (logged); the federation goes on."""
        self.client_ids.remove(node)
        self.dropped.append(node)
        self._note(f"{context}: {node} dropped from the federation (its upload was refused)")

    def _timed(self, deliveries: list[Delivery]) -> list[Delivery]:
        for d in deliveries:
            node = d.request.receiver
            self.history.seconds[node] = self.history.seconds.get(node, 0.0) + d.seconds
        return deliveries

    def client_steps(self, node: str) -> int:
        """The steps per round asked of a client: its [[clients]] value where the config sets one (a site's local
        config may set its own, which the client then takes instead)."""
        i = client_index(node)
        return self.cfg.for_client(i).train.client_steps if i < len(self.cfg.clients) else self.cfg.train.client_steps

    # -- one round ----------------------------------------------------------------------------------------------------
    def _record_client_losses(self, replies: dict[str, tuple[Message, Message | None]]) -> dict[str, float]:
        """Each client's mean loss of this round from its accepted reply (NaN, kept as None, where it sat out)."""
        losses = {}
        for c in self.all_client_ids:
            loss = replies[c][0].meta.get("loss", math.nan) if c in replies else math.nan
            self.history.losses.setdefault(c, []).append(None if math.isnan(loss) else loss)
            losses[c] = loss
        return losses

    def run_round(self, round_: int) -> dict[str, float]:
        """Uploads where the server lacks one (or every round with fresh noise), K client steps per client, S server
        steps. A client that does not answer or whose reply is refused sits the round out; the round completes."""
        if self.cfg.split.algorithm == "fedavg":
            return self.run_fedavg_round(round_)
        cfg, server = self.cfg, self.server
        server.start_round(round_)
        need_upload = [c for c in self.client_ids
                       if server.trains and (client_index(c) not in server.uploads or cfg.split.fresh_upload_noise)]
        if need_upload:
            refused: list[str] = []
            self._to_server(self._timed(self.transport.exchange(
                [Message("upload_request", SERVER, c, meta={"round": round_}) for c in need_upload])),
                f"round {round_}", refused)
            for c in refused:  # a refused upload (a cut outside the server's range, a changed cut, a wrong shape)
                self.drop(c, f"round {round_}")  # does not become right by asking again: the client leaves
        if not self.client_ids:
            raise RuntimeError(f"round {round_}: every client was dropped ({'; '.join(self.events[-3:])})")

        def server_steps() -> tuple[float, float]:
            t0 = time.perf_counter()
            return server.train(cfg.train.server_steps), time.perf_counter() - t0

        # The server's steps read only its own model and the uploads, never this round's replies, so a transport
        # whose clients run elsewhere takes them while the clients take theirs (same result, bit for bit).
        deliveries, (server_loss, server_s) = self.transport.exchange_while(
            [Message("train_request", SERVER, c, meta={"round": round_, "steps": self.client_steps(c)})
             for c in self.client_ids], server_steps)
        replies = self._to_server(self._timed(deliveries), f"round {round_}")
        losses = self._record_client_losses(replies)
        losses[SERVER] = server_loss
        self.history.add(SERVER, server_loss, server_s)
        self.history.rounds_done = round_
        return losses

    def run_fedavg_round(self, round_: int) -> dict[str, float]:
        """FedAvg: push the global weights, K local steps per client, average the replies weighted by data size.
        A client that drops out or whose update is refused is left out of this round's average."""
        self.server.start_round(round_)
        weights = self.server.global_weights()
        replies = self._to_server(self._timed(self.transport.exchange(
            [Message("model_push", SERVER, c, {"weights": weights}, {"round": round_, "steps": self.client_steps(c)})
             for c in self.client_ids])), f"round {round_}")
        losses = self._record_client_losses(replies)
        t0 = time.perf_counter()
        if self.server.aggregate() == 0:
            self._note(f"round {round_}: no client update; the global weights stay as they were")
        self.history.add(SERVER, math.nan, time.perf_counter() - t0)
        self.history.rounds_done = round_
        return losses

    def distribute(self) -> None:
        """FedAvg: hand the final global weights to every client (``model_push`` with ``steps = 0``), so that each
        samples with the average of the last round and not with its own last local weights. Repeating it is
        harmless: a client applies the weights of a round once."""
        final = self.history.rounds_done + 1
        self._to_server(self.transport.exchange(
            [Message("model_push", SERVER, c, {"weights": self.server.global_weights()},
                     {"round": final, "steps": 0}) for c in self.client_ids]), "final weights")

    def order_samples(self, n_per_client: int) -> dict[str, int]:
        """Server-initiated sampling (how Flower must do it): per batch, every client gets a ``sample_order``, answers
        with its ``sample_request``, receives the hand-offs and finishes locally; the final images stay with the
        clients. Returns the number of images each client reported finished.

        When the server owns no step (cut = T, FedAvg) the order alone is enough: each client samples the whole chain
        from its own x_T and answers ``sample_done`` at once."""
        done = dict.fromkeys(self.client_ids, 0)
        batch = self.cfg.sample.batch_size
        for start in range(0, n_per_client, batch):
            n = min(batch, n_per_client - start)
            accepted = self._to_server(self.transport.exchange(
                [Message("sample_order", SERVER, c, meta={"n": n}) for c in self.client_ids]), "sampling")
            if not self.server.trains:
                for node, (reply, _) in accepted.items():
                    if reply.kind == "sample_done":
                        done[node] += int(reply.meta["n"])
                continue
            responses = [answer for _, answer in accepted.values() if answer is not None]
            if not responses:
                continue
            for d in self.transport.exchange(responses):
                if d.error is not None:
                    self._note(f"sampling: {d.request.receiver} skipped ({d.error})")
                elif d.reply is not None and d.reply.kind == "sample_done":
                    done[d.request.receiver] += int(d.reply.meta["n"])
        return done

    # -- checkpoints ---------------------------------------------------------------------------------------------------
    def node_states(self) -> dict:
        return {r.node_id: r.state() for r in self.local_roles}

    def save(self, ckpt_dir: Path) -> Path:
        # log_seq: where this checkpoint's records end, so a resume marks what was logged after it as replayed
        run_state = {"config_hash": self.cfg.identity_hash(), "history": self.history.to_dict(),
                     "log_seq": self.transport.log.next_seq}
        return save_checkpoint(ckpt_dir, self.history.rounds_done, self.node_states(), run_state,
                               keep_rounds=self.cfg.train.keep_rounds)

    def restore(self, ckpt_dir: Path, checkpoint: str | None = None) -> bool:
        """Load the latest checkpoint (or the one named ``checkpoint``, e.g. ``round_000025``) if there is one.
        Raises ``CheckpointError`` if it is corrupt, mismatched or (when named) absent."""
        path = named_checkpoint(ckpt_dir, checkpoint)
        if path is None:
            return False
        nodes, state = load_checkpoint(path, self.cfg.identity_hash())
        expected = {r.node_id for r in self.local_roles}
        if set(nodes) != expected:
            raise CheckpointError(f"checkpoint {path} holds nodes {sorted(nodes)}, this run has {sorted(expected)}")
        try:
            for r in self.local_roles:
                r.load_state(*nodes[r.node_id])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit the configured models: {e}") from None
        self.history = History.from_dict(state["history"])
        self.restored_log_seq = state.get("log_seq")
        self.restored_from = path  # which checkpoint the weights are (evaluation keys its sample cache on it)
        return True

    def resume_records(self) -> int:
        """Before the first round of a run that writes into an existing message log: mark replayed every record past
        the checkpoint it resumed from (every record, when it starts from nothing), so the log holds each round once
        (MessageLog.replay_after). Returns how many were marked."""
        if self.restored_log_seq is None:
            self._note("the checkpoint predates log_seq: records logged after it cannot be marked as replayed")
            return 0
        marked = self.transport.log.replay_after(self.restored_log_seq)
        if marked:
            logger.info("marked %d message-log records past the checkpoint as replayed", marked)
        return marked

    # -- the loop ------------------------------------------------------------------------------------------------------
    def train(self, ckpt_dir: Path | None = None, progress: bool = True, on_round=None) -> History:
        """Run rounds from the last completed one up to ``cfg.train.rounds``, checkpointing as configured."""
        tr = self.cfg.train
        start = self.history.rounds_done
        if start < tr.rounds:
            self.history.segments.append({"from_round": start + 1,
                                          **machine_record(tr.precision, self.cfg.run.device)})
        bar = tqdm(range(start + 1, tr.rounds + 1), initial=start, total=tr.rounds, desc="rounds",
                   disable=not progress, dynamic_ncols=True)
        for round_ in bar:
            losses = self.run_round(round_)
            bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items() if not math.isnan(v)}, refresh=False)
            if ckpt_dir is not None and (round_ % tr.checkpoint_every == 0 or round_ == tr.rounds
                                         or round_ in tr.keep_rounds):
                self.save(ckpt_dir)
            if on_round is not None:
                on_round(round_)
        if self.cfg.split.algorithm == "fedavg" and self.history.rounds_done > 0:
            self.distribute()
            if ckpt_dir is not None:  # the clients now hold the final average: keep that, not their last local step
                self.save(ckpt_dir)
        return self.history


class Federation(Orchestrator):
    """A server, N clients and an in-process transport, built from one config.

    Args:
        cfg (`Config`): the run configuration.
        clients_data (`list[ClientData]`, *optional*): the clients' data; loaded from ``cfg.data`` when omitted.
        log (`MessageLog`, *optional*): message log; in memory when omitted.
        secrets (`dict[int, ClientSecret]`, *optional*): explicit client secrets by client index, for a reproducible
            experiment (``collafuse run --client-secrets``); clients without one draw theirs from OS entropy.
        server_dir (`Path`, *optional*): the server's state directory (its stored upload pool,
            ``split.upload_pool``); None keeps the uploads in memory.
    """

    def __init__(self, cfg: Config, clients_data: list[ClientData] | None = None, log: MessageLog | None = None,
                 secrets: dict[int, ClientSecret] | None = None, server_dir: Path | None = None):
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        data = clients_data if clients_data is not None else load_client_datasets(
            cfg.data, cfg.num_classes, cfg.seeds.data)
        secrets = secrets or {}
        if extra := sorted(set(secrets) - set(range(len(data)))):
            raise SecretError(f"client secrets given for clients {extra} (allowed: clients 0..{len(data) - 1})")
        server = Server(cfg, state_dir=server_dir)
        self.clients = [Client(i, d, cfg, secret=secrets.get(i)) for i, d in enumerate(data)]
        self.log = log or MessageLog()
        transport = InProcessTransport([server, *self.clients], self.log, cfg.split.algorithm)
        super().__init__(cfg, server, transport, [c.node_id for c in self.clients], [server, *self.clients])

    def sample(self, client: int, n: int, generator: torch.Generator | None = None,
               labels: torch.Tensor | None = None, seed: int | None = None) -> dict:
        """Client ``client`` draws ``n`` images through the split (`Client.sample`); ``labels``: which classes.

        ``seed``: one CPU generator seeded with it drives both segments, in the order the exported pipeline draws
        (collafuse.export.pipeline): per batch the server's x_T and its steps, then the client's steps. The images
        are then a function of the weights, the settings and the seed alone, so ``CollaFusePipeline(...,
        generator=torch.Generator().manual_seed(seed))`` reproduces them. Without it the server draws from its own
        stream and the client from ``generator`` (its secret stream by default), as in a deployment.
        """
        c = self.clients[client]
        if seed is None:
            return c.sample(n, self.transport, generator, labels)
        shared = torch.Generator().manual_seed(seed)
        own, self.server.learner.sample_rng = self.server.learner.sample_rng, shared
        try:
            return c.sample(n, self.transport, shared, labels)
        finally:
            self.server.learner.sample_rng = own

    def set_progress(self, show: bool) -> None:
        for role in (self.server, *self.clients):
            role.show_progress = show


def load_run(run_dir: Path, overrides: list[str] | tuple[str, ...] = (), log: MessageLog | None = None,
             checkpoint: str | None = None) -> Federation:
    """A Federation restored from a run directory's config.toml and its latest checkpoint, or the one named
    ``checkpoint`` (``round_000025``; kept by ``train.keep_rounds``); the log is in memory by default."""
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"run_dir = '{run_dir}' has no config.toml (expected a directory written by collafuse run)")
    fed = Federation(load_config(run_dir / "config.toml", overrides), log=log)
    if not fed.restore(run_dir / "checkpoints", checkpoint):
        raise CheckpointError(f"{run_dir}/checkpoints has no checkpoint; train first with collafuse run")
    return fed
