"""The one interface every client/server exchange goes through, the message log, and the in-process transport.

A transport delivers a request to the receiving role's ``handle`` and returns its reply. Both directions are
checked against the protocol table (``protocol.check_message``) and written to the message log, so the log is a
complete audit of what crossed. Other transports (Flower) implement ``request`` over the network.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path
from typing import Protocol

from .protocol import SERVER, Message, check_message


class Role(Protocol):
    node_id: str

    def handle(self, msg: Message) -> Message | None: ...


class MessageLog:
    """Append-only JSON-lines audit of every message: kind, sender, receiver, array names, shapes, dtypes, bytes.

    Args:
        path (`Path`, *optional*): file to append to; None keeps the log in memory only.
    """

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []
        if self.path is not None and self.path.exists():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, msg: Message) -> None:
        record = {"seq": len(self.records), "time": round(time.time(), 3), **msg.summary()}
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def summary(self) -> dict:
        """Totals by kind and direction (bytes are array payload bytes)."""
        by_kind: dict[str, dict] = defaultdict(lambda: {"messages": 0, "bytes": 0})
        per_client: dict[str, dict] = defaultdict(lambda: {"uploaded_bytes": 0, "downloaded_bytes": 0})
        for r in self.records:
            by_kind[r["kind"]]["messages"] += 1
            by_kind[r["kind"]]["bytes"] += r["bytes"]
            if r["receiver"] == SERVER:
                per_client[r["sender"]]["uploaded_bytes"] += r["bytes"]
            else:
                per_client[r["receiver"]]["downloaded_bytes"] += r["bytes"]
        return {
            "messages": len(self.records),
            "client_to_server_bytes": sum(r["bytes"] for r in self.records if r["receiver"] == SERVER),
            "server_to_client_bytes": sum(r["bytes"] for r in self.records if r["sender"] == SERVER),
            "by_kind": dict(sorted(by_kind.items())),
            "per_client": dict(sorted(per_client.items())),
        }


class Transport(ABC):
    """Delivers one request and returns the receiver's reply (or None)."""

    def __init__(self, log: MessageLog):
        self.log = log

    @abstractmethod
    def request(self, msg: Message) -> Message | None: ...


class InProcessTransport(Transport):
    """Both roles live in this process. Arrays are copied on delivery, as a network would, so no role ever holds a
    reference to another role's tensors.

    Args:
        roles (`list[Role]`): the server and the clients, addressed by their ``node_id``.
        log (`MessageLog`): where every message is recorded.
    """

    def __init__(self, roles: list[Role], log: MessageLog):
        super().__init__(log)
        self.roles = {r.node_id: r for r in roles}

    def _deliver(self, msg: Message) -> Message:
        check_message(msg)
        self.log.append(msg)
        return Message(msg.kind, msg.sender, msg.receiver,
                       {k: a.detach().clone() for k, a in msg.arrays.items()}, dict(msg.meta))

    def request(self, msg: Message) -> Message | None:
        reply = self.roles[msg.receiver].handle(self._deliver(msg))
        return None if reply is None else self._deliver(reply)
