"""The one interface every client/server exchange goes through, the message log, and the in-process transport.

A transport delivers a request to the receiving role's ``handle`` and returns its reply. Both directions are
checked against the protocol table (``protocol.check_message``) and written to the message log, so the log is a
complete audit of what crossed. The sending side checks too: ``handle_checked`` checks a role's reply before it
is returned, so no node sends what the protocol forbids. Other transports (collafuse.flower) implement
``exchange`` over the network.

Failures are values, not crashes: ``exchange`` returns one ``Delivery`` per request, whose ``error`` says why no
usable reply came back (the node is unavailable, or its reply was refused). A refused message is written to the log
with ``rejected`` and its reason, and the receiving role answers with an ``error`` message instead of a reply.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from .checkpoint import write_text_atomic
from .protocol import ANY_CLIENT, SERVER, Message, ProtocolError, bounded_reason, check_message, show
from .upload_pool import upload_digest

T = TypeVar("T")

logger = logging.getLogger("collafuse.transport")


class Role(Protocol):
    node_id: str

    def handle(self, msg: Message) -> Message | None: ...


class MessageLog:
    """Append-only JSON-lines audit of every message: kind, sender, receiver, array names, shapes, dtypes, bytes.

    The log stays true across crashes (a run killed with kill -9 and resumed):

    - a line torn by the kill (the last one, without its newline) is dropped when the log is opened;
    - ``replay_after(seq)`` marks ``"replayed": true`` on every record past the resumed checkpoint: they crossed,
      but the round they belong to was cut off and is done again, so the totals count it once;
    - an ``upload`` carries the digest of its arrays (``upload_pool.upload_digest``, the one the server keeps), and an
      upload whose sender already sent those exact bytes (re-sent after a server restart) is marked
      ``"resent": true``: it tells the server nothing new and is reported apart from the first uploads;
    - ``seq`` rises strictly over the file's whole life.

    ``summary`` (and collafuse.evaluation.communication) count only the *counted* records, the ones a run that
    was never killed would hold, and report the replayed and re-sent ones separately.

    Args:
        path (`Path`, *optional*): file to append to; None keeps the log in memory only.
    """

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []
        self._sent_uploads: set[tuple[str, str]] = set()  # (sender, digest) of the counted uploads
        if self.path is not None and self.path.exists():
            lines = self.path.read_text().split("\n")
            complete, tail = lines[:-1], lines[-1]  # the text after the last newline: a line cut by a kill
            for line in complete:
                if line.strip():
                    self.records.append(json.loads(line))
            if tail.strip():
                logger.warning("%s: dropped its last line, cut off by a crash (%d bytes)", self.path, len(tail))
                self._rewrite()
            for r in self.records:
                self._note_upload(r)

    def _rewrite(self) -> None:
        if self.path is not None:
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _note_upload(self, record: dict) -> None:
        if record.get("kind") == "upload" and is_counted(record) and "digest" in record:
            self._sent_uploads.add((record["sender"], record["digest"]))

    def append(self, msg: Message, rejected: str | None = None) -> None:
        """Record a message; ``rejected`` (the reason) marks one that was refused and never reached its role."""
        record = {"seq": self.next_seq, "time": round(time.time(), 3), **msg.summary()}
        if rejected is not None:
            record["rejected"] = rejected
        elif msg.kind == "upload":
            record["digest"] = upload_digest(msg.arrays["x_cut"].detach().cpu(), msg.arrays["y"].detach().cpu())
            if (record["sender"], record["digest"]) in self._sent_uploads:
                record["resent"] = True
            self._note_upload(record)
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def replay_after(self, seq: int) -> int:
        """Mark every record from ``seq`` on as replayed (the log length the resumed checkpoint was written at; 0 for
        a run that starts again from nothing); the file is rewritten atomically. Returns how many were marked."""
        marked = 0
        for r in self.records:
            if r["seq"] >= seq and not r.get("replayed"):
                r["replayed"] = True
                marked += 1
        if marked:
            self._sent_uploads.clear()
            for r in self.records:
                self._note_upload(r)
            self._rewrite()
        return marked

    @property
    def next_seq(self) -> int:
        """The seq of the next record: what a checkpoint keeps, so a resume knows where its records end."""
        return self.records[-1]["seq"] + 1 if self.records else 0

    def summary(self) -> dict:
        """Totals by kind and direction of the counted records (bytes are array payload bytes), and apart from
        them what crossed again after restarts: ``replayed`` (records of a round a crash cut off) and
        ``resent_uploads`` (uploads that repeat bytes the server had already received)."""
        by_kind: dict[str, dict] = defaultdict(lambda: {"messages": 0, "bytes": 0})
        per_client: dict[str, dict] = defaultdict(lambda: {"uploaded_bytes": 0, "downloaded_bytes": 0})
        why = uncounted(self.records)
        counted = [r for r, w in zip(self.records, why) if w is None]
        for r in counted:
            if r.get("rejected"):
                by_kind["rejected"]["messages"] += 1
                continue
            by_kind[r["kind"]]["messages"] += 1
            by_kind[r["kind"]]["bytes"] += r["bytes"]
            if r["receiver"] == SERVER:
                per_client[r["sender"]]["uploaded_bytes"] += r["bytes"]
            else:
                per_client[r["receiver"]]["downloaded_bytes"] += r["bytes"]
        again = {name: [r for r, w in zip(self.records, why) if w == name] for name in ("replayed", "resent")}
        return {
            "messages": len(counted),
            "client_to_server_bytes": sum(r["bytes"] for r in counted
                                          if r["receiver"] == SERVER and not r.get("rejected")),
            "server_to_client_bytes": sum(r["bytes"] for r in counted
                                          if r["sender"] == SERVER and not r.get("rejected")),
            "by_kind": dict(sorted(by_kind.items())),
            "per_client": dict(sorted(per_client.items())),
            "replayed": {"messages": len(again["replayed"]), "bytes": sum(r["bytes"] for r in again["replayed"])},
            # the re-sent uploads and the requests that asked for them
            "resent_uploads": {"messages": sum(r["kind"] == "upload" for r in again["resent"]),
                               "requests": sum(r["kind"] == "upload_request" for r in again["resent"]),
                               "bytes": sum(r["bytes"] for r in again["resent"])},
        }


def is_counted(record: dict) -> bool:
    """Whether a log record, on its own, is one a run that was never killed would hold (neither replayed nor a
    re-sent upload). The ``upload_request`` that asked for a re-send is told apart only beside its answer: use
    ``uncounted`` on the whole log."""
    return not record.get("replayed") and not record.get("resent")


def uncounted(records: list[dict]) -> list[str | None]:
    """Per record, why it is not counted: ``"replayed"``, ``"resent"`` (a re-sent upload, or the ``upload_request``
    it answered), or None for a counted one."""
    why: list[str | None] = ["replayed" if r.get("replayed") else "resent" if r.get("resent") else None
                             for r in records]
    asked: dict[str, int] = {}  # client -> its last counted upload_request not answered yet
    for i, r in enumerate(records):
        if why[i] is None and r.get("kind") == "upload_request":
            asked[r["receiver"]] = i
        elif r.get("kind") == "upload" and not r.get("rejected"):
            j = asked.pop(r["sender"], None)
            if j is not None and why[i] == "resent":
                why[j] = "resent"
    return why


class NodeUnavailable(RuntimeError):
    """A node did not answer: it dropped out, timed out or is not connected."""


@dataclass
class Delivery:
    """The outcome of one request: the checked reply, or why there is none.

    Args:
        request (`Message`): what was sent.
        reply (`Message`, *optional*): the receiver's reply, checked; None if there is none or it was refused.
        error (`str`, *optional*): why there is no usable reply (unavailable, refused, or the receiver's ``error``).
        seconds (`float`): wall time from sending to the reply.
        refused (`bool`): a reply arrived but failed the transport's checks; the sender should be told why.
    """

    request: Message
    reply: Message | None = None
    error: str | None = None
    seconds: float = 0.0
    refused: bool = False


def error_reply(msg: Message, reason: str, sender: str | None = None) -> Message:
    """The ``error`` message a role sends back instead of a reply to a message it refused.

    Args:
        msg (`Message`): the refused message; the error goes back to its sender.
        reason (`str`): why; cut to what ``error`` allows (``protocol.MAX_REASON_BYTES`` bytes of UTF-8).
        sender (`str`, *optional*): the refusing node; defaults to ``msg.receiver`` (which for a ``join_request``
            is ``client*``, so a role passes its own id).
    """
    return Message("error", msg.receiver if sender is None else sender, msg.sender,
                   meta={"reason": bounded_reason(reason)})


def role_algorithm(role: Role) -> str:
    """The ``split.algorithm`` whose message kinds ``role`` accepts (``protocol.KINDS``)."""
    cfg = getattr(role, "cfg", None)
    return cfg.split.algorithm if cfg is not None else "collafuse"


def handle_checked(role: Role, msg: Message, log: MessageLog | None = None) -> Message | None:
    """Deliver ``msg`` to ``role`` and return its checked reply.

    A ``ProtocolError`` raised while checking or handling ``msg`` becomes an ``error`` reply and a log line, so a
    malformed message never crashes the receiver (the role checks before it mutates). The role's own reply is
    checked too before it is returned: a reply the protocol forbids is logged (and marked ``rejected`` in the
    audit) and replaced by an ``error``, so a node never sends what the protocol does not allow.

    Args:
        role (`Role`): the receiving role; it answers only messages addressed to it.
        msg (`Message`): the message, from any source.
        log (`MessageLog`, *optional*): where refusals are recorded.
    """
    algorithm = role_algorithm(role)
    try:
        check_message(msg, algorithm)
        if msg.receiver != role.node_id and not (msg.kind == "join_request" and msg.receiver == ANY_CLIENT):
            raise ProtocolError(f"{msg.kind} for {msg.receiver} reached {role.node_id}")
        reply = role.handle(msg)
    except ProtocolError as e:
        reason = str(e)
        logger.warning("refused %s from %s: %s", show(msg.kind), show(msg.sender), reason)
        if log is not None:
            log.append(msg, rejected=reason)
        # Addressed from the role itself; a message whose sender is no node id (it failed check_message) gets an
        # error no transport will carry, since each checks what it sends.
        return error_reply(msg, reason, sender=role.node_id)
    if reply is None:
        return None
    try:
        check_message(reply, algorithm)
    except ProtocolError as e:
        reason = f"{role.node_id} could not answer {msg.kind}: its reply was refused before sending ({e})"
        logger.error("%s", reason)
        if log is not None:
            log.append(reply, rejected=str(e))
        return error_reply(msg, reason, sender=role.node_id)
    return reply


class Transport(ABC):
    """Delivers requests and returns the receivers' replies.

    Subclasses implement ``exchange`` (a batch of requests, answered in any order; a network transport sends them
    concurrently) and may override ``request`` (one request, failures raised).

    Args:
        log (`MessageLog`): where every message is recorded.
        algorithm (`str`, defaults to ``"collafuse"``): the run's ``split.algorithm``: which kinds may cross.
    """

    def __init__(self, log: MessageLog, algorithm: str = "collafuse"):
        self.log = log
        self.algorithm = algorithm

    @abstractmethod
    def exchange(self, msgs: list[Message]) -> list[Delivery]: ...

    def exchange_while(self, msgs: list[Message], work: Callable[[], T]) -> tuple[list[Delivery], T]:
        """``exchange(msgs)`` and ``work()``, whose result does not depend on the replies (the server's own training
        steps while the clients take theirs). Here one after the other, as the in-process loop always ran them; a
        transport whose receivers run in other processes does ``work`` while they answer."""
        deliveries = self.exchange(msgs)
        return deliveries, work()

    def request(self, msg: Message) -> Message | None:
        """One request; raises ``NodeUnavailable`` or ``ProtocolError`` where ``exchange`` would report an error."""
        d = self.exchange([msg])[0]
        if d.error is not None:
            raise (NodeUnavailable if d.reply is None and d.error.startswith("unavailable") else ProtocolError)(
                d.error)
        return d.reply


class InProcessTransport(Transport):
    """Both roles live in this process. Arrays are copied on delivery, as a network would, so no role ever holds a
    reference to another role's tensors.

    Args:
        roles (`list[Role]`): the server and the clients, addressed by their ``node_id``.
        log (`MessageLog`): where every message is recorded.
        algorithm (`str`, defaults to ``"collafuse"``): the run's ``split.algorithm``.
    """

    def __init__(self, roles: list[Role], log: MessageLog, algorithm: str = "collafuse"):
        super().__init__(log, algorithm)
        self.roles = {r.node_id: r for r in roles}

    def _deliver(self, msg: Message) -> Message:
        check_message(msg, self.algorithm)
        self.log.append(msg)
        return Message(msg.kind, msg.sender, msg.receiver,
                       {k: a.detach().clone() for k, a in msg.arrays.items()}, dict(msg.meta))

    def _roundtrip(self, msg: Message) -> Message | None:
        reply = handle_checked(self.roles[msg.receiver], self._deliver(msg), self.log)
        return None if reply is None else self._deliver(reply)

    def exchange(self, msgs: list[Message]) -> list[Delivery]:
        out = []
        for msg in msgs:
            t0 = time.perf_counter()
            if msg.receiver not in self.roles:
                out.append(Delivery(msg, error=f"unavailable: {msg.receiver} is not connected"))
                continue
            reply = self._roundtrip(msg)
            d = Delivery(msg, reply, seconds=time.perf_counter() - t0)
            if reply is not None and reply.kind == "error":
                d.reply, d.error = None, f"{reply.sender} refused {msg.kind}: {reply.meta['reason']}"
            out.append(d)
        return out
