"""A site process: one long-lived process per deployed SuperNode that keeps this node's ``ClientNode`` in memory.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message, in every isolation mode (it pulls one
task with a one-time token and exits). Building the ``ClientNode`` there means importing torch and diffusers and
reloading the client's images, model, optimizer and EMA for each message: seconds per exchange, the bulk of the
deployment's 1.33x cost per round (docs/flower.md). So the ClientApp forwards instead:

    flwr-clientapp (per message, imports flwr and this module only: no torch)
        --- the message's RecordDict as protobuf bytes, over an authenticated loopback connection --->
    site process (long-lived, ``python -m collafuse.flower.site``): ClientNode.handle, the same code as before
        <--- the reply's RecordDict as protobuf bytes ---

The site's state still goes to disk after every message that changes it (``ClientNode.save``, atomic), so a site
that dies loses nothing: the next message starts a new one from the node's checkpoint, as a fresh ClientApp did.

Lifetime and identity, all in ``<state-dir>/site/`` (the node's own directory, which already holds its secret):

- ``authkey`` (0600): 32 bytes from OS entropy; the connection's HMAC challenge (``multiprocessing.connection``)
  proves both ends hold it, so no other local process can talk to the site or pose as one;
- ``<key>.addr``: the listening loopback port and the site's pid. ``key`` hashes the run config, the node config and
  the working directory: a new run or a changed config gets its own site, and the old one idles out;
- ``<key>.log``: the site's own output.

A site exits when the process it watches is gone (the ClientApp's parent, ``flower-superexec``, which Flower stops
with its SuperNode), after ``site-idle-timeout`` seconds without a message, or on a ``stop`` request; never in the
middle of a message. Only bytes cross the connection (``send_bytes``/``recv_bytes``), never pickles.

Node config keys (``flower-supernode --node-config``), beside those of ``task``:

- ``site-process`` (bool, default true for a deployed node, one with ``client-id`` and no ``partition-id``): false
  handles each message in the ClientApp's own process, as simulation always does;
- ``site-idle-timeout`` (seconds, default 1800);
- ``site-start-timeout`` (seconds, default 600): how long the first message waits for a new site to load.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client as Connect
from multiprocessing.connection import Listener
from pathlib import Path

import psutil

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_DEFAULT_IDLE_S = 1800.0
_DEFAULT_START_S = 600.0


class SiteError(RuntimeError):
    """A site process could not be started or reached, or failed inside a message; the text says which."""


def _node_index(node_config: Mapping) -> int | None:
    for key in ("client-id", "partition-id"):
        if node_config.get(key) is not None:
            try:
                return int(node_config[key])
            except (TypeError, ValueError):
                return None  # ClientNode names the key and the value; the in-process path raises it
    return None


def uses_site_process(node_config: Mapping) -> bool:
    """Whether this node's messages go to a site process (see the module docstring for the default)."""
    v = node_config.get("site-process")
    if v is None:
        return "client-id" in node_config and "partition-id" not in node_config
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE or s in _FALSE:
        return s in _TRUE
    raise ValueError(f"node config site-process = {v!r} is invalid (allowed: true or false)")


def _seconds(node_config: Mapping, key: str, default: float) -> float:
    v = node_config.get(key, default)
    try:
        s = float(v)
    except (TypeError, ValueError):
        s = float("nan")
    if not s > 0 or s == float("inf"):
        raise ValueError(f"node config {key} = {v!r} is invalid (allowed: a number of seconds > 0)")
    return s


def site_dir(run_config: Mapping, node_config: Mapping) -> Path | None:
    """``<state-dir>/site``, with ``task.ClientNode``'s default state directory; None for an index that is not an
    integer (the in-process path then reports the bad key)."""
    index = _node_index(node_config)
    if index is None:
        return None
    state = node_config.get("state-dir") or Path(str(run_config.get("out", "runs/flower"))) / "nodes" / f"client{index}"
    return Path(str(state)).resolve() / "site"


def site_key(run_config: Mapping, node_config: Mapping) -> str:
    """Which site serves these configs: a digest of both and of the working directory (relative paths in them are
    read from it)."""
    blob = json.dumps({"run": {k: str(v) for k, v in run_config.items()},
                       "node": {k: str(v) for k, v in node_config.items()}, "cwd": os.getcwd()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _authkey(directory: Path) -> bytes:
    """The site directory's authkey, made once from OS entropy (under the spawn lock, so never twice)."""
    path = directory / "authkey"
    if not path.exists():
        fd = os.open(path.with_name("authkey.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path.with_name("authkey.tmp"), path)
    return path.read_bytes()


# The two writers below restate split.checkpoint.write_text_atomic on purpose: that module imports torch, and the
# ClientApp's forwarder must not (its whole point is a start-up without torch).
def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class SiteHandle:
    """The ClientApp's side: find this node's site process (starting one if there is none) and exchange bytes.

    Args:
        run_config (`Mapping`): the run config of the message's Context.
        node_config (`Mapping`): the node config of the message's Context.
        watch_pid (`int`): the process whose end ends a new site (the ClientApp passes its parent,
            ``flower-superexec``, which lives as long as the SuperNode).
    """

    def __init__(self, run_config: Mapping, node_config: Mapping, watch_pid: int):
        self.run_config, self.node_config, self.watch_pid = dict(run_config), dict(node_config), watch_pid
        directory = site_dir(run_config, node_config)
        if directory is None:
            raise ValueError("node config client-id is not an integer")
        self.dir = directory
        self.key = site_key(run_config, node_config)
        self.addr_file = self.dir / f"{self.key}.addr"
        self.idle_s = _seconds(node_config, "site-idle-timeout", _DEFAULT_IDLE_S)
        self.start_s = _seconds(node_config, "site-start-timeout", _DEFAULT_START_S)

    def _connect(self, authkey: bytes):
        try:
            addr = json.loads(self.addr_file.read_text())
            if not psutil.pid_exists(int(addr["pid"])):
                return None
            return Connect(("127.0.0.1", int(addr["port"])), family="AF_INET", authkey=authkey)
        except (OSError, ValueError, KeyError, TypeError, EOFError, AuthenticationError):
            return None  # no site, a stale address, or one that just exited: start a new one

    def _spawn(self, authkey: bytes):
        log = open(self.dir / f"{self.key}.log", "ab")  # noqa: SIM115 (handed to the child, closed here after)
        spec = json.dumps({"run_config": self.run_config, "node_config": self.node_config, "key": self.key,
                           "dir": str(self.dir), "watch_pid": self.watch_pid, "idle_s": self.idle_s})
        proc = subprocess.Popen([sys.executable, "-m", "collafuse.flower.site", "--serve"], stdin=subprocess.PIPE,
                                stdout=log, stderr=subprocess.STDOUT, close_fds=True)
        log.close()
        proc.stdin.write(spec.encode())
        proc.stdin.close()
        deadline = time.monotonic() + self.start_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.dir / f"{self.key}.log").read_text(errors="replace").strip().splitlines()[-1:]
                raise SiteError(f"the site process exited with {proc.returncode} before serving: "
                                f"{tail[0] if tail else 'no output'} (log {self.dir / f'{self.key}.log'})")
            try:
                if json.loads(self.addr_file.read_text()).get("pid") == proc.pid:
                    conn = self._connect(authkey)
                    if conn is not None:
                        return conn
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.kill()
        raise SiteError(f"the site process did not serve within site-start-timeout = {self.start_s:g} s "
                        f"(log {self.dir / f'{self.key}.log'})")

    def connection(self):
        """An authenticated connection to this node's site, started now if none is running."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "spawn.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one site per key even if two ClientApps race
            authkey = _authkey(self.dir)
            return self._connect(authkey) or self._spawn(authkey)

    def exchange(self, payload: bytes) -> bytes:
        """Send one message's bytes and return the reply's; ``SiteError`` if the site failed inside it."""
        conn = self.connection()
        try:
            conn.send_bytes(json.dumps({"op": "message", "key": self.key}).encode())
            conn.send_bytes(payload)
            status, body = conn.recv_bytes(), conn.recv_bytes()
        except (OSError, EOFError) as e:  # the site died mid-message: its last save is intact, the server retries
            raise SiteError(f"the site process ended during a message ({type(e).__name__})") from None
        finally:
            conn.close()
        if status != b"ok":
            raise SiteError(body.decode(errors="replace"))
        return body


def stop_site(run_config: Mapping, node_config: Mapping) -> bool:
    """Ask this node's site (if one runs) to exit between messages; True if one answered."""
    directory = site_dir(run_config, node_config)
    if directory is None or not (directory / "authkey").exists():
        return False
    handle = SiteHandle(run_config, node_config, os.getpid())
    conn = handle._connect((directory / "authkey").read_bytes())
    if conn is None:
        return False
    try:
        conn.send_bytes(json.dumps({"op": "stop", "key": handle.key}).encode())
        conn.recv_bytes()
    except (OSError, EOFError):
        pass
    finally:
        conn.close()
    return True


def forward(content, run_config: Mapping, node_config: Mapping, watch_pid: int):
    """The ClientApp's work in site mode: the message's RecordDict to the site, the reply's RecordDict back."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

    reply = SiteHandle(run_config, node_config, watch_pid).exchange(recorddict_to_proto(content).SerializeToString())
    proto = ProtoRecordDict()
    proto.ParseFromString(reply)
    return recorddict_from_proto(proto)


# -- the site process ------------------------------------------------------------------------------------------------
def serve(spec: dict) -> int:
    """Load the ClientNode once, then answer messages until the watched process ends, idling out, or ``stop``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

    from ..config import ConfigError
    from .task import ClientNode, config_from_run_config, encode_reply

    run_config, node_config = spec["run_config"], spec["node_config"]
    directory, key = Path(spec["dir"]), spec["key"]
    try:
        node = ClientNode(config_from_run_config(run_config), node_config, str(run_config.get("out", "runs/flower")))
    except ConfigError as e:  # one line, which the ClientApp raises to Flower as the in-process path would
        print(f"ConfigError: {e}", flush=True)
        return 2
    listener = Listener(("127.0.0.1", 0), family="AF_INET", authkey=(directory / "authkey").read_bytes())
    busy = threading.Lock()  # held while a message is handled: the watchdog never exits in the middle of one
    last = [time.monotonic()]

    def watchdog() -> None:
        while True:
            time.sleep(0.5)
            gone = not psutil.pid_exists(int(spec["watch_pid"]))
            idle = time.monotonic() - last[0] > float(spec["idle_s"])
            if (gone or idle) and busy.acquire(blocking=False):
                print(f"[site {key}] exiting: {'watched process ended' if gone else 'idle'}", flush=True)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    _write_json_atomic(directory / f"{key}.addr", {"port": listener.address[1], "pid": os.getpid()})
    print(f"[site {key}] serving {node.role.node_id} on 127.0.0.1:{listener.address[1]}", flush=True)
    while True:
        try:
            conn = listener.accept()
        except Exception as e:  # noqa: BLE001 (a failed handshake: a peer without the authkey, refused)
            print(f"[site {key}] refused a connection: {type(e).__name__}: {e}", flush=True)
            continue
        with busy, conn:
            try:
                head = json.loads(conn.recv_bytes(1 << 16))
                if head.get("key") != key:
                    conn.send_bytes(b"error")
                    conn.send_bytes(f"site {key} does not serve configuration {head.get('key')!r}".encode())
                    continue
                if head.get("op") == "stop":
                    conn.send_bytes(b"ok")
                    print(f"[site {key}] exiting: stop requested", flush=True)
                    return 0
                proto = ProtoRecordDict()
                proto.ParseFromString(conn.recv_bytes())
                try:
                    reply = encode_reply(node.handle(recorddict_from_proto(proto)))
                    status, body = b"ok", recorddict_to_proto(reply).SerializeToString()
                except Exception as e:  # noqa: BLE001 (as a failing ClientApp: the error goes back to Flower)
                    status, body = b"error", f"{type(e).__name__}: {e}".encode()
                conn.send_bytes(status)
                conn.send_bytes(body)
            except (OSError, EOFError, ValueError) as e:
                print(f"[site {key}] dropped a connection: {type(e).__name__}: {e}", flush=True)
            finally:
                last[0] = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A CollaFuse site process (started by the ClientApp; see the module "
                                            "docstring). Reads its spec as JSON on stdin.")
    p.add_argument("--serve", action="store_true", required=True)
    p.parse_args(argv)
    return serve(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    sys.exit(main())
