"""Property-based fuzzing (Hypothesis) of everything a node accepts from another: the Flower codec's ``decode``,
``check_message``, ``check_content``, both roles' ``handle``, FlowerTransport's reply path and ClientNode.handle.

Invariants: only ``ProtocolError`` escapes (any other exception fails the test); a refused message leaves the
receiver's tensors bit-identical (model, EMA, Adam, RNG states, uploads, pending labels); whatever a node answers
passes ``check_message``; and the verdicts agree with the protocol table written out again here (TABLE), so an
honest message is never refused and a forbidden one never accepted.

Examples per test are set below (EXAMPLES, 4,900 in all, about 30 s on one core); ``HYPOTHESIS_PROFILE=long`` runs
20 times as many. Plain regression tests for the defects the fuzzing was written for are at the end.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("hypothesis")

import hypothesis.extra.numpy as npst  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from collafuse.flower.codec import decode, encode  # noqa: E402
from collafuse.split.protocol import (  # noqa: E402
    ANY_CLIENT,
    SERVER,
    SPECS,
    ContentLimits,
    Message,
    ProtocolError,
    check_content,
    check_message,
    client_index,
)
from collafuse.split.runner import Federation  # noqa: E402
from collafuse.split.transport import MessageLog, error_reply, handle_checked  # noqa: E402
from conftest import synthetic_clients, tiny_config  # noqa: E402

# -- profiles -----------------------------------------------------------------------------------------------------
# Every test states its example count; the "long" profile (HYPOTHESIS_PROFILE=long) multiplies them by 20.
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("fuzz-default", deadline=None, suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("long", deadline=None, suppress_health_check=_SUPPRESS, print_blob=True)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fuzz-default")
settings.load_profile(_PROFILE if _PROFILE in ("fuzz-default", "long") else "fuzz-default")
_SCALE = 20 if _PROFILE == "long" else 1
EXAMPLES = {"decode": 1500, "check_message": 1200, "check_content": 600, "server": 500, "client": 500,
            "flower_transport": 400, "client_node": 200}


def fuzz(name: str):
    return settings(max_examples=EXAMPLES[name] * _SCALE, deadline=None, suppress_health_check=_SUPPRESS)


# -- the protocol table, written out again from the docstring (the oracle) ------------------------------------------
def _int_in(lo, hi):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _loss(v):
    return isinstance(v, float) and math.isfinite(v) and v >= 0


def _reason(v):
    try:
        return isinstance(v, str) and len(v.encode("utf-8")) <= 1024
    except UnicodeEncodeError:
        return False


ROUND, STEPS, N, IMAGES = _int_in(1, 10**9), _int_in(0, 10**7), _int_in(1, 10**6), _int_in(1, 10**9)
X_CUT, Y, WEIGHTS = (torch.float32, 4), (torch.int64, 1), (torch.float32, 1)
TABLE = {  # kind: (direction, arrays, {meta key: (required, allowed)})
    "upload_request": ("s2c", {}, {"round": (True, ROUND)}),
    "upload": ("c2s", {"x_cut": X_CUT, "y": Y}, {"round": (True, ROUND), "cut": (True, _int_in(0, 10**9))}),
    "train_request": ("s2c", {}, {"round": (True, ROUND), "steps": (True, STEPS)}),
    "train_reply": ("c2s", {}, {"round": (True, ROUND), "steps": (True, STEPS), "loss": (False, _loss)}),
    "sample_request": ("c2s", {"y": Y}, {}),
    "sample_response": ("s2c", {"x_cut": X_CUT}, {"cut": (True, _int_in(0, 10**9))}),
    "sample_order": ("s2c", {}, {"n": (True, N)}),
    "sample_done": ("c2s", {}, {"n": (True, N)}),
    "error": ("any", {}, {"reason": (True, _reason)}),
    "join_request": ("s2c", {}, {}),
    "join": ("c2s", {}, {}),
    "model_push": ("s2c", {"weights": WEIGHTS}, {"round": (True, ROUND), "steps": (True, STEPS)}),
    "model_update": ("c2s", {"weights": WEIGHTS}, {"round": (True, ROUND), "steps": (True, STEPS),
                                                   "examples": (True, IMAGES), "loss": (False, _loss)}),
}
# Which kinds each split.algorithm lets cross: weights only under fedavg, and only weights there.
MODE_KINDS = {
    "collafuse": {"upload_request", "upload", "train_request", "train_reply", "sample_request", "sample_response",
                  "sample_order", "sample_done", "error", "join_request", "join"},
    "fedavg": {"model_push", "model_update", "train_reply", "sample_order", "sample_done", "error", "join_request",
               "join"},
}


def _is_client(node) -> bool:
    return isinstance(node, str) and re.fullmatch(r"client(0|[1-9][0-9]{0,8})", node) is not None


def allowed_by_table(msg: Message, algorithm: str = "collafuse") -> bool:
    """The table's verdict on a message under ``algorithm``, independent of protocol.check_message."""
    if not isinstance(msg.kind, str) or msg.kind not in TABLE or msg.kind not in MODE_KINDS[algorithm]:
        return False
    direction, arrays, meta = TABLE[msg.kind]
    c2s = msg.receiver == SERVER and _is_client(msg.sender)
    s2c = msg.sender == SERVER and (_is_client(msg.receiver) or (msg.kind == "join_request"
                                                                 and msg.receiver == ANY_CLIENT))
    if not {"c2s": c2s, "s2c": s2c, "any": c2s or s2c}[direction]:
        return False
    if not isinstance(msg.arrays, dict) or set(msg.arrays) != set(arrays):
        return False
    for name, (dtype, ndim) in arrays.items():
        a = msg.arrays[name]
        if not (isinstance(a, torch.Tensor) and a.dtype == dtype and a.ndim == ndim and a.layout == torch.strided):
            return False
        if a.is_floating_point() and not torch.isfinite(a).all():
            return False
    if len({a.shape[0] for a in msg.arrays.values()}) > 1:
        return False
    if not isinstance(msg.meta, dict) or not set(msg.meta) <= set(meta):
        return False
    return all(k in msg.meta for k, (req, _) in meta.items() if req) and all(meta[k][1](v) for k, v in msg.meta.items())


# -- hostile values ------------------------------------------------------------------------------------------------
BIG = ["x" * 400_000, "\u20ac" * 400, "a" * 1024, "a" * 1025, "\u00e9" * 512, "\u00e9" * 513, "\ud800", "line\nbreak",
       "", "\x00"]
EDGE_INTS = [0, 1, -1, 2, 3, 10**6, 10**6 + 1, 10**7 + 1, 10**9, 10**9 + 1, 2**31, 2**63 - 1, -(2**63), 2**64,
             10**4000]  # (Hypothesis must be able to print its examples: at most 4300 digits)
EDGE_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 0.0, -1e-300, 1e308, 5e-324, 0.5]

# What a Flower ConfigRecord can carry: scalars of bool/int/float/str/bytes, or homogeneous lists of them.
config_values = st.one_of(
    st.sampled_from(EDGE_INTS), st.integers(), st.sampled_from(EDGE_FLOATS), st.floats(), st.booleans(),
    st.text(max_size=20), st.sampled_from(BIG), st.binary(max_size=20),
    st.lists(st.integers(), max_size=3), st.lists(st.floats(), max_size=3), st.lists(st.text(max_size=4), max_size=3),
)
# In process a meta dict may hold anything at all.
python_values = st.one_of(config_values, st.none(), st.just({"a": 1}), st.just((1, 2)), st.just(np.float64(0.5)),
                          st.just(np.int64(3)), st.just(torch.tensor(1.0)), st.just(object()))


def meta_value(key: str, values=config_values):
    """A value for a meta key: often one the table allows (so accepted paths run too), else a hostile one. Valid
    ``steps`` stay below 3: the client would really train that many steps."""
    valid = {"round": st.integers(1, 10**9), "steps": st.integers(0, 2), "loss": st.floats(0, 10),
             "n": st.integers(1, 5), "reason": st.text(max_size=40),
             "examples": st.integers(1, 100)}.get(key, st.nothing())
    return capped_steps(key, st.one_of(valid, values))


def capped_steps(key: str, values):
    """``values`` with every valid step count above 2 made 2: a drawn 10**6 (an edge integer) would otherwise be a
    valid train_request, and the client would train a million steps in the test."""
    if key != "steps":
        return values
    return values.map(lambda v: 2 if isinstance(v, int) and not isinstance(v, bool) and 3 <= v <= 10**7 else v)


ALL_KINDS = st.sampled_from(sorted(SPECS))
C2S_KINDS = st.sampled_from(sorted(k for k, v in SPECS.items() if v.direction != "s2c"))
S2C_KINDS = st.sampled_from(sorted(k for k, v in SPECS.items() if v.direction != "c2s"))
KINDS = st.one_of(ALL_KINDS,
                  st.sampled_from(["gradient", "", "UPLOAD", "upload ", "client_weights"]), st.text(max_size=8))
NODES = st.one_of(st.sampled_from([SERVER, "client0", "client1", "client7", ANY_CLIENT]),
                  st.sampled_from(["client01", "client-1", "client", "Server", "client" + "9" * 5000, "client1\n",
                                   "client\u0661"]), st.text(max_size=8))


@st.composite
def meta_dicts(draw, kind, values=config_values):
    keys = sorted(SPECS[kind].meta) if isinstance(kind, str) and kind in SPECS else []
    meta = {k: draw(meta_value(k, values)) for k in keys if draw(st.integers(0, 9)) > 0}  # a key now and then missing
    for k in draw(st.lists(st.sampled_from(["round", "steps", "loss", "n", "reason", "grad_norm", "x0", ""])
                           | st.text(max_size=6), max_size=2)):
        meta[k] = draw(meta_value(k, values))
    return meta


# -- tensors (in process) --------------------------------------------------------------------------------------------
def _rng(seed):
    return torch.Generator().manual_seed(seed)


@st.composite
def tensors(draw, name: str):
    """A tensor for array ``name``: usually the right dtype and rank with a batch of 0-5, else a wrong one."""
    b = draw(st.integers(0, 5))
    g = _rng(draw(st.integers(0, 2**16)))
    how = draw(st.sampled_from(["good"] * 6 + ["nan", "inf", "huge", "dtype", "rank", "image", "channels", "t",
                                             "sparse", "numpy", "list", "none"]))
    if name == "y":
        lo, hi = draw(st.sampled_from([(0, 5), (5, 10), (0, 10), (-3, 0), (9, 13), (-(2**62), 2**62)]))
        t = torch.randint(lo, hi, (b,), generator=g, dtype=torch.int64)
    else:
        t = torch.randn((b, 1, 28, 28), generator=g)
    if how == "nan" and t.is_floating_point() and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = math.nan
    elif how == "inf" and t.is_floating_point() and t.numel():
        t.view(-1)[-1] = -math.inf
    elif how == "huge" and t.is_floating_point():
        t = t * 3e38  # finite for |z| < 1.13, Inf beyond: both kinds of batch
    elif how == "dtype":
        t = t.to(draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.uint8,
                                       torch.bool, torch.complex64, torch.float32, torch.int64])))
    elif how == "rank":
        t = t.reshape(-1) if t.ndim > 1 else t.reshape(b, 1)
    elif how == "image" and t.ndim == 4:
        t = t[:, :, :14, :14]
    elif how == "channels" and t.ndim == 4:
        t = t.expand(b, 3, 28, 28)
    elif how == "t" and t.ndim == 4:
        t = t.transpose(2, 3)  # non-contiguous but allowed
    elif how == "sparse":
        t = t.to_sparse()
    elif how == "numpy":
        return t.numpy()
    elif how == "list":
        return t.tolist()
    elif how == "none":
        return None
    return t


def _valid_tensor(name: str, b: int, sender: str, seed: int) -> torch.Tensor:
    g = _rng(seed)
    if name == "x_cut":
        return torch.randn((b, 1, 28, 28), generator=g)
    if name == "weights":
        return torch.randn((b,), generator=g)
    lo = 5 if sender == "client1" else 0  # the tiny config's class groups: client0 holds 0-4, client1 5-9
    return torch.randint(lo, lo + 5, (b,), generator=g, dtype=torch.int64)


@st.composite
def valid_messages(draw, kinds=ALL_KINDS):
    """A message the table allows (and, mostly, that the tiny run's receivers accept)."""
    kind = draw(kinds)
    spec = SPECS[kind]
    client = draw(st.sampled_from(["client0", "client0", "client1"]))
    c2s = spec.direction == "c2s" or (spec.direction == "any" and draw(st.booleans()))
    sender, receiver = (client, SERVER) if c2s else (SERVER, ANY_CLIENT if kind == "join_request" else client)
    b, seed = draw(st.integers(1, 4)), draw(st.integers(0, 2**16))
    arrays = {n: _valid_tensor(n, b, sender, seed) for n in spec.arrays}
    meta = {k: draw(meta_value(k, st.nothing())) for k, r in spec.rules.items() if r.required or draw(st.booleans())}
    return Message(kind, sender, receiver, arrays, meta)


@st.composite
def one_fault(draw, msg: Message, values=python_values) -> Message:
    """``msg`` with one thing wrong (or, now and then, nothing): the way to reach every single check."""
    arrays, meta = dict(msg.arrays), dict(msg.meta)
    kind, sender, receiver = msg.kind, msg.sender, msg.receiver
    what = draw(st.sampled_from(["none", "kind", "sender", "receiver", "drop array", "add array", "array",
                                 "batch", "drop meta", "add meta", "meta value", "meta value", "meta type"]))
    if what == "kind":
        kind = draw(KINDS)
    elif what == "sender":
        sender = draw(NODES)
    elif what == "receiver":
        receiver = draw(NODES)
    elif what == "drop array" and arrays:
        del arrays[draw(st.sampled_from(sorted(arrays)))]
    elif what == "add array":
        name = draw(st.sampled_from(["x0", "eps", "x_cut", "y", "weights"]))
        arrays[name] = draw(tensors(name))
    elif what == "array" and arrays:
        name = draw(st.sampled_from(sorted(arrays)))
        arrays[name] = draw(tensors(name))
    elif what == "batch" and arrays:
        name = draw(st.sampled_from(sorted(arrays)))
        arrays[name] = torch.cat([arrays[name], arrays[name][:1]])
    elif what == "drop meta" and meta:
        del meta[draw(st.sampled_from(sorted(meta)))]
    elif what == "add meta":
        key = draw(st.sampled_from(["round", "steps", "loss", "n", "reason", "grad_norm", ""]) | st.text(max_size=6))
        meta[key] = draw(meta_value(key, values))
    elif what in ("meta value", "meta type") and meta:
        key = draw(st.sampled_from(sorted(meta)))
        meta[key] = draw(capped_steps(key, values) if what == "meta value" else st.sampled_from(
            [True, False, float(meta[key]) if isinstance(meta[key], int) else 1, str(meta[key]), None]))
    return Message(kind, sender, receiver, arrays, meta)


@st.composite
def chaos_messages(draw, kinds=KINDS, senders=NODES, receivers=NODES, values=python_values):
    """Every field drawn on its own: mostly nonsense."""
    kind = draw(kinds)
    names = sorted(SPECS[kind].arrays) if kind in SPECS else []
    names = [n for n in names if draw(st.integers(0, 9)) > 0]
    names += draw(st.lists(st.sampled_from(["x0", "eps", "x_cut", "y", "weights"]), max_size=1))
    arrays = {n: draw(tensors(n)) for n in names}
    if arrays and draw(st.integers(0, 3)) == 0:  # same batch everywhere, so a batch mismatch is not the only reason
        b = draw(st.integers(1, 4))
        arrays = {k: (v[:b] if isinstance(v, torch.Tensor) and not v.is_sparse and v.ndim else v)
                  for k, v in arrays.items()}
    return Message(kind, draw(senders), draw(receivers), arrays, draw(meta_dicts(kind, values)))


def messages(kinds=ALL_KINDS, values=python_values):
    """A quarter valid, half one fault away from valid, a quarter chaos."""
    valid = valid_messages(kinds)
    faulty = valid.flatmap(lambda m: one_fault(m, values))
    return st.one_of(valid, faulty, faulty, chaos_messages(values=values))


# -- Flower contents ------------------------------------------------------------------------------------------------
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # non-latin-1 field names: "Stored array in format 3.0" (decode refuses 3.0)
        warnings.simplefilter("ignore", UserWarning)
        np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


ANY_DTYPE = st.one_of(npst.scalar_dtypes(), npst.integer_dtypes(endianness="?"), npst.floating_dtypes(endianness="?"),
                      npst.byte_string_dtypes(max_len=4), npst.unicode_string_dtypes(max_len=4),
                      npst.array_dtypes(allow_subarrays=True), npst.nested_dtypes(max_itemsize=64))
WIRE = {torch.float32: np.dtype("<f4"), torch.int64: np.dtype("<i8")}


@st.composite
def np_arrays(draw, name=None):
    """(ndarray, honest): the right dtype and rank for ``name`` most of the time, any object-free dtype else; the
    bytes come from a seeded generator, so floats hold NaN and Inf as often as random bits make them."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spec = next((SPECS[k].arrays[name] for k in SPECS if name in SPECS[k].arrays), None)
    if spec is not None and draw(st.integers(0, 2)):
        dtype, ndim = WIRE[spec[0]], spec[1]
        shape = (draw(st.integers(0, 3)), 1, 28, 28)[:ndim] if ndim == 4 else (draw(st.integers(0, 5)),)
        if draw(st.booleans()):
            shape = draw(npst.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=3))
    else:
        dtype = draw(ANY_DTYPE)
        shape = draw(npst.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=3))
    n = math.prod(shape)
    if n == 0 or dtype.itemsize == 0:
        a = np.zeros(shape, dtype)
    else:
        a = np.frombuffer(rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).tobytes(), dtype).reshape(shape)
    if a.ndim >= 2 and draw(st.integers(0, 5)) == 0:
        a = np.asfortranarray(a)
    return a


@st.composite
def flower_arrays(draw, name):
    """(Array, source ndarray or None when its fields or bytes were tampered with)."""
    a = draw(np_arrays(name))
    arr = Array(dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=_npy(a))  # as Array(a) makes it
    source = a
    for field, pool in (("dtype", st.sampled_from(["float32", "int64", "float64", "<f4", ">f4", "", "object"])
                         | st.integers() | st.none()),
                        ("shape", st.sampled_from([(2, 1, 28, 28), (3,), (), (10**12, 1, 28, 28), (-1, 1, 28, 28),
                                                   (True, 1, 28, 28), [2, 1, 28, 28], "2,1", (2.0, 1, 28, 28),
                                                   (0, 10**30, 1, 1), None])
                         | st.lists(st.integers(-2, 2**40), max_size=5).map(tuple)),
                        ("stype", st.sampled_from(["torch", "", "numpy.ndarray ", None, 7]))):
        if draw(st.integers(0, 7)) == 0:
            setattr(arr, field, draw(pool))
            source = None
    how = draw(st.sampled_from(["keep"] * 5 + ["cut", "extend", "random", "other", "type", "header"]))
    if how == "cut" and arr.data:
        arr.data = arr.data[: draw(st.integers(0, len(arr.data) - 1))]
    elif how == "extend":
        arr.data = arr.data + draw(st.binary(min_size=1, max_size=16))
    elif how == "random":
        arr.data = draw(st.binary(max_size=300))
    elif how == "other":  # the declaration of one array, the bytes of another (e.g. float32 [2,1,28,28] over a void)
        arr.data = _npy(draw(np_arrays()))
    elif how == "type":
        arr.data = draw(st.sampled_from([None, "text", bytearray(arr.data), memoryview(arr.data), 5]))
    elif how == "header":  # a hand-written header: any dict numpy's reader may or may not accept
        body = draw(st.sampled_from(["{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 28, 28), }",
                                     "{'descr': 'O', 'fortran_order': False, 'shape': (2,), }",
                                     "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
                                     "{'descr': '<f4', 'shape': (2,), }", "__import__('os')", "{", "[1, 2]"]))
        arr.data = b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode() + arr.data[128:]
    if how != "keep":
        source = None
    return arr, source


@st.composite
def encoded_contents(draw, kinds=ALL_KINDS):
    """(RecordDict, {name: source ndarray}, decodable) from encoding a valid message, then at most one fault in
    the envelope, one array's fields or bytes, or the records."""
    msg = draw(valid_messages(kinds))
    content = encode(msg)
    sources = {k: v.numpy() for k, v in msg.arrays.items()}
    envelope, record = content.config_records["envelope"], content.array_records["arrays"]
    what = draw(st.sampled_from(["none", "none", "envelope", "meta", "array", "array", "array", "records"]))
    decodable = True
    if what == "envelope":
        field = draw(st.sampled_from(["kind", "sender", "receiver", "evil", "meta", "metadata.n"]))
        envelope[field] = draw(config_values)
        decodable = field in ("sender", "receiver") and isinstance(envelope[field], str) and envelope[field] != ""
    elif what == "meta":
        key = draw(st.sampled_from(["round", "steps", "loss", "n", "reason", "grad_norm", ""]))
        envelope[f"meta.{key}"] = draw(capped_steps(key, config_values))  # decode passes meta on; check judges it
    elif what == "array" and msg.arrays:
        name = draw(st.sampled_from(sorted(record)))
        arr, src = draw(flower_arrays(name))
        record[name] = arr
        allowed = SPECS[msg.kind].arrays[name]
        decodable = _honest(src, allowed)
        sources[name] = src
    elif what == "records":
        return draw(st.sampled_from([RecordDict(), RecordDict({"envelope": envelope}), RecordDict({"arrays": record}),
                                     RecordDict({"envelope": envelope, "arrays": record,
                                                 "metrics": MetricRecord({"loss": 0.5})})])), {}, False
    return content, {k: v for k, v in sources.items() if v is not None}, decodable


def _honest(src, allowed) -> bool:
    """Whether an untampered source array is what the table allows: its dtype, its rank, C order on the wire."""
    return (src is not None and allowed is not None and src.dtype == WIRE[allowed[0]] and src.ndim == allowed[1]
            and not (src.flags.f_contiguous and not src.flags.c_contiguous))


def flower_contents(kinds=ALL_KINDS):
    """Two thirds encoded from a valid message with at most one fault, a third chaos."""
    return st.one_of(encoded_contents(kinds), encoded_contents(kinds), chaos_contents())


@st.composite
def chaos_contents(draw):
    """(RecordDict, {name: source ndarray}, decodable): a Flower content with every field drawn on its own, and
    whether the table says decode must accept it (every field well-formed, every array untampered and of its
    spec's dtype and rank)."""
    kind = draw(KINDS)
    spec = SPECS.get(kind)
    envelope = {"kind": kind, "sender": draw(NODES), "receiver": draw(NODES)}
    decodable = spec is not None and all(isinstance(envelope[k], str) and envelope[k] for k in envelope)
    for field in ("kind", "sender", "receiver"):
        if draw(st.integers(0, 11)) == 0:
            if draw(st.booleans()):
                del envelope[field]
            else:
                envelope[field] = draw(config_values)
            decodable = False
    envelope.update({f"meta.{k}": v for k, v in draw(meta_dicts(kind)).items()})
    if draw(st.integers(0, 9)) == 0:
        envelope[draw(st.sampled_from(["evil", "meta", "metadata.round", "Kind"]))] = draw(config_values)
        decodable = False
    names = sorted(spec.arrays) if spec else []
    names = [n for n in names if draw(st.integers(0, 7)) > 0]
    if draw(st.integers(0, 5)) == 0:
        names.append(draw(st.sampled_from(["x0", "eps", "x_cut", "y", "weights", ""])))
        decodable = decodable and names[-1] in spec.arrays if spec else False
    arrays, sources = {}, {}
    for n in names:
        arr, src = draw(flower_arrays(n))
        arrays[n] = arr
        allowed = spec.arrays.get(n) if spec else None
        decodable = decodable and _honest(src, allowed)
        if src is not None:
            sources[n] = src
    record = ArrayRecord()
    for n, arr in arrays.items():  # item by item: ArrayRecord(dict) rebuilds each Array and so refuses odd fields
        record[n] = arr
    records = {"envelope": ConfigRecord(envelope), "arrays": record}
    shape = draw(st.sampled_from(["ok"] * 8 + ["no envelope", "no arrays", "swapped", "extra", "empty"]))
    if shape == "no envelope":
        del records["envelope"]
    elif shape == "no arrays":
        del records["arrays"]
    elif shape == "swapped":
        records = {"envelope": record, "arrays": ConfigRecord(envelope)}
    elif shape == "extra":
        records["metrics"] = MetricRecord({"loss": 0.5})
    elif shape == "empty":
        records = {}
    return RecordDict(records), sources, decodable and shape == "ok"


# -- the receivers --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fed():
    cfg = tiny_config(train={"rounds": 1})
    f = Federation(cfg, synthetic_clients(cfg, n=16))
    f.train(progress=False)
    assert set(f.server.uploads) == {0, 1}  # the server holds uploads that a bad message could poison
    return f


def snapshot(role) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor the role holds (weights, EMA, Adam, RNG states, uploads or the cached upload, pending labels),
    cloned, and the rest of its state as JSON."""
    tensors, meta = role.state()
    snap = {k: v.clone() for k, v in tensors.items()}
    plain = {"meta": meta, "steps": role.learner.steps}
    if hasattr(role, "uploads"):
        for c, (u, y) in role.uploads.items():
            snap[f"uploads.{c}.x_cut"], snap[f"uploads.{c}.y"] = u.clone(), y.clone()
        plain["client_labels"] = None if role.client_labels is None else {
            k: sorted(v) for k, v in role.client_labels.items()}
    else:
        if role._upload is not None:
            snap["cached_upload"] = role._upload[1].clone()
        plain.update(rounds_done=role.rounds_done, last_loss=repr(role.last_loss), finished=len(role.finished),
                     pending=None if role._pending_y is None else role._pending_y.tolist())
    return snap, json.dumps(plain, sort_keys=True, default=repr)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t


def assert_unchanged(before, after) -> None:
    (t0, p0), (t1, p1) = before, after
    assert t0.keys() == t1.keys()
    for k in t0:
        assert t0[k].dtype == t1[k].dtype and t0[k].shape == t1[k].shape, k
        assert torch.equal(_bits(t0[k]), _bits(t1[k])), k  # bitwise, so NaN == NaN
    assert p0 == p1


def deliver(role, msg: Message) -> None:
    """Hand ``msg`` to ``role`` through ``handle_checked``, as every transport does (it catches ProtocolError only,
    so anything else the role raises fails the test); assert the invariants on either outcome."""
    if msg.kind == "train_request" and allowed_by_table(msg):  # fail fast, never train a million steps (capped_steps)
        assert msg.meta["steps"] <= 2, f"the strategy drew a valid train_request of {msg.meta['steps']} steps"
    before = snapshot(role)
    log = MessageLog()
    reply = handle_checked(role, msg, log)
    addressed = msg.receiver == role.node_id or (msg.kind == "join_request" and msg.receiver == ANY_CLIENT)
    if reply is not None and reply.kind == "error":  # refused: no role answers an accepted message with an error
        event(f"refused {msg.kind}" if msg.kind in SPECS else "refused other")
        assert_unchanged(before, snapshot(role))
        assert reply.receiver == msg.sender and log.records[-1]["rejected"] == reply.meta["reason"]
        if allowed_by_table(msg) and addressed:
            check_message(reply)  # an error back to a real node always passes
        return
    assert allowed_by_table(msg) and addressed, "a message the table forbids was accepted"
    event(f"accepted {msg.kind}")
    if reply is not None:
        check_message(reply)
        assert reply.sender == role.node_id and reply.receiver == msg.sender


# -- properties -------------------------------------------------------------------------------------------------------
@fuzz("decode")
@given(flower_contents())
def test_decode_refuses_only_with_protocol_error_and_accepts_what_the_table_allows(case):
    content, sources, decodable = case
    try:
        msg = decode(content)
    except ProtocolError as e:
        event(f"refused: {str(e).split(' ')[1] if ' ' in str(e) else e}"[:40])
        assert not decodable, f"an honest content was refused: {e}"
        assert len(str(e).encode()) <= 1024 and "\n" not in str(e)  # one short line, fit for an error reply
        return
    event("decoded")
    spec = SPECS[msg.kind]
    for name, t in msg.arrays.items():
        dtype, ndim = spec.arrays[name]
        assert t.dtype == dtype and t.ndim == ndim and t.is_contiguous()
        if name in sources:  # untampered: the same bits as what was sent
            assert t.numpy().tobytes() == np.ascontiguousarray(sources[name]).tobytes()
    try:
        check_message(msg)
    except ProtocolError:
        pass


@fuzz("check_message")
@given(messages())
def test_check_message_agrees_with_the_table(msg):
    try:
        check_message(msg)
    except ProtocolError as e:
        assert not allowed_by_table(msg), f"an allowed message was refused: {e}"
        assert len(str(e).encode()) <= 1024 and "\n" not in str(e)
        event("refused")
        return
    assert allowed_by_table(msg)
    event("accepted")


@fuzz("check_message")
@given(messages())
def test_check_message_under_fedavg_agrees_with_the_table(msg):
    try:
        check_message(msg, "fedavg")
    except ProtocolError as e:
        assert not allowed_by_table(msg, "fedavg"), f"an allowed message was refused: {e}"
        assert len(str(e).encode()) <= 1024 and "\n" not in str(e)
        event("refused")
        return
    assert allowed_by_table(msg, "fedavg")
    event("accepted")


@fuzz("check_content")
@given(messages())
def test_check_content_refuses_only_with_protocol_error(msg):
    limits = ContentLimits((1, 28, 28), 10, 3, 4)
    try:
        check_message(msg)
    except ProtocolError:
        return
    try:
        check_content(msg, limits)
    except ProtocolError:
        event("refused")
        return
    event("accepted")
    x, y = msg.arrays.get("x_cut"), msg.arrays.get("y")
    assert x is None or tuple(x.shape[1:]) == (1, 28, 28)
    assert y is None or not y.numel() or (0 <= int(y.min()) and int(y.max()) <= 9)
    n = len(next(iter(msg.arrays.values()))) if msg.arrays else msg.meta.get("n", 1)
    cap = {"upload": 3, "sample_request": 4, "sample_response": 4, "sample_order": 4}.get(msg.kind)
    assert cap is None or 1 <= n <= cap


@fuzz("server")
@given(messages(kinds=st.sampled_from(["upload", "upload", "sample_request", "sample_request", "train_reply",
                                       "sample_done", "error", "join", "upload_request"])))
def test_the_server_survives_any_message_and_a_refused_one_changes_nothing(fed, msg):
    deliver(fed.server, msg)


@fuzz("client")
@given(messages(kinds=st.sampled_from(["upload_request", "train_request", "sample_order", "sample_response",
                                       "sample_response", "error", "join_request", "upload"])))
def test_a_client_survives_any_message_and_a_refused_one_changes_nothing(fed, msg):
    client = fed.clients[0]
    x = msg.arrays.get("x_cut")
    if msg.kind == "sample_response" and isinstance(x, torch.Tensor) and x.ndim and client._pending_y is None:
        client._pending_y = client.sample_labels(len(x))  # a hand-off of this size is awaited, so the path runs
    deliver(client, msg)


@pytest.fixture(scope="module")
def flower_identity():
    """Flower stamps new messages with the run id of the running app; outside one, give it a run id."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:
        for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
            mp.setattr(TaskIdentity, attr, value)
        yield


class OneReplyGrid:
    """A grid with one node that answers every message with ``content``."""

    def __init__(self, content):
        self.content = content

    def get_node_ids(self):
        return [5]

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        return [SimpleNamespace(content=self.content, has_error=lambda: False,
                                metadata=SimpleNamespace(src_node_id=5, reply_to_message_id=i)) for i in ids]


@fuzz("flower_transport")
@given(flower_contents(C2S_KINDS))
def test_no_reply_can_end_the_server_app_run(flower_identity, case):
    from collafuse.flower.transport import FlowerTransport

    content, _, _ = case
    log = MessageLog()
    t = FlowerTransport(OneReplyGrid(content), log, num_clients=2, reply_timeout=1.0, poll_interval=0.0)
    request = Message("train_request", SERVER, "client0", meta={"round": 1, "steps": 1})
    reply = SimpleNamespace(content=content, has_error=lambda: False, metadata=SimpleNamespace(src_node_id=5))
    d = t._receive(request, "client0", reply, 0.0)
    event("accepted" if d.reply is not None else "refused" if d.refused else "no reply")
    if d.reply is not None:
        check_message(d.reply)
        assert d.reply.sender == "client0" and d.error is None
    elif d.refused:
        assert log.records[-1]["rejected"] and log.records[-1]["kind"] == "error"
        check_message(Message("error", SERVER, "client0", meta={"reason": d.error[:500]}))  # runner's _tell fits
    t.discover()  # the same content as a join reply
    joined = list(t.nodes)
    assert joined in ([], ["client0"], ["client1"]) and bool(joined) != (5 in t.refused)
    if joined:
        msg = decode(content)
        assert msg.kind == "join" and msg.sender == joined[0] and t.nodes[joined[0]] == 5
    json.dumps(log.records, allow_nan=False)  # the audit log stays plain JSON, whatever was refused


@pytest.fixture(scope="module")
def client_node(tmp_path_factory):
    from collafuse.config import config_from_dict
    from collafuse.flower.task import ClientNode
    from conftest import TINY, merge, write_idx

    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("t10k", 2)):
        labels = np.repeat(np.arange(10), per_class)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (len(labels), 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    cfg = config_from_dict(merge(TINY, {"data": {"root": str(root)}}))
    out = tmp_path_factory.mktemp("server")
    return ClientNode(cfg, {"client-id": 0, "state-dir": str(out / "node0")}, str(out))


@fuzz("client_node")
@given(flower_contents(S2C_KINDS))
def test_a_client_node_answers_any_content_with_a_checked_message(client_node, case):
    content, sources, _ = case
    x = sources.get("x_cut")
    if x is not None and x.ndim and client_node.role._pending_y is None:
        client_node.role._pending_y = client_node.role.sample_labels(len(x))  # so a hand-off is awaited
    reply = client_node.handle(content)
    event("none" if reply is None else reply.kind)
    if reply is not None:
        check_message(reply)
        assert reply.sender == "client0" and reply.receiver == SERVER
        encode(reply)  # and Flower can carry it


# -- regressions --------------------------------------------------------------------------------------------------
def _upload_content(x_data: bytes, shape=(2, 1, 28, 28), **meta) -> RecordDict:
    envelope = {"kind": "upload", "sender": "client0", "receiver": SERVER, "meta.round": 1}
    envelope.update({f"meta.{k}": v for k, v in meta.items()})
    arrays = {"x_cut": Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=x_data),
              "y": Array(np.zeros(2, dtype=np.int64))}
    return RecordDict({"envelope": ConfigRecord(envelope), "arrays": ArrayRecord(arrays)})


@pytest.mark.parametrize("held,match", [
    (np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), r"hold dtype .*\('a', '<f4'\).*declared float32"),
    (np.array(["ab", "cd"]), "hold dtype '<U2'"),
    (np.array([b"ab", b"cd"]), "hold dtype '|S2'"),
    (np.zeros((2, 1, 28, 28), dtype=">f4"), "hold dtype '>f4'"),
    (np.zeros((2, 1, 28, 28), dtype="<f8"), "hold dtype '<f8'"),
    (np.asfortranarray(np.zeros((2, 1, 28, 28), dtype="<f4")), "Fortran order"),
    (np.zeros((3, 1, 28, 28), dtype="<f4"), r"hold shape \[3, 1, 28, 28\]"),
])
def test_npy_bytes_that_disagree_with_a_float32_declaration_are_a_protocol_error(held, match):
    """The defect: a structured or string dtype under a float32 declaration made decode raise TypeError."""
    with pytest.raises(ProtocolError, match=match):
        decode(_upload_content(_npy(held)))


@pytest.mark.parametrize("shape,data,match", [
    ((2, 1, 28, 28), _npy(np.zeros((2, 1, 28, 28), "<f4"))[:-4], "allowed: exactly 6272"),
    ((2, 1, 28, 28), _npy(np.zeros((2, 1, 28, 28), "<f4")) + b"\0", "allowed: exactly 6272"),
    ((10**9, 1, 28, 28), b"", "allowed: at most"),  # refused from the declaration, before any byte is read
    ((2, 28, 28), _npy(np.zeros((2, 28, 28), "<f4")), "allowed: 4 non-negative integers"),
    ((-2, 1, 28, 28), b"", "allowed: 4 non-negative integers"),
    ((2, 1, 28, 28), b"\x93NUMPY\x01\x00\x04\x00{}  " + bytes(6272), "not a .npy array"),
])
def test_declared_shapes_and_byte_lengths_are_checked(shape, data, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_upload_content(data, shape))


def test_an_array_name_the_kind_does_not_carry_is_refused():
    content = _upload_content(_npy(np.zeros((2, 1, 28, 28), "<f4")))
    content.array_records["arrays"]["x0"] = Array(np.zeros((2, 1, 28, 28), "<f4"))
    with pytest.raises(ProtocolError, match=r"upload carries an array 'x0' \(allowed: \['x_cut', 'y'\]\)"):
        decode(content)


@pytest.mark.parametrize("msg,match", [
    (Message("train_reply", "client0", SERVER, meta={"round": 1, "steps": 2, "loss": "0" * 400_000}),
     r"train_reply meta loss = '0000.*\.\.\. is not allowed \(allowed: a finite float >= 0"),
    (Message("error", "client0", SERVER, meta={"reason": "x" * 1_000_000}),
     r"error meta reason = 'xxx.*\.\.\. is not allowed \(allowed: a string of at most 1024 bytes"),
    (Message("error", "client0", SERVER, meta={"reason": "\u20ac" * 342}), "at most 1024 bytes"),  # 1026 bytes
    (Message("train_request", SERVER, "client0", meta={"round": 1}), "train_request lacks meta steps"),
    (Message("upload_request", SERVER, "client0"), "upload_request lacks meta round"),
    (Message("train_reply", "client0", SERVER, meta={"round": True, "steps": 2}), "round = True"),
    (Message("train_reply", "client0", SERVER, meta={"round": 1, "steps": 10**7 + 1}), r"\[0, 10000000\]"),
    (Message("train_reply", "client0", SERVER, meta={"round": 1, "steps": 2, "loss": 1}), "loss = 1 is not"),
    (Message("sample_order", SERVER, "client0", meta={"n": 0}), r"n = 0 .*\[1, 1000000\]"),
    (Message("sample_done", "client0", SERVER, meta={"n": 10**5000}), "<int of 16610 bits>"),
    (Message("join", "client" + "9" * 5000, SERVER), r"join from 'client9999.*\.\.\. to 'server' is not allowed"),
    (Message("join", "client01", SERVER), "not allowed"),
    (Message("upload_request", SERVER, ANY_CLIENT, meta={"round": 1}), "not allowed"),  # client* only for joins
])
def test_meta_and_node_ids_are_typed_and_bounded(msg, match):
    with pytest.raises(ProtocolError, match=match) as e:
        check_message(msg)
    assert len(str(e.value)) < 400


def test_a_400_kb_loss_and_a_1_mb_reason_are_refused_over_flower_too(client_node):
    big_loss = RecordDict({"envelope": ConfigRecord({"kind": "train_reply", "sender": "client0", "receiver": SERVER,
                                                     "meta.round": 1, "meta.steps": 2, "meta.loss": "0" * 400_000}),
                           "arrays": ArrayRecord()})
    with pytest.raises(ProtocolError, match="loss"):
        check_message(decode(big_loss))
    big_reason = RecordDict({"envelope": ConfigRecord({"kind": "error", "sender": SERVER, "receiver": "client0",
                                                       "meta.reason": "x" * 1_000_000}), "arrays": ArrayRecord()})
    reply = client_node.handle(big_reason)
    assert reply.kind == "error" and "reason" in reply.meta["reason"] and len(reply.meta["reason"]) < 400


def test_client_index_refuses_ids_that_int_cannot_even_read():
    assert client_index("client12") == 12
    for bad in ("client" + "1" * 5000, "client01", "client\u0661", "client", "server"):
        with pytest.raises(ProtocolError, match="is not a client id"):
            client_index(bad)


def test_error_reply_reasons_fit_in_1_kb_of_utf8_whole_characters():
    msg = Message("upload", "client0", SERVER)
    for reason in ("\u20ac" * 2000, "a" * 2000, "\U0001f600" * 300, "a\ud800b"):
        err = error_reply(msg, reason)
        check_message(err)
        data = err.meta["reason"].encode("utf-8")
        assert len(data) <= 1024 and err.meta["reason"].startswith(reason[:10].replace("\ud800", "?")[:5])
    assert error_reply(msg, "short").meta["reason"] == "short"


def test_a_role_whose_reply_breaks_the_protocol_sends_an_error_instead(caplog):
    class Leaky:
        node_id = "client1"

        def handle(self, msg):  # answers an upload_request with its raw images
            return Message("upload", "client1", SERVER, {"x0": torch.zeros(2, 1, 28, 28)}, {"round": 1})

    log = MessageLog()
    reply = handle_checked(Leaky(), Message("upload_request", SERVER, "client1", meta={"round": 1}), log)
    assert reply.kind == "error" and reply.sender == "client1" and reply.receiver == SERVER
    check_message(reply)
    assert "its reply was refused before sending" in reply.meta["reason"]
    assert log.records[-1]["kind"] == "upload" and "arrays" in log.records[-1]["rejected"]
    assert "could not answer upload_request" in caplog.text


def test_a_message_for_another_node_is_refused_by_the_role(fed):
    before = snapshot(fed.clients[0])
    reply = handle_checked(fed.clients[0], Message("train_request", SERVER, "client1", meta={"round": 99, "steps": 1}))
    assert reply.kind == "error" and "train_request for client1 reached client0" in reply.meta["reason"]
    assert_unchanged(before, snapshot(fed.clients[0]))


def test_a_refused_message_with_hostile_meta_is_logged_as_plain_json():
    log = MessageLog()
    msg = Message("train_reply", "client0", SERVER, meta={"round": 10**5000, "steps": b"\x00", "loss": math.nan,
                                                          "reason": "x" * 5000, 7: None})
    reply = handle_checked(SimpleNamespace(node_id=SERVER, handle=lambda m: None), msg, log)
    assert reply.kind == "error"
    record = json.loads(json.dumps(log.records[-1], allow_nan=False))
    assert record["rejected"] and record["meta"]["round"] == "<int of 16610 bits>"
    assert len(record["meta"]["reason"]) < 80 and record["meta"]["7"] == "None"

