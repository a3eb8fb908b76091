"""Who is a cluster member: the shared cluster secret and the HMAC every internal call carries.

Every llmesh process finds the secret the same way (`ClusterAuthConfig`, env prefix
`LLMESH_CLUSTER_`): `LLMESH_CLUSTER_SECRET` itself, else the file named by
`--cluster-secret-file` / `LLMESH_CLUSTER_SECRET_FILE`, else the per-user default file
`$XDG_STATE_HOME/llmesh/cluster-secret` (`~/.local/state/llmesh/...`), which
`./llmesh up` writes (mode 0600) when it is missing. A service with no secret refuses
to start (ConfigError saying how to make one).

The secret never travels. A call carries metadata

    x-llmesh-cluster-auth: v1 <unix seconds> <nonce> <hex HMAC-SHA256(secret, "v1|ts|nonce|method")>

and the server recomputes it for the method it serves, accepts a timestamp within
MAX_SKEW_S of its clock and compares in constant time (services.common.auth_interceptors).
A captured header is only good for the same method within that window: on an untrusted
network add mTLS (services.common.cluster_tls), which `ClusterAuthConfig.tls_*` turn on.

This module is torch-free and imports nothing from the services but config and TLS.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from services.common.cluster_tls import TlsFiles, resolve_tls, write_private_file
from services.common.config import ConfigError, load_config, require

METADATA_KEY = "x-llmesh-cluster-auth"
SCHEME = "v1"
MAX_SKEW_S = 300  # accepted clock difference between caller and server
MIN_SECRET_CHARS = 16
ENV_PREFIX = "CLUSTER"  # LLMESH_CLUSTER_SECRET, LLMESH_CLUSTER_SECRET_FILE, LLMESH_CLUSTER_TLS_*


def default_secret_file() -> Path:
    """The per-user file every process falls back to (`./llmesh up` writes it)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "llmesh" / "cluster-secret"


@dataclass(frozen=True)
class ClusterAuthConfig:
    """How this process proves, and checks, cluster membership (env LLMESH_CLUSTER_<FIELD>)."""

    secret: str = ""  # the cluster secret itself (prefer a file: env leaks into ps/inspect)
    secret_file: str = ""  # a file holding it; empty = default_secret_file()
    tls_dir: str = ""  # a directory from `./llmesh certs` (ca.pem, <service>.pem, -key.pem)
    tls_ca: str = ""  # the cluster CA (PEM); with tls_cert/tls_key: mTLS on internal ports
    tls_cert: str = ""  # this service's certificate (PEM), signed by the cluster CA
    tls_key: str = ""  # its private key (PEM)

    def __post_init__(self) -> None:
        given = [bool(self.tls_ca), bool(self.tls_cert), bool(self.tls_key)]
        require(
            all(given) or not any(given),
            "cluster TLS needs all of tls_ca, tls_cert and tls_key (or tls_dir), "
            f"got ca={self.tls_ca!r} cert={self.tls_cert!r} key={self.tls_key!r}",
        )


def no_secret_message(path: Path) -> str:
    return (
        f"no cluster secret: set LLMESH_CLUSTER_SECRET, or put one in {path} "
        "(--cluster-secret-file / LLMESH_CLUSTER_SECRET_FILE name another file). "
        "`./llmesh up` writes that file for a local mesh; for a deployment run "
        "`./llmesh certs --out DIR` (writes DIR/cluster-secret) and give every "
        "service the same file (docs/security.md)"
    )


def read_secret(config: ClusterAuthConfig) -> bytes:
    """The secret as bytes; ConfigError (saying how to make one) when there is none."""
    if config.secret:
        value, origin = config.secret.strip(), "LLMESH_CLUSTER_SECRET"
    else:
        path = Path(config.secret_file) if config.secret_file else default_secret_file()
        try:
            value, origin = path.read_text().strip(), str(path)
        except FileNotFoundError:
            raise ConfigError(no_secret_message(path)) from None
        except OSError as exc:
            raise ConfigError(f"cluster secret file {path}: unreadable ({exc})") from None
    require(
        len(value) >= MIN_SECRET_CHARS,
        f"cluster secret from {origin} has {len(value)} characters; "
        f"use at least {MIN_SECRET_CHARS} (e.g. `./llmesh certs --out DIR`)",
    )
    return value.encode()


def ensure_secret_file(path: Path | None = None) -> Path:
    """Create the secret file (0600, 32 random bytes as hex) unless it exists; its path."""
    path = path or default_secret_file()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private_file(path, secrets.token_hex(32))
    return path


def _mac(secret: bytes, timestamp: str, nonce: str, method: str) -> str:
    message = f"{SCHEME}|{timestamp}|{nonce}|{method}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, now: float | None = None) -> str:
    """The metadata value proving membership for one call of `method` (/pkg.Svc/Method)."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = secrets.token_hex(8)
    return f"{SCHEME} {timestamp} {nonce} {_mac(secret, timestamp, nonce, method)}"


def verify(secret: bytes, method: str, value: str | None, now: float | None = None) -> str:
    """ "" when `value` proves membership for `method`, else why not (for the log)."""
    if not value:
        return "no cluster credentials"
    parts = value.split(" ")
    if len(parts) != 4 or parts[0] != SCHEME or not parts[1].isdigit():
        return "malformed cluster credentials"
    _, timestamp, nonce, mac = parts
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > MAX_SKEW_S:
        return "cluster credentials expired (clock skew over MAX_SKEW_S?)"
    if not hmac.compare_digest(mac.encode(), _mac(secret, timestamp, nonce, method).encode()):
        return "wrong cluster credentials"
    return ""


@dataclass(frozen=True)
class ClusterCredentials:
    """What this process uses: the secret, and the cluster TLS material when configured."""

    secret: bytes
    tls: TlsFiles | None = None  # mTLS on internal ports, or None


def resolve(config: ClusterAuthConfig, role: str = "operator") -> ClusterCredentials:
    """The credentials `config` names for `role` (a service's kind, or "operator")."""
    return ClusterCredentials(read_secret(config), resolve_tls(config, role))


_installed: ClusterCredentials | None = None


def install(credentials: ClusterCredentials | None) -> None:
    """Make `credentials` this process's (None: found again from the environment)."""
    global _installed
    _installed = credentials


def configure(overrides: dict | None = None, role: str = "operator") -> ClusterCredentials:
    """Load ClusterAuthConfig (env, then `cluster.*` flag overrides), resolve, install.

    Every service's main() calls it with vars(args) and its kind; ConfigError when
    there is no secret (the service then refuses to start)."""
    flags = {
        key.split(".", 1)[1]: value
        for key, value in (overrides or {}).items()
        if key.startswith("cluster.")
    }
    credentials = resolve(load_config(ClusterAuthConfig, ENV_PREFIX, flags), role)
    install(credentials)
    return credentials


def current() -> ClusterCredentials:
    """This process's credentials, found from the environment on first use."""
    return _installed if _installed is not None else configure()


def add_cluster_auth_flags(parser) -> None:
    """The `cluster.*` flags every service and operator command takes."""
    group = parser.add_argument_group(
        "cluster membership (LLMESH_CLUSTER_<FIELD>; docs/security.md)"
    )
    group.add_argument(
        "--cluster-secret-file",
        dest="cluster.secret_file",
        help=f"file holding the cluster secret (default {default_secret_file()}; "
        "or $LLMESH_CLUSTER_SECRET)",
    )
    group.add_argument(
        "--cluster-tls-dir",
        dest="cluster.tls_dir",
        help="mTLS on internal ports with the files `./llmesh certs` wrote there",
    )
    group.add_argument("--cluster-tls-ca", dest="cluster.tls_ca", help="cluster CA (PEM)")
    group.add_argument("--cluster-tls-cert", dest="cluster.tls_cert", help="this service's cert")
    group.add_argument("--cluster-tls-key", dest="cluster.tls_key", help="its private key")
