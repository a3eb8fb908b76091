"""`llmesh certs --out DIR --hosts H1,H2`: a cluster CA, per-service certificates and a
cluster secret for a deployment (docs/security.md).

Writes `ca.pem` / `ca-key.pem`, `<role>.pem` / `<role>-key.pem` for the scheduler,
worker, gateway and operator roles (each valid for every host given, plus localhost and
127.0.0.1) and `cluster-secret`; keys and the secret are 0600. Services then take
`--cluster-tls-dir DIR --cluster-secret-file DIR/cluster-secret` (or the
LLMESH_CLUSTER_TLS_DIR / LLMESH_CLUSTER_SECRET_FILE variables). Keep `ca-key.pem` off the
serving machines: it is needed only to sign more certificates.
"""

from __future__ import annotations

import sys
from pathlib import Path

from services.common.cluster_tls import ROLES, make_certs

HELP = "create a cluster CA, per-service certificates and a cluster secret in --out DIR"


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument(
        "--hosts",
        default="",
        help="comma-separated host names / IPs the services are reached at "
        "(localhost and 127.0.0.1 are always included)",
    )
    parser.add_argument(
        "--roles",
        default=",".join(ROLES),
        help=f"certificates to make (default {','.join(ROLES)})",
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite an existing CA in --out (revokes it)"
    )


def run(args) -> int:
    out = Path(args.out)
    if (out / "ca.pem").exists() and not args.force:
        print(
            f"llmesh certs: {out / 'ca.pem'} exists; --force replaces the CA (every "
            "certificate it signed stops working)",
            file=sys.stderr,
        )
        return 2
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    try:
        written = make_certs(out, hosts, roles)
    except OSError as exc:
        print(f"llmesh certs: {exc}", file=sys.stderr)
        return 1
    print(f"llmesh certs: wrote {', '.join(written)} in {out}")
    print(
        f"  services: --cluster-tls-dir {out} --cluster-secret-file {out / 'cluster-secret'}\n"
        f"  clients of a TLS gateway: root_certificates = {out / 'ca.pem'}; "
        f"gateway: --tls-cert {out / 'gateway.pem'} --tls-key {out / 'gateway-key.pem'}"
    )
    return 0
