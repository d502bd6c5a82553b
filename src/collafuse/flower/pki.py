"""Keys and certificates for a Flower deployment with TLS and SuperNode authentication, made with ``cryptography``
(a Flower dependency), so no openssl or ssh-keygen binary is needed.

- a local certificate authority (``ca.crt``, ``ca.key``): what SuperNodes and ``flwr`` trust;
- the SuperLink's certificate (``server.pem``, ``server.key``), signed by that CA, valid for the given IP addresses
  and DNS names (subjectAltName);
- one ECDSA key pair per SuperNode (``keys/<name>``, OpenSSH private key; ``keys/<name>.pub``, OpenSSH public key):
  the public key is registered with the SuperLink (``flwr supernode register``), the private key stays on the node.

For a loopback demo everything is made on one machine. For real machines, make the CA and server certificate where
the SuperLink runs (with its address in ``hosts``), copy only ``ca.crt`` to each client site, and let each site make
its own node key pair and send only the ``.pub`` file to the server operator.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    tmp.replace(path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def make_ca(out: Path, days: int = 30, name: str = "collafuse-local-ca") -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(out / "ca.key", _pem_key(key), private=True)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return out / "ca.crt", out / "ca.key"


def make_server_cert(out: Path, hosts: list[str], days: int = 30) -> tuple[Path, Path]:
    """A SuperLink certificate signed by ``out/ca.*`` for ``hosts`` (IP addresses or DNS names)."""
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    return out / "server.pem", out / "server.key"


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair: ECDSA P-384, OpenSSH formats (what ``flower-supernode
    --auth-supernode-private-key`` and ``flwr supernode register`` read)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / "keys" / name, priv, private=True)
    _write(out / "keys" / f"{name}.pub", pub + b"\n")
    return out / "keys" / name, out / "keys" / f"{name}.pub"


def make_loopback_pki(out: Path, nodes: list[str], hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict:
    """Everything a loopback demo needs: CA, server certificate for ``hosts``, one key pair per node name."""
    out = Path(out)
    make_ca(out)
    cert, key = make_server_cert(out, list(hosts))
    keys = {n: make_node_key(out, n) for n in nodes}
    return {"ca": out / "ca.crt", "server_cert": cert, "server_key": key, "node_keys": keys}
