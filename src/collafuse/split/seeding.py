"""Random streams: public ones derived from the configured seeds, and a client's secret ones.

Two kinds of randomness, with different owners (docs/protocol.md, "Seeds: shared and secret"):

- **shared** (``derive_seed`` / ``generator``): the data partition, the server's model init, training noise and
  sampling noise. They come from ``[seeds]`` in the run configuration, which the server holds too, so nothing a
  client must hide may come from them.
- **secret** (``ClientSecret``): each client's upload noise, model init, training noise and sampling noise. They
  come from 32 bytes of OS entropy (``secrets.token_bytes``) made on the client the first time it is needed and
  kept only in that client's own state (its checkpoint file in process, its ``state-dir`` over Flower). A seed the
  server can compute would let it rebuild the upload noise eps and recover x0 = (u - sqrt(1 - abar_s) eps) /
  sqrt(abar_s) exactly (split-protocol.md, Training).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import torch

SECRET_BYTES = 32  # 256 bits: far beyond any search over seeds the server could run
MIN_SECRET_BYTES = 16  # an explicit secret shorter than 128 bits is refused


def derive_seed(base: int, *names: object) -> int:
    """A 63-bit seed from a base seed and names, e.g. ``derive_seed(seeds.noise, "server")``.

    Hashing (not ``base + i``) keeps the streams of different nodes and purposes unrelated.
    """
    text = "/".join([str(base), *map(str, names)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(base: int, *names: object) -> torch.Generator:
    """A CPU generator: the same stream on every device, so CPU and CUDA runs see the same noise."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(base, *names))


class SecretError(ValueError):
    """A client secret is malformed (wrong length, not hex) or does not match the client's saved state."""


class ClientSecret:
    """A client's secret: the root of every random stream the server must not be able to reproduce.

    Streams are HMAC-SHA256(secret, purpose/names) truncated to 63 bits (RFC 2104): without the key, the server
    can neither compute a stream nor tell one from random, whatever public names (node id, ``[seeds]``) go in.

    Args:
        key (`bytes`): at least 16 bytes. ``ClientSecret.new()`` draws 32 from the OS.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_SECRET_BYTES:
            n = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
            raise SecretError(f"client secret has {n} bytes (allowed: at least {MIN_SECRET_BYTES} bytes)")
        self._key = bytes(key)

    @classmethod
    def new(cls) -> ClientSecret:
        """A fresh secret from the operating system's entropy source."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def from_hex(cls, text: str, where: str = "client secret") -> ClientSecret:
        try:
            key = bytes.fromhex(text.strip())
        except (ValueError, AttributeError):
            raise SecretError(f"{where} is not a hex string (allowed: {2 * MIN_SECRET_BYTES} or more hex digits, "
                              f"e.g. from 'collafuse secrets')") from None
        if len(key) < MIN_SECRET_BYTES:
            raise SecretError(f"{where} has {len(key)} bytes (allowed: at least {MIN_SECRET_BYTES} bytes, "
                              f"{2 * MIN_SECRET_BYTES} hex digits)")
        return cls(key)

    def hex(self) -> str:
        return self._key.hex()

    def seed(self, *names: object) -> int:
        """A 63-bit seed for the stream named ``names`` (e.g. ``("upload", 1)``)."""
        msg = "/".join(map(str, names)).encode()
        return int.from_bytes(hmac.new(self._key, msg, hashlib.sha256).digest()[:8], "little") >> 1

    def generator(self, *names: object) -> torch.Generator:
        """A CPU generator for the stream named ``names`` (same numbers on every device)."""
        return torch.Generator(device="cpu").manual_seed(self.seed(*names))

    # -- state: a uint8 tensor in the client's own checkpoint file ----------------------------------------------------
    def tensor(self) -> torch.Tensor:
        return torch.tensor(list(self._key), dtype=torch.uint8)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> ClientSecret:
        return cls(bytes(t.to(torch.uint8).tolist()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClientSecret) and hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:  # never print the key (logs, tracebacks, reports)
        return "ClientSecret(<hidden>)"


def read_secret_file(path: Path) -> ClientSecret:
    """An explicit secret from a client-side file holding one hex line (``collafuse secrets --clients 1``'s value)."""
    path = Path(path)
    if not path.is_file():
        raise SecretError(f"secret file '{path}' does not exist (allowed: a file holding the client's secret as hex)")
    return ClientSecret.from_hex(path.read_text(), f"secret file {path}")


def load_or_create_secret(path: Path) -> ClientSecret:
    """The secret kept in ``path`` (hex, one line); made from OS entropy and written atomically (mode 0600) when
    the file does not exist yet, before anything derived from it can leave the client."""
    from .checkpoint import write_text_atomic  # checkpoint imports torch/safetensors only; no cycle

    path = Path(path)
    if path.is_file():
        return read_secret_file(path)
    secret = ClientSecret.new()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, secret.hex() + "\n", mode=0o600)
    return secret


def read_secrets_file(path: Path) -> dict[int, ClientSecret]:
    """Explicit client secrets for a reproducible in-process experiment: a TOML file ``client0 = "hex..."``.

    Client-side only: it is read by the process that plays the clients and never written into the run
    directory, the shared config or the report (only its path is)."""
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise SecretError(f"secrets file '{path}' does not exist (write one with 'collafuse secrets --out {path}')")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SecretError(f"secrets file '{path}' is not valid TOML: {e}") from None
    out = {}
    for key, value in data.items():
        if not (key.startswith("client") and key[6:].isdigit()) or not isinstance(value, str):
            raise SecretError(f"secrets file '{path}': {key} = ... is invalid "
                              f"(allowed: client<N> = \"<hex secret>\")")
        out[int(key[6:])] = ClientSecret.from_hex(value, f"secrets file '{path}' key {key}")
    return out


def write_secrets_file(path: Path, num_clients: int) -> dict[int, ClientSecret]:
    """Fresh secrets for ``num_clients`` clients, written to ``path`` (mode 0600); refuses to overwrite."""
    from .checkpoint import write_text_atomic

    path = Path(path)
    if path.exists():
        raise SecretError(f"secrets file '{path}' already exists (refusing to overwrite client secrets)")
    out = {i: ClientSecret.new() for i in range(num_clients)}
    lines = ["# CollaFuse client secrets: client-side only. Never give this file to the server.",
             *(f'client{i} = "{s.hex()}"' for i, s in out.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n", mode=0o600)
    return out
