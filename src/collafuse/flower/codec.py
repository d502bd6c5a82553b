"""A protocol ``Message`` <-> Flower ``RecordDict``: what actually crosses the network.

Every Flower message of a CollaFuse run has ``message_type = "query.collafuse"`` and a content of two records:

- ``"envelope"`` (ConfigRecord): ``kind``, ``sender``, ``receiver`` and the message's meta as ``meta.<key>``;
- ``"arrays"`` (ArrayRecord): the message's named arrays (float32 / int64 tensors, serialised by Flower as
  ``.npy`` bytes: ``Array(dtype, shape, stype="numpy.ndarray", data)``).

Decoding is for untrusted input: anything that is not exactly this shape raises ``ProtocolError`` (which the
receiver turns into an ``error`` reply), never another exception. An array is read only as far as the protocol
allows for its name and the message's kind (``protocol.SPECS``): the ``.npy`` header is parsed here, without
pickle and without trusting the declared fields, and must agree with them (dtype, byte order, C order, shape,
byte length) before a byte is copied. The protocol checks on the whole message (``check_message``,
``check_content``) stay with the receiving role.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..split.protocol import SPECS, Message, ProtocolError, show

MESSAGE_TYPE = "query.collafuse"
_ENVELOPE = ("kind", "sender", "receiver")
_NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY: Array's data is np.save output
# What each protocol dtype is on the wire: the declared name (str(ndarray.dtype)) and the exact .npy dtype.
_WIRE = {torch.float32: ("float32", np.dtype("<f4")), torch.int64: ("int64", np.dtype("<i8"))}
# Flower's gRPC messages are at most 2 GiB - 1 (flwr.supercore.grpc.GRPC_MAX_MESSAGE_LENGTH): no array of a real
# deployment is larger, so a declared shape beyond it is refused before anything is allocated or parsed.
MAX_ARRAY_BYTES = 2**31 - 1
_MAX_HEADER_BYTES = 10_000  # numpy's own cap on a .npy header (np.lib.format._MAX_HEADER_SIZE)


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
        keys = set(content.keys())
    except (KeyError, AttributeError, TypeError):
        raise ProtocolError("malformed Flower message: expected the records 'envelope' and 'arrays'") from None
    if extra := keys - {"envelope", "arrays"}:
        raise ProtocolError(f"malformed Flower message: unexpected records {sorted(show(k, 30) for k in extra)[:8]}")
    head = {k: envelope.get(k) for k in _ENVELOPE}
    if not all(isinstance(v, str) and v for v in head.values()):
        raise ProtocolError(f"malformed Flower message: envelope needs string fields {list(_ENVELOPE)}")
    kind = head["kind"]
    spec = SPECS.get(kind)
    if spec is None:  # before any array is read: an unknown kind may carry none
        raise ProtocolError(f"message kind {show(kind)} is not allowed (allowed: {', '.join(SPECS)})")
    meta = {}
    for k, v in envelope.items():
        if k in _ENVELOPE:
            continue
        if not k.startswith("meta."):
            raise ProtocolError(f"malformed Flower message: envelope field {show(k)} is not allowed "
                                f"(allowed: {', '.join(_ENVELOPE)}, meta.<key>)")
        meta[k[5:]] = v
    arrays = {}
    for name, arr in record.items():
        if name not in spec.arrays:
            raise ProtocolError(f"{kind} carries an array {show(name)} (allowed: {sorted(spec.arrays) or 'none'})")
        arrays[name] = decode_array(kind, name, arr, *spec.arrays[name])
    return Message(kind, head["sender"], head["receiver"], arrays, meta)


def decode_array(kind: str, name: str, arr: Array, dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """The tensor in a Flower ``Array`` that must be ``dtype`` with ``ndim`` dimensions; ``ProtocolError`` unless
    its declared fields and its ``.npy`` bytes agree with each other and with that.

    Args:
        kind (`str`): the message kind (for the error).
        name (`str`): the array's name in the message.
        arr (`Array`): Flower's array: ``dtype``, ``shape``, ``stype`` and ``data`` as received.
        dtype (`torch.dtype`): what the protocol allows for this array (float32 or int64).
        ndim (`int`): the rank the protocol allows.
    """
    where = f"{kind}.{name}"
    want_name, want = _WIRE[dtype]
    declared_dtype, shape, stype, data = (getattr(arr, f, None) for f in ("dtype", "shape", "stype", "data"))
    if stype != _NUMPY_STYPE:
        raise ProtocolError(f"{where} is serialised as {show(stype)} (allowed: {_NUMPY_STYPE!r})")
    if declared_dtype != want_name:
        raise ProtocolError(f"{where} is declared {show(declared_dtype)} (allowed: {want_name})")
    if (not isinstance(shape, (tuple, list)) or len(shape) != ndim
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ProtocolError(f"{where} has declared shape {_show_shape(shape)} "
                            f"(allowed: {ndim} non-negative integers)")
    shape = tuple(shape)
    count = math.prod(shape)
    # Every dimension too, not only the product: [0, 10**30, 1, 1] holds nothing but no array can have that shape.
    if count * want.itemsize > MAX_ARRAY_BYTES or max(shape) * want.itemsize > MAX_ARRAY_BYTES:
        raise ProtocolError(f"{where} declares shape {_show_shape(shape)} (allowed: at most "
                            f"{MAX_ARRAY_BYTES // want.itemsize} {want_name} elements in all and in any dimension)")
    if not isinstance(data, bytes):
        raise ProtocolError(f"{where} data is {type(data).__name__} (allowed: bytes)")
    if len(data) > count * want.itemsize + _MAX_HEADER_BYTES + 16:
        raise ProtocolError(f"{where} holds {len(data)} bytes for {count} {want_name} (allowed: the .npy header "
                            f"and {count * want.itemsize} bytes)")
    header_shape, fortran, held, offset = _npy_header(where, data)
    if held != want:
        held_name = held.str if held.fields is None and held.subdtype is None else str(held)  # '>f4', not 'float32'
        raise ProtocolError(f"{where}: its .npy bytes hold dtype {show(held_name, 80)} (declared {want_name}; "
                            f"allowed: {want_name} little-endian {want.str!r})")
    if fortran:
        raise ProtocolError(f"{where}: its .npy bytes are in Fortran order (allowed: C order)")
    if header_shape != shape:
        raise ProtocolError(f"{where}: its .npy bytes hold shape {_show_shape(header_shape)} "
                            f"(declared {_show_shape(shape)}; allowed: the same)")
    if len(data) != offset + count * want.itemsize:
        raise ProtocolError(f"{where} holds {len(data) - offset} bytes after its .npy header "
                            f"(allowed: exactly {count * want.itemsize} for {_show_shape(shape)} {want_name})")
    values = np.frombuffer(data, dtype=want, count=count, offset=offset) if count else np.empty(0, dtype=want)
    return torch.from_numpy(values.reshape(shape).copy())  # a copy: writable, owned, not the network buffer


def _npy_header(where: str, data: bytes) -> tuple[tuple, bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) from a ``.npy`` header, parsed by numpy's header reader (a
    literal dict, never pickle) on at most ``_MAX_HEADER_BYTES``; ``ProtocolError`` if it is not one."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_HEADER_BYTES)
        else:
            raise ProtocolError(f"{where}: .npy format version {version} (allowed: 1.0, 2.0)")
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - bytes from the network: any failure to parse is a malformed message
        raise ProtocolError(f"{where}: its bytes are not a .npy array ({type(e).__name__}; allowed: np.save "
                            f"output, format 1.0 or 2.0)") from None
    if not (isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) and isinstance(dtype, np.dtype)):
        raise ProtocolError(f"{where}: its .npy header is malformed")
    return shape, bool(fortran), dtype, fp.tell()


def _show_shape(shape: object) -> str:
    if isinstance(shape, (tuple, list)) and len(shape) <= 8 and all(isinstance(d, int) for d in shape):
        return "[" + ", ".join(show(d, 24) for d in shape) + "]"
    return show(shape)
