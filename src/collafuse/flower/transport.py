"""``FlowerTransport``: the server side's ``Transport`` over a Flower ``Grid`` (the ServerApp's handle on the nodes).

Flower addresses nodes by numeric node ids that change when a SuperNode restarts; the protocol addresses clients
as ``client<i>``. Before every exchange the transport looks for nodes it has not met and sends each a
``join_request``; the node's ``join`` reply names its client (from that node's own ``--node-config``). A node that
names a client outside the run, or a client another live node already is, is refused and not asked again. A node
that disappears is forgotten, so a client that rejoins on a new node id is found again.

A batch of requests is pushed at once and its replies pulled as they come (Flower delivers them concurrently; a
message costs about 0.1 s in simulation and seconds in deployment, so the protocol's messages are coarse). A node
that does not answer within ``reply_timeout`` seconds, or whose ClientApp fails, is reported ``unavailable`` for
that exchange; a reply that does not decode or fails ``check_message`` is logged as rejected and reported refused.
Nothing a node sends raises: decoding and checking raise only ``ProtocolError``, and as a last line of defence at
this trust boundary any other exception while reading a reply is logged with its traceback and treated the same.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

from flwr.app import Message as FlowerMessage
from flwr.app import RecordDict

from ..split.protocol import (
    ANY_CLIENT,
    SERVER,
    Message,
    ProtocolError,
    bounded_reason,
    check_message,
    client_index,
    show,
)
from ..split.transport import Delivery, MessageLog, T, Transport
from .codec import MESSAGE_TYPE, decode, encode

logger = logging.getLogger("collafuse.flower")


class FlowerTransport(Transport):
    """Args:
        grid (`flwr.serverapp.Grid`): the ServerApp's grid.
        log (`MessageLog`): the server's audit log.
        num_clients (`int`): clients of the run; nodes claiming ``client<i>`` with i >= num_clients are refused.
        reply_timeout (`float`, defaults to 600): seconds to wait for the replies of one exchange.
        poll_interval (`float`, defaults to 0.05): seconds between pulls while replies are outstanding.
        algorithm (`str`, defaults to ``"collafuse"``): the run's ``split.algorithm``: which kinds may cross.
        overlap (`bool`, defaults to True): run ``exchange_while``'s work (the server's steps) while the clients
            take theirs; False runs it after the replies are in, as the in-process loop does (same results).
    """

    def __init__(self, grid, log: MessageLog, num_clients: int, reply_timeout: float = 600.0,
                 poll_interval: float = 0.05, algorithm: str = "collafuse", overlap: bool = True):
        super().__init__(log, algorithm)
        self.overlap = overlap
        self.poll_interval = poll_interval
        self.grid = grid
        self.num_clients = num_clients
        self.reply_timeout = reply_timeout
        self.nodes: dict[str, int] = {}  # client id -> Flower node id
        self.refused: set[int] = set()  # node ids that joined as something they may not be

    # -- who is who ------------------------------------------------------------------------------------------------
    def discover(self) -> None:
        """Meet nodes that connected since the last call; forget nodes that left."""
        live = set(self.grid.get_node_ids())
        for client, node in list(self.nodes.items()):
            if node not in live:
                logger.warning("%s (node %s) left", client, node)
                del self.nodes[client]
        new = sorted(live - set(self.nodes.values()) - self.refused)
        if not new:
            return
        request = Message("join_request", SERVER, ANY_CLIENT)
        check_message(request, self.algorithm)
        out = [FlowerMessage(encode(request), dst_node_id=n, message_type=MESSAGE_TYPE) for n in new]
        got = self._send_and_collect(out)
        for node, mid in zip(new, got["ids"], strict=False):
            r = got["replies"].get(mid)
            if r is None:
                continue  # not answering yet: asked again at the next discovery
            if r.has_error():  # the node's ClientApp failed (e.g. a bad node config): ask again next time
                logger.warning("node %s could not join: %s", node, _short_error(r.error.reason))
                continue
            try:
                msg = decode(r.content)
                check_message(msg, self.algorithm)
                if msg.kind != "join":
                    raise ProtocolError(f"expected join, got {msg.kind}")
                index = client_index(msg.sender)
                if index >= self.num_clients:
                    raise ProtocolError(f"{msg.sender} is not a client of this run ({self.num_clients} clients)")
                if msg.sender in self.nodes:
                    raise ProtocolError(f"{msg.sender} is already connected as node {self.nodes[msg.sender]}")
            except ProtocolError as e:
                logger.warning("refused node %s: %s", node, e)
                self._reject(f"node{node}", str(e))
                self.refused.add(node)
                continue
            except Exception:  # noqa: BLE001 - the trust boundary: no reply may end the run
                logger.exception("refused node %s: its join reply could not be read", node)
                self._reject(f"node{node}", "its join reply could not be read (see the ServerApp log)")
                self.refused.add(node)
                continue
            self.log.append(msg)
            self.nodes[msg.sender] = node
            logger.info("%s joined as node %s", msg.sender, node)

    def wait_for_clients(self, n: int, timeout: float, poll: float = 1.0) -> list[str]:
        """Block until ``n`` clients have joined or ``timeout`` seconds pass; returns the clients present."""
        end = time.monotonic() + timeout
        while True:
            self.discover()
            if len(self.nodes) >= n or time.monotonic() >= end:
                return sorted(self.nodes, key=client_index)
            time.sleep(poll)

    # -- requests --------------------------------------------------------------------------------------------------
    def _send_and_collect(self, out: list[FlowerMessage], work: Callable[[], T] | None = None) -> dict:
        """Push ``out``; run ``work`` (if any) in a second thread while this one pulls until every reply is in or
        ``reply_timeout`` passes. Returns the replies by message id, each reply's seconds since the push, and what
        ``work`` returned (an exception in it is raised here, after the replies are in).

        Replies are matched by ``reply_to_message_id``: when a node dies, Flower's error reply comes from the
        SuperLink (node id 1), not from the node."""
        ids = [i for i in self.grid.push_messages(out) if i] if out else []
        pushed = time.monotonic()
        done: dict = {}

        def run() -> None:
            try:
                done["value"] = work()
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread below)
                done["error"] = e

        # torch releases the GIL in its kernels, so the server's steps and the pulls share the process fairly;
        # a daemon thread, so that Ctrl-C in this thread ends the ServerApp (its last checkpoint stays the truth).
        worker = threading.Thread(target=run, name="collafuse-overlapped-work", daemon=True)
        if work is not None:
            worker.start()
        waiting, replies, seconds = set(ids), {}, {}

        def pull() -> None:
            for r in self.grid.pull_messages(list(waiting)):
                replies[r.metadata.reply_to_message_id] = r
                seconds[r.metadata.reply_to_message_id] = time.monotonic() - pushed
                waiting.discard(r.metadata.reply_to_message_id)

        while waiting and time.monotonic() < pushed + self.reply_timeout:
            pull()
            if waiting:
                time.sleep(self.poll_interval)
        if work is not None:
            worker.join()
        if waiting:  # the work outlasted the timeout: what came in meanwhile is still a reply in time
            pull()
        if "error" in done:
            raise done["error"]
        return {"ids": ids, "replies": replies, "seconds": seconds, "work": done.get("value")}

    def exchange(self, msgs: list[Message]) -> list[Delivery]:
        return self._exchange(msgs, None)[0]

    def exchange_while(self, msgs: list[Message], work: Callable[[], T]) -> tuple[list[Delivery], T]:
        """Push ``msgs`` and, with ``overlap``, run ``work`` while the nodes answer (``_send_and_collect``);
        without it, run ``work`` once the replies are in."""
        if self.overlap:
            return self._exchange(msgs, work)
        return self.exchange(msgs), work()

    def _exchange(self, msgs: list[Message], work: Callable[[], T] | None) -> tuple[list[Delivery], T | None]:
        """Each delivery's seconds run from the push to its reply."""
        self.discover()
        results: dict[int, Delivery] = {}
        sent: list[tuple[int, str]] = []  # (index in msgs, client id), in push order
        out, busy = [], set()
        for i, msg in enumerate(msgs):
            check_message(msg, self.algorithm)  # our own message: failing here is a bug on this side, so it raises
            node = self.nodes.get(msg.receiver)
            if node is None or node in busy:
                results[i] = Delivery(msg, error=f"unavailable: {msg.receiver} is not connected")
                continue
            busy.add(node)
            self.log.append(msg)
            sent.append((i, msg.receiver))
            out.append(FlowerMessage(encode(msg), dst_node_id=node, message_type=MESSAGE_TYPE))
        t0 = time.perf_counter()
        got = self._send_and_collect(out, work)
        seconds = time.perf_counter() - t0
        for (i, client), mid in zip(sent, got["ids"], strict=False):
            r = got["replies"].get(mid)
            results[i] = (self._receive(msgs[i], client, r, got["seconds"][mid]) if r is not None else
                          Delivery(msgs[i], error=f"unavailable: no reply from {client} within "
                                                  f"{self.reply_timeout:g} s", seconds=seconds))
        for i, client in sent[len(got["ids"]):]:
            results[i] = Delivery(msgs[i], error=f"unavailable: {client} could not be reached", seconds=seconds)
        return [results[i] for i in range(len(msgs))], got["work"]

    def _receive(self, request: Message, client: str, r: FlowerMessage, seconds: float) -> Delivery:
        if r.has_error():
            return Delivery(request, error=f"unavailable: {client} failed ({_short_error(r.error.reason)})",
                            seconds=seconds)
        try:
            if len(r.content.keys()) == 0:
                return Delivery(request, seconds=seconds)  # the role had nothing to say (e.g. after an error notice)
            msg = decode(r.content)
            if msg.sender != client or msg.receiver != SERVER:
                raise ProtocolError(f"reply claims to come from {show(msg.sender)} to {show(msg.receiver)}, "
                                    f"but node {r.metadata.src_node_id} is {client}")
            check_message(msg, self.algorithm)
        except ProtocolError as e:
            logger.warning("refused reply from %s: %s", client, e)
            self._reject(client, str(e))
            return Delivery(request, error=f"refused reply from {client}: {e}", seconds=seconds, refused=True)
        except Exception:  # noqa: BLE001 - the trust boundary: decode raises only ProtocolError, but no reply may
            # end the ServerApp run, whatever a bug in a library under it raises; it is refused like a malformed one
            logger.exception("refused reply from %s: it could not be read", client)
            reason = "its reply could not be read (see the ServerApp log)"
            self._reject(client, reason)
            return Delivery(request, error=f"refused reply from {client}: {reason}", seconds=seconds, refused=True)
        self.log.append(msg)
        if msg.kind == "error":
            return Delivery(request, error=f"{client} refused {request.kind}: {msg.meta['reason']}", seconds=seconds)
        return Delivery(request, msg, seconds=seconds)

    def _reject(self, sender: str, reason: str) -> None:
        """The audit entry of a refused reply: a stub from ``sender`` (the reply itself may not even be a message)
        marked ``rejected`` with the reason."""
        self.log.append(Message("error", sender, SERVER, meta={"reason": bounded_reason(reason)}), rejected=reason)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _short_error(reason: object, limit: int = 300) -> str:
    """Flower's error reason for a failed ClientApp is a whole (Ray) traceback with terminal colours; events and
    logs keep its last line, plain and bounded."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(reason)).splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def empty_reply() -> RecordDict:
    """The content a ClientApp returns when its role has nothing to send back."""
    return RecordDict()
