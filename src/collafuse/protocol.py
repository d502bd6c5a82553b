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
| sample_order    | server -> client | -                                   | n                   |
| sample_done     | client -> server | -                                   | n                   |
| error           | either           | -                                   | reason              |
| join_request    | server -> client | -                                   | -                   |
| join            | client -> server | -                                   | -                   |

In process a client asks for hand-offs itself (``sample_request``). Over Flower only the server can start an
exchange, so it first sends ``sample_order`` (n images); the client answers with its ``sample_request``, the server
sends the ``sample_response``, and the client finishes locally and answers ``sample_done``: the final images never
leave the client. ``error`` is the reply to a message that was refused; it names why and carries no data.
``join_request`` / ``join`` let a networked server learn which client a newly connected node is (the reply's
sender); the receiver of a ``join_request`` is ``client*``, since the server does not know it yet.

``check_message`` checks what any transport can check (kinds, directions, array names, dtypes, ranks, finiteness,
meta). ``check_content`` checks what needs the run's configuration (image shape, label range, batch limits); the
receiving role calls it, because the receiver is the one whose rules apply.
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
    direction: str  # "c2s", "s2c" or "any"
    arrays: dict[str, tuple[torch.dtype, int]]  # name -> (dtype, ndim)
    meta: frozenset[str]


SPECS: dict[str, MessageSpec] = {
    "upload_request": MessageSpec("s2c", {}, frozenset({"round"})),
    "upload": MessageSpec("c2s", {"x_cut": (torch.float32, 4), "y": (torch.int64, 1)}, frozenset({"round"})),
    "train_request": MessageSpec("s2c", {}, frozenset({"round", "steps"})),
    "train_reply": MessageSpec("c2s", {}, frozenset({"round", "steps", "loss"})),
    "sample_request": MessageSpec("c2s", {"y": (torch.int64, 1)}, frozenset()),
    "sample_response": MessageSpec("s2c", {"x_cut": (torch.float32, 4)}, frozenset()),
    "sample_order": MessageSpec("s2c", {}, frozenset({"n"})),
    "sample_done": MessageSpec("c2s", {}, frozenset({"n"})),
    "error": MessageSpec("any", {}, frozenset({"reason"})),
    "join_request": MessageSpec("s2c", {}, frozenset()),
    "join": MessageSpec("c2s", {}, frozenset()),
}

ANY_CLIENT = "client*"  # receiver of a join_request


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
    if not ((spec.direction in ("c2s", "any") and c2s) or (spec.direction in ("s2c", "any") and s2c)):
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


@dataclass(frozen=True)
class ContentLimits:
    """What a well-formed message of this run looks like beyond its dtypes: the receiver's rules.

    Args:
        image_shape (`tuple[int, int, int]`): (C, H, W) of every image array.
        num_classes (`int`): labels must lie in [0, num_classes).
        max_upload (`int`): most images one upload may carry (guards the server's memory).
        max_sample_batch (`int`): most images one sampling request may ask for (``sample.batch_size``).
    """

    image_shape: tuple[int, int, int]
    num_classes: int
    max_upload: int
    max_sample_batch: int

    @classmethod
    def from_config(cls, cfg) -> ContentLimits:
        return cls(tuple(cfg.image_shape), cfg.num_classes, cfg.split.max_upload_images, cfg.sample.batch_size)


def check_content(msg: Message, limits: ContentLimits) -> None:
    """Raise ``ProtocolError`` if a message's arrays do not fit this run: wrong image shape, a label out of range,
    an empty or oversized batch. Call after ``check_message``."""
    x = msg.arrays.get("x_cut")
    if x is not None and tuple(x.shape[1:]) != tuple(limits.image_shape):
        raise ProtocolError(f"{msg.kind}.x_cut has image shape {list(x.shape[1:])} "
                            f"(allowed: {list(limits.image_shape)})")
    y = msg.arrays.get("y")
    if y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= limits.num_classes):
        raise ProtocolError(f"{msg.kind}.y holds labels in [{int(y.min())}, {int(y.max())}] "
                            f"(allowed: [0, {limits.num_classes - 1}])")
    n = next(iter(msg.arrays.values())).shape[0] if msg.arrays else int(msg.meta.get("n", 1))
    cap = {"upload": limits.max_upload, "sample_request": limits.max_sample_batch,
           "sample_response": limits.max_sample_batch, "sample_order": limits.max_sample_batch}.get(msg.kind)
    if cap is not None and not 1 <= n <= cap:
        raise ProtocolError(f"{msg.kind} carries {n} images (allowed: 1 to {cap})")
