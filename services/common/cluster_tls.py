"""Cluster mTLS: the files a service uses, gRPC credentials from them, and `make_certs`.

`./llmesh certs --out DIR --hosts h1,h2` writes a cluster CA (`ca.pem`, `ca-key.pem`:
keep the key off the machines) and one certificate per service role (`scheduler`,
`worker`, `gateway`, `operator`: `<role>.pem` and `<role>-key.pem`), each valid for
every host given plus localhost/127.0.0.1 (servers present them, clients present them
as client certificates), and a fresh `cluster-secret`. A process given
`--cluster-tls-dir DIR` takes the CA and its role's pair from there; `--cluster-tls-ca/
-cert/-key` name the three files one by one. Internal ports then require a client
certificate signed by that CA, and internal channels verify the server's.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.config import ConfigError

ROLES = ("scheduler", "worker", "gateway", "operator")
VALID_DAYS = 825


def write_private_file(path: Path, value: str) -> None:
    """Write value to path readable by its owner only (created 0600, never widened)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of the cluster CA and this process's certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cluster TLS {what} {path}: unreadable ({exc})") from None


def resolve_tls(config, role: str) -> TlsFiles | None:
    """The TLS files ClusterAuthConfig `config` names for `role`, or None (no mTLS)."""
    if config.tls_ca:
        paths = (Path(config.tls_ca), Path(config.tls_cert), Path(config.tls_key))
    elif config.tls_dir:
        base = Path(config.tls_dir)
        paths = (base / "ca.pem", base / f"{role}.pem", base / f"{role}-key.pem")
    else:
        return None
    ca, cert, key = (_read(p, w) for p, w in zip(paths, ("CA", "cert", "key"), strict=True))
    return TlsFiles(ca, cert, key)


def server_tls_from_paths(cert: str, key: str) -> grpc.ServerCredentials | None:
    """Server-only TLS (no client certificate), e.g. the gateway's client-facing port."""
    if not cert:
        return None
    return grpc.ssl_server_credentials([(_read(Path(key), "key"), _read(Path(cert), "cert"))])


# -- certificate authority ---------------------------------------------------------------


def _names(hosts: list[str]):
    from cryptography import x509

    entries = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _certificate(subject_cn: str, public_key, issuer_cn: str, signing_key, *, is_ca, hosts):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(_names(hosts), critical=False).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def _write_pair(out: Path, name: str, cert, key) -> None:
    from cryptography.hazmat.primitives import serialization

    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(out / f"{name}-key.pem", pem.decode().rstrip("\n"))


def make_certs(out: Path, hosts: list[str], roles=ROLES, ca_name: str = "llmesh cluster CA"):
    """A new CA and one certificate per role for `hosts` in `out`; the files written."""
    from cryptography.hazmat.primitives.asymmetric import ec

    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, is_ca=True, hosts=[])
    _write_pair(out, "ca", ca_cert, ca_key)
    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(
            f"llmesh-{role}", key.public_key(), ca_name, ca_key, is_ca=False, hosts=hosts
        )
        _write_pair(out, role, cert, key)
    write_private_file(out / "cluster-secret", secrets.token_hex(32))
    return sorted(p.name for p in out.iterdir())
