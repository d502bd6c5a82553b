"""What a CollaFuse run sends over the wire, per client: in total, per training round and per generated image.

Everything is read from the message log (``MessageLog.records`` or a run's ``message_log.jsonl``), the complete
audit of what crossed (split/transport.py). Bytes are array payload bytes (numel x element size), as the log records
them; message framing and the few meta scalars (round, steps, loss) are not counted.

Directions are the client's: *uploaded* is client -> server, *downloaded* is server -> client. Training messages
carry ``meta.round`` (``upload_request``, ``upload``, ``train_request``, ``train_reply``) and are grouped by it.
Sampling messages (``sample_request`` with the labels y, ``sample_response`` with x_cut) are divided by the number
of images requested, the length of each request's y array.

Only the *counted* records enter these totals: a round that a crash cut off and that was done again (``replayed``)
and an upload re-sent after a server restart with bytes the server had already received (``resent``) are reported
apart, under ``after_restarts`` (split/transport.py, MessageLog).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from ..split.protocol import SERVER
from ..split.transport import MessageLog, uncounted

BYTES_UNIT = "bytes of array payload (numel x element size); message framing and meta scalars not counted"
SAMPLING_KINDS = ("sample_request", "sample_response")


def load_records(log: MessageLog | list[dict] | str | Path) -> list[dict]:
    """The log's records, from a ``MessageLog``, a list of records, or a ``message_log.jsonl`` path.

    Args:
        log (`MessageLog`, `list[dict]`, `str` or `Path`): where the records are.
    """
    if isinstance(log, MessageLog):
        return log.records
    if isinstance(log, (str, Path)):
        path = Path(log)
        if not path.is_file():
            raise FileNotFoundError(f"message log '{path}' does not exist")
        # Parsed here, not through MessageLog(path), so reading a finished run's log can never append to it.
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list(log)


def _client_of(record: dict) -> tuple[str, str]:
    """(client node id, "up" or "down") of one record."""
    if record["receiver"] == SERVER:
        return record["sender"], "up"
    return record["receiver"], "down"


def _images_requested(record: dict) -> int:
    for a in record["arrays"]:
        if a["name"] == "y":
            return int(a["shape"][0])
    raise ValueError(f"sample_request seq {record.get('seq')} carries no y array (arrays: {record['arrays']})")


def _per_image(total: int, images: int) -> float | None:
    return total / images if images else None


def communication_summary(log: MessageLog | list[dict] | str | Path) -> dict:
    """Bytes each client uploaded and downloaded: in total, per training round, and per generated image.

    Args:
        log (`MessageLog`, `list[dict]`, `str` or `Path`): the run's message log (see ``load_records``).

    Returns:
        `dict`: JSON-able. ``per_client[node]`` holds ``uploaded_bytes``, ``downloaded_bytes``, ``training`` (totals
        and ``per_round``: a list of ``{"round", "uploaded_bytes", "downloaded_bytes", "messages"}`` in round order)
        and ``sampling`` (requests, images, bytes, and ``*_per_image``; None when no image was requested, e.g. at
        cut = T, where a client samples without sending anything). ``totals`` sums over clients.
    """
    records = load_records(log)
    clients: dict[str, dict] = {}
    rounds: dict[str, dict[int, dict]] = defaultdict(dict)

    def entry(node: str) -> dict:
        if node not in clients:
            clients[node] = {"uploaded_bytes": 0, "downloaded_bytes": 0, "messages": 0,
                             "training": {"uploaded_bytes": 0, "downloaded_bytes": 0, "messages": 0},
                             "sampling": {"requests": 0, "images": 0, "uploaded_bytes": 0, "downloaded_bytes": 0}}
        return clients[node]

    again: dict[str, dict] = {}  # what crossed a second time after restarts, by client: not in the totals above
    for r, why in zip(records, uncounted(records)):
        node, direction = _client_of(r)
        if why is not None:
            a = again.setdefault(node, {"replayed_messages": 0, "replayed_bytes": 0,
                                        "resent_uploads": 0, "resent_upload_bytes": 0})
            if why == "replayed":
                a["replayed_messages"] += 1
                a["replayed_bytes"] += r["bytes"]
            elif r["kind"] == "upload":
                a["resent_uploads"] += 1
                a["resent_upload_bytes"] += r["bytes"]
            continue
        c = entry(node)
        key = "uploaded_bytes" if direction == "up" else "downloaded_bytes"
        c[key] += r["bytes"]
        c["messages"] += 1
        if r["kind"] in SAMPLING_KINDS:
            s = c["sampling"]
            s[key] += r["bytes"]
            if r["kind"] == "sample_request":
                s["requests"] += 1
                s["images"] += _images_requested(r)
        elif "round" in r.get("meta", {}):
            c["training"][key] += r["bytes"]
            c["training"]["messages"] += 1
            per = rounds[node].setdefault(int(r["meta"]["round"]),
                                          {"uploaded_bytes": 0, "downloaded_bytes": 0, "messages": 0})
            per[key] += r["bytes"]
            per["messages"] += 1

    for node, c in clients.items():
        c["training"]["rounds"] = len(rounds[node])
        c["training"]["per_round"] = [{"round": k, **v} for k, v in sorted(rounds[node].items())]
        s = c["sampling"]
        s["uploaded_bytes_per_image"] = _per_image(s["uploaded_bytes"], s["images"])
        s["downloaded_bytes_per_image"] = _per_image(s["downloaded_bytes"], s["images"])
        s["bytes_per_image"] = _per_image(s["uploaded_bytes"] + s["downloaded_bytes"], s["images"])

    per_client = dict(sorted(clients.items(), key=lambda kv: (len(kv[0]), kv[0])))  # client2 before client10
    total = {k: sum(c[k] for c in per_client.values()) for k in ("uploaded_bytes", "downloaded_bytes", "messages")}
    images = sum(c["sampling"]["images"] for c in per_client.values())
    sampling_bytes = sum(c["sampling"]["uploaded_bytes"] + c["sampling"]["downloaded_bytes"]
                         for c in per_client.values())
    total["training_bytes"] = sum(c["training"]["uploaded_bytes"] + c["training"]["downloaded_bytes"]
                                  for c in per_client.values())
    total["sampling_bytes"] = sampling_bytes
    total["images"] = images
    total["sampling_bytes_per_image"] = _per_image(sampling_bytes, images)
    after = dict(sorted(again.items(), key=lambda kv: (len(kv[0]), kv[0])))
    return {"units": {"bytes": BYTES_UNIT}, "messages": sum(w is None for w in uncounted(records)),
            "per_client": per_client, "totals": total, "after_restarts": after}
