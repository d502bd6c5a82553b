"""A protocol ``Message`` <-> Flower ``RecordDict``: what actually crosses the network.

Every Flower message of a CollaFuse run has ``message_type = "query.collafuse"`` and a content of two records:

- ``"envelope"`` (ConfigRecord): ``kind``, ``sender``, ``receiver`` and the message's meta as ``meta.<key>``;
- ``"arrays"`` (ArrayRecord): the message's named arrays (float32 / int64 tensors, serialised by Flower).

Decoding is for untrusted input: anything that is not exactly this shape raises ``ProtocolError`` (which the
receiver turns into an ``error`` reply), never another exception. The protocol checks themselves
(``check_message``, ``check_content``) stay with the receiving role.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..protocol import Message, ProtocolError

MESSAGE_TYPE = "query.collafuse"
_ENVELOPE = ("kind", "sender", "receiver")
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def encode(msg: Message) -> RecordDict:
    envelope = {"kind": msg.kind, "sender": msg.sender, "receiver": msg.receiver}
    envelope.update({f"meta.{k}": v for k, v in msg.meta.items()})
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(a.detach().cpu().numpy())) for k, a in msg.arrays.items()})
    return RecordDict({"envelope": ConfigRecord(envelope), "arrays": arrays})


def decode(content: RecordDict) -> Message:
    """The protocol message in a Flower content; ``ProtocolError`` for anything malformed."""
    try:
        envelope = content.config_records["envelope"]
        record = content.array_records["arrays"]
    except (KeyError, AttributeError, TypeError):
        raise ProtocolError("malformed Flower message: expected the records 'envelope' and 'arrays'") from None
    if extra := set(content.keys()) - {"envelope", "arrays"}:
        raise ProtocolError(f"malformed Flower message: unexpected records {sorted(extra)}")
    head = {k: envelope.get(k) for k in _ENVELOPE}
    if not all(isinstance(v, str) and v for v in head.values()):
        raise ProtocolError(f"malformed Flower message: envelope needs string fields {list(_ENVELOPE)}")
    meta = {}
    for k, v in envelope.items():
        if k in _ENVELOPE:
            continue
        if not k.startswith("meta."):
            raise ProtocolError(f"malformed Flower message: envelope field {k!r} is not allowed")
        meta[k[5:]] = v
    arrays = {}
    for name, arr in record.items():
        if arr.dtype not in _DTYPES:
            raise ProtocolError(f"{head['kind']}.{name} is {arr.dtype} (allowed: {', '.join(_DTYPES)})")
        try:
            a = arr.numpy()
        except Exception as e:  # noqa: BLE001 - bytes from the network: any failure to parse is a malformed message
            raise ProtocolError(f"{head['kind']}.{name} cannot be decoded: {type(e).__name__}") from None
        arrays[name] = torch.from_numpy(np.array(a, copy=True))
    return Message(head["kind"], head["sender"], head["receiver"], arrays, meta)
