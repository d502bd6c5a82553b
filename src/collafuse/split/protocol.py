"""What crosses between a client and the server: the message kinds, their arrays, and the checks on them.

The table below is the privacy contract of shared/design/split-protocol.md. Every transport checks every message
against it, so x0, epsilon, client weights or gradients cannot leave a node by accident.

| kind            | direction        | arrays                              | meta (``?``: optional) |
|-----------------|------------------|-------------------------------------|------------------------|
| upload_request  | server -> client | -                                   | round                  |
| upload          | client -> server | x_cut float32 [B,C,H,W], y int64 [B]| round, cut             |
| train_request   | server -> client | -                                   | round, steps           |
| train_reply     | client -> server | -                                   | round, steps, loss?    |
| sample_request  | client -> server | y int64 [n]                         | -                      |
| sample_response | server -> client | x_cut float32 [n,C,H,W]             | cut                    |
| sample_order    | server -> client | -                                   | n                      |
| sample_done     | client -> server | -                                   | n                      |
| error           | either           | -                                   | reason                 |
| join_request    | server -> client | -                                   | -                      |
| join            | client -> server | -                                   | -                      |
| model_push      | server -> client | weights float32 [P]                 | round, steps           |
| model_update    | client -> server | weights float32 [P]                 | round, steps, examples, loss? |

Which kinds may cross depends on ``split.algorithm`` (``KINDS``): under ``collafuse`` weights never cross (the
last two rows are refused); under ``fedavg`` (the federated-averaging baseline) only weights cross: the server
pushes the global model (``model_push``; ``steps = 0`` hands over the final average, answered by a
``train_reply``), each client trains K steps and returns its weights and its number of training images
(``model_update``), and no upload or hand-off is allowed: the server may only order samples (``sample_order``, a
count), which the client makes with the whole chain itself and answers with a count (``sample_done``), as at
cut = T. ``error`` and ``join`` are common.

Meta values are typed and bounded (``bool`` is never a number, and no other key is allowed):

| key    | type                      | allowed                                                             |
|--------|---------------------------|---------------------------------------------------------------------|
| round  | int                       | [1, 10**9]                                                          |
| steps  | int                       | [0, 10**7]                                                          |
| loss   | float (an int is refused) | finite, >= 0 (a mean squared error); omitted when nothing trained   |
| n      | int                       | [1, 10**6]                                                          |
| reason | str                       | at most 1024 bytes of UTF-8                                         |
| examples | int                     | [1, 10**9] (a client's training images: FedAvg's weight)           |
| cut    | int                       | [0, 10**9]: t_zeta of the uploading client (its view's noise step);  |
|        |                           | its server accepts [split.min_cut, split.max_cut], one cut a client  |
|        |                           | per run; in a sample_response, the step the hand-off is at, which    |
|        |                           | the client refuses unless it is its own cut                          |

Arrays are float32 / int64 on the wire in little-endian byte order (the Flower codec checks the bytes, not only
the declared dtype). Node ids are ``server``, ``client<N>`` (N decimal, no leading zeros, at most 9 digits) and,
only as the receiver of a ``join_request``, ``client*``.

In process a client asks for hand-offs itself (``sample_request``). Over Flower only the server can start an
exchange, so it first sends ``sample_order`` (n images); the client answers with its ``sample_request``, the server
sends the ``sample_response``, and the client finishes locally and answers ``sample_done``: the final images never
leave the client. ``error`` is the reply to a message that was refused; it names why and carries no data.
``join_request`` / ``join`` let a networked server learn which client a newly connected node is (the reply's
sender); the receiver of a ``join_request`` is ``client*``, since the server does not know it yet.

``check_message`` checks what any transport can check (kinds, directions, node ids, array names, dtypes, ranks,
finiteness, meta keys, types and bounds). ``check_content`` checks what needs the run's configuration (image shape,
label range, batch limits); the receiving role calls it, because the receiver is the one whose rules apply.
Every refusal is a ``ProtocolError`` with one line naming what was refused, its (shortened) value and what is
allowed; values from the message appear only through ``show``, so a reason is short ASCII whatever was sent.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

SERVER = "server"
ANY_CLIENT = "client*"  # receiver of a join_request

# client<N>: the form client_node writes. Bounded, so int() of it is cheap (Python refuses ints over 4300 digits).
_CLIENT_ID = re.compile(r"client(0|[1-9][0-9]{0,8})")
MAX_REASON_BYTES = 1024


def client_node(index: int) -> str:
    return f"client{index}"


def is_client_id(node: object) -> bool:
    """Whether ``node`` is a client's node id, ``client<N>`` (not ``client*``)."""
    return isinstance(node, str) and _CLIENT_ID.fullmatch(node) is not None


def client_index(node: str) -> int:
    if not is_client_id(node):
        raise ProtocolError(f"node id {show(node)} is not a client id (allowed: client<N>, N < 10**9)")
    return int(node[6:])


class ProtocolError(ValueError):
    """A message that the protocol does not allow; it is rejected before it crosses."""


def show(value: object, limit: int = 60) -> str:
    """A short ASCII rendering of an untrusted value for an error message: never long, never raising (an int of
    more than 4300 digits cannot even be printed), never a newline."""
    if isinstance(value, bool) or value is None or isinstance(value, float):
        text = repr(value)
    elif isinstance(value, int):
        text = repr(value) if abs(value) < 10**30 else f"<int of {value.bit_length()} bits>"
    elif isinstance(value, (str, bytes)):
        text = ascii(value[: limit + 1])
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        text = f"<{type(value).__name__} of {len(value)}>"
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_reason(text: str) -> str:
    """``text`` cut to ``MAX_REASON_BYTES`` bytes of UTF-8 without splitting a character (what ``error`` allows);
    characters UTF-8 cannot encode (lone surrogates) become ``?``."""
    data = str(text).encode("utf-8", errors="replace")
    if len(data) <= MAX_REASON_BYTES:
        return data.decode("utf-8")
    return data[: MAX_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


@dataclass(frozen=True)
class MetaRule:
    """What one meta key may hold.

    Args:
        type (`type`): ``int``, ``float`` or ``str``; the value's exact kind (``bool`` is not an int, an int is
            not a float: Flower's ConfigRecord keeps the distinction, and our encoder always sends the right one).
        low (`float`, *optional*): smallest allowed number.
        high (`float`, *optional*): largest allowed number.
        required (`bool`, defaults to True): a message of the kind must carry the key.
        max_bytes (`int`, *optional*): most bytes of a string's UTF-8 encoding.
    """

    type: type
    low: float | None = None
    high: float | None = None
    required: bool = True
    max_bytes: int | None = None

    def allowed(self) -> str:
        if self.type is str:
            return f"a string of at most {self.max_bytes} bytes of UTF-8"
        what = "an integer" if self.type is int else "a finite float"
        if self.low is not None and self.high is not None:
            return f"{what} in [{self.low}, {self.high}]"
        return what + (f" >= {self.low}" if self.low is not None else "")

    def check(self, kind: str, key: str, value: object) -> None:
        """Raise ``ProtocolError`` unless ``value`` is what this rule allows."""
        if self.type is str:
            ok = isinstance(value, str)
            if ok:
                try:
                    ok = len(value.encode("utf-8")) <= self.max_bytes
                except UnicodeEncodeError:  # a lone surrogate: not text that can cross
                    ok = False
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high
        else:
            ok = (isinstance(value, float) and math.isfinite(value) and (self.low is None or value >= self.low)
                  and (self.high is None or value <= self.high))
        if not ok:
            raise ProtocolError(f"{kind} meta {key} = {show(value)} is not allowed (allowed: {self.allowed()})")


ROUND = MetaRule(int, 1, 10**9)
STEPS = MetaRule(int, 0, 10**7)
LOSS = MetaRule(float, 0.0, required=False)  # a client that owns no step (cut = 0) or took none omits it
COUNT = MetaRule(int, 1, 10**6)
EXAMPLES = MetaRule(int, 1, 10**9)
CUT = MetaRule(int, 0, 10**9)  # the receiving server checks it against its own range (Server.check_cut)
REASON = MetaRule(str, max_bytes=MAX_REASON_BYTES)


@dataclass(frozen=True)
class MessageSpec:
    """One row of the table.

    Args:
        direction (`str`): ``"c2s"``, ``"s2c"`` or ``"any"``.
        arrays (`dict[str, tuple[torch.dtype, int]]`): name -> (dtype, ndim); exactly these arrays.
        rules (`dict[str, MetaRule]`): the meta keys allowed, with their types and bounds.
    """

    direction: str
    arrays: dict[str, tuple[torch.dtype, int]]
    rules: dict[str, MetaRule] = field(default_factory=dict)

    @property
    def meta(self) -> frozenset[str]:
        """The meta keys allowed."""
        return frozenset(self.rules)

    @property
    def required(self) -> frozenset[str]:
        return frozenset(k for k, r in self.rules.items() if r.required)


SPECS: dict[str, MessageSpec] = {
    "upload_request": MessageSpec("s2c", {}, {"round": ROUND}),
    "upload": MessageSpec("c2s", {"x_cut": (torch.float32, 4), "y": (torch.int64, 1)}, {"round": ROUND, "cut": CUT}),
    "train_request": MessageSpec("s2c", {}, {"round": ROUND, "steps": STEPS}),
    "train_reply": MessageSpec("c2s", {}, {"round": ROUND, "steps": STEPS, "loss": LOSS}),
    "sample_request": MessageSpec("c2s", {"y": (torch.int64, 1)}),
    "sample_response": MessageSpec("s2c", {"x_cut": (torch.float32, 4)}, {"cut": CUT}),
    "sample_order": MessageSpec("s2c", {}, {"n": COUNT}),
    "sample_done": MessageSpec("c2s", {}, {"n": COUNT}),
    "error": MessageSpec("any", {}, {"reason": REASON}),
    "join_request": MessageSpec("s2c", {}),
    "join": MessageSpec("c2s", {}),
    "model_push": MessageSpec("s2c", {"weights": (torch.float32, 1)}, {"round": ROUND, "steps": STEPS}),
    "model_update": MessageSpec("c2s", {"weights": (torch.float32, 1)},
                                {"round": ROUND, "steps": STEPS, "examples": EXAMPLES, "loss": LOSS}),
}

_COMMON = ("error", "join_request", "join")
# What may cross under each split.algorithm: weights only under fedavg, and nothing but weights there.
KINDS: dict[str, frozenset[str]] = {
    "collafuse": frozenset(k for k in SPECS if not k.startswith("model_")),
    "fedavg": frozenset(("model_push", "model_update", "train_reply", "sample_order", "sample_done", *_COMMON)),
}


@dataclass
class Message:
    kind: str
    sender: str
    receiver: str
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, int | float | str | bool] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in self.arrays.values() if isinstance(a, torch.Tensor))

    def summary(self) -> dict:
        """One line of the message log: everything about the message except the array contents. A refused
        message is logged too, so anything that is not a plain bounded value is written as ``show`` renders it."""
        return {
            "kind": _loggable(self.kind),
            "sender": _loggable(self.sender),
            "receiver": _loggable(self.receiver),
            "arrays": [
                {"name": _loggable(k), "shape": list(a.shape), "dtype": str(a.dtype).removeprefix("torch."),
                 "bytes": a.numel() * a.element_size()}
                for k, a in _items(self.arrays) if isinstance(a, torch.Tensor)
            ],
            "bytes": self.nbytes(),
            "meta": {_loggable(k): _loggable(v) for k, v in _items(self.meta)},
        }


def _items(d: object) -> list:
    return list(d.items()) if isinstance(d, dict) else []


def _loggable(v: object) -> object:
    """``v`` as JSON writes it plainly (a bool, an int64, a finite float, a string of at most MAX_REASON_BYTES
    characters), else its ``show`` rendering: a refused message may hold anything."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and abs(v) < 2**63:
        return int(v)
    if isinstance(v, float) and math.isfinite(v):
        return float(v)
    if isinstance(v, str) and len(v) <= MAX_REASON_BYTES:
        return str(v)
    return show(v)


def _names(names) -> str:
    """Untrusted dict keys for an error message: at most 8 of them, each shortened."""
    shown = sorted(show(k, 30) for k in list(names)[:8])
    return "[" + ", ".join(shown) + (", ..." if len(names) > 8 else "") + "]"


def check_message(msg: Message, algorithm: str = "collafuse") -> None:
    """Raise ``ProtocolError`` unless ``msg`` is an allowed kind, direction, set of arrays and meta.

    Any object is checked without raising anything else, so a receiver can call it on what it decoded.

    Args:
        msg (`Message`): the message, from any source.
        algorithm (`str`, defaults to ``"collafuse"``): the run's ``split.algorithm``; the kinds it allows
            (``KINDS``) are the only ones that pass.
    """
    kind = msg.kind
    allowed = KINDS.get(algorithm)
    if allowed is None:
        raise ProtocolError(f"algorithm {show(algorithm)} is not allowed (allowed: {', '.join(KINDS)})")
    spec = SPECS.get(kind) if isinstance(kind, str) and kind in allowed else None
    if spec is None:
        raise ProtocolError(f"message kind {show(kind)} is not allowed under {algorithm} (allowed: "
                            f"{', '.join(k for k in SPECS if k in allowed)})")
    sender, receiver = msg.sender, msg.receiver
    c2s = receiver == SERVER and is_client_id(sender)
    s2c = sender == SERVER and (is_client_id(receiver) or (kind == "join_request" and receiver == ANY_CLIENT))
    if not ((spec.direction in ("c2s", "any") and c2s) or (spec.direction in ("s2c", "any") and s2c)):
        raise ProtocolError(f"{kind} from {show(sender)} to {show(receiver)} is not allowed ({spec.direction}; "
                            f"node ids: server, client<N>)")
    if not isinstance(msg.arrays, dict) or not isinstance(msg.meta, dict):
        raise ProtocolError(f"{kind} arrays and meta must be dicts (got {show(msg.arrays)}, {show(msg.meta)})")
    if set(msg.arrays) != set(spec.arrays):
        raise ProtocolError(f"{kind} carries arrays {_names(msg.arrays)} (allowed: exactly {sorted(spec.arrays)})")
    for name, (dtype, ndim) in spec.arrays.items():
        a = msg.arrays[name]
        if (not isinstance(a, torch.Tensor) or a.dtype != dtype or a.ndim != ndim or a.layout != torch.strided
                or a.is_meta):  # sparse or meta tensors hold no plain values to check
            got = f"{a.dtype} {a.ndim}-d" if isinstance(a, torch.Tensor) else type(a).__name__
            if isinstance(a, torch.Tensor) and (a.layout != torch.strided or a.is_meta):
                got += f" {a.layout} on {a.device}"
            raise ProtocolError(f"{kind}.{name} is {got} (allowed: {dtype} {ndim}-d, dense)")
        if a.is_floating_point() and not bool(torch.isfinite(a).all()):
            raise ProtocolError(f"{kind}.{name} holds NaN or Inf values")
    lengths = {a.shape[0] for a in msg.arrays.values()}
    if len(lengths) > 1:
        raise ProtocolError(f"{kind} arrays disagree on batch size: {sorted(lengths)}")
    extra = [k for k in msg.meta if k not in spec.rules]  # also catches non-string keys, which match no rule
    if extra:
        raise ProtocolError(f"{kind} meta keys {_names(extra)} are not allowed (allowed: {sorted(spec.meta)})")
    for key, value in msg.meta.items():
        spec.rules[key].check(kind, key, value)
    missing = spec.required - set(msg.meta)
    if missing:
        raise ProtocolError(f"{kind} lacks meta {', '.join(sorted(missing))} (required: "
                            f"{', '.join(f'{k} = {spec.rules[k].allowed()}' for k in sorted(spec.required))})")


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
