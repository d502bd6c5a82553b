"""What crosses between a client and the server: the message kinds, their arrays, and the checks on them.

The table below is the privacy contract of shared/design/split-protocol.md. Every transport checks every message
against it, so x0, epsilon, client weights or gradients cannot leave a node by accident.

| kind            | direction        | arrays                              | meta                |
|-----------------|------------------|-------------------------------------|---------------------|
| upload_request  | server -> client | -                                   | round               |
| upload          | client -> server | x_cut float32 [B,C,H,W], y int64 [B]| round               |
| train_request   | server -> client | -                                   | round, steps        |
| train_reply     | client -> server | -                                   | round, steps, loss  |
| sample_request  | client -> server | y int64 [n]                         | -                   |
| sample_response | server -> client | x_cut float32 [n,C,H,W]             | -                   |
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SERVER = "server"


def client_node(index: int) -> str:
    return f"client{index}"


def client_index(node: str) -> int:
    if not node.startswith("client") or not node[6:].isdigit():
        raise ProtocolError(f"node id {node!r} is not a client id (expected client<N>)")
    return int(node[6:])


class ProtocolError(ValueError):
    """A message that the protocol does not allow; it is rejected before it crosses."""


@dataclass(frozen=True)
class MessageSpec:
    direction: str  # "c2s" or "s2c"
    arrays: dict[str, tuple[torch.dtype, int]]  # name -> (dtype, ndim)
    meta: frozenset[str]


SPECS: dict[str, MessageSpec] = {
    "upload_request": MessageSpec("s2c", {}, frozenset({"round"})),
    "upload": MessageSpec("c2s", {"x_cut": (torch.float32, 4), "y": (torch.int64, 1)}, frozenset({"round"})),
    "train_request": MessageSpec("s2c", {}, frozenset({"round", "steps"})),
    "train_reply": MessageSpec("c2s", {}, frozenset({"round", "steps", "loss"})),
    "sample_request": MessageSpec("c2s", {"y": (torch.int64, 1)}, frozenset()),
    "sample_response": MessageSpec("s2c", {"x_cut": (torch.float32, 4)}, frozenset()),
}


@dataclass
class Message:
    kind: str
    sender: str
    receiver: str
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, int | float | str | bool] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values())

    def summary(self) -> dict:
        """One line of the message log: everything about the message except the array contents."""
        return {
            "kind": self.kind,
            "sender": self.sender,
            "receiver": self.receiver,
            "arrays": [
                {"name": k, "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch."),
                 "bytes": a.numel() * a.element_size()}
                for k, a in self.arrays.items()
            ],
            "bytes": self.nbytes(),
            "meta": dict(self.meta),
        }


def check_message(msg: Message) -> None:
    """Raise ``ProtocolError`` unless ``msg`` is an allowed kind, direction, set of arrays and meta."""
    spec = SPECS.get(msg.kind)
    if spec is None:
        raise ProtocolError(f"message kind {msg.kind!r} is not allowed (allowed: {', '.join(SPECS)})")
    c2s = msg.receiver == SERVER and msg.sender.startswith("client")
    s2c = msg.sender == SERVER and msg.receiver.startswith("client")
    if not ((spec.direction == "c2s" and c2s) or (spec.direction == "s2c" and s2c)):
        raise ProtocolError(f"{msg.kind} from {msg.sender} to {msg.receiver} is not allowed ({spec.direction})")
    if set(msg.arrays) != set(spec.arrays):
        raise ProtocolError(f"{msg.kind} carries arrays {sorted(msg.arrays)} (allowed: exactly {sorted(spec.arrays)})")
    for name, (dtype, ndim) in spec.arrays.items():
        a = msg.arrays[name]
        if not isinstance(a, torch.Tensor) or a.dtype != dtype or a.ndim != ndim:
            got = f"{a.dtype} {a.ndim}-d" if isinstance(a, torch.Tensor) else type(a).__name__
            raise ProtocolError(f"{msg.kind}.{name} is {got} (allowed: {dtype} {ndim}-d)")
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise ProtocolError(f"{msg.kind}.{name} holds NaN or Inf values")
    lengths = {a.shape[0] for a in msg.arrays.values()}
    if len(lengths) > 1:
        raise ProtocolError(f"{msg.kind} arrays disagree on batch size: {sorted(lengths)}")
    extra = set(msg.meta) - spec.meta
    if extra:
        raise ProtocolError(f"{msg.kind} meta keys {sorted(extra)} are not allowed (allowed: {sorted(spec.meta)})")
    for k, v in msg.meta.items():
        if not isinstance(v, (int, float, str, bool)) or (isinstance(v, float) and not math.isfinite(v)):
            raise ProtocolError(f"{msg.kind} meta {k} = {v!r} is not allowed (finite scalars only)")
