"""`llmesh health`: exit 0 when a service answers gRPC health with SERVING.

The container image's HEALTHCHECK runs it (through deploy/docker/entrypoint.sh, which
passes the ready file its service writes once SERVING), and so can an operator or a
load balancer probe: `llmesh health 10.0.0.5:50061`. A service that is starting,
draining (SIGTERM: NOT_SERVING) or gone fails it with a line saying which. Also runs
as `python -m services.cli.health` (no subcommand table to build: cheap every 10 s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.cluster_auth import ENV_PREFIX, ClusterAuthConfig
from services.common.cluster_tls import resolve_tls
from services.common.config import load_config

HELP = "exit 0 if a service (ADDRESS, or the one that wrote --ready-file) is SERVING"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", nargs="?", help="host:port of the service's gRPC API")
    parser.add_argument(
        "--ready-file", help="the service's ready file (its address is read from it)"
    )
    parser.add_argument(
        "--service", default="", help="grpc.health.v1 service name (default: the whole server)"
    )
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the check")


def probe_address(args: argparse.Namespace) -> str:
    """The address to check: given, or read from the ready file. Raises ValueError."""
    if args.address:
        return args.address
    if not args.ready_file:
        raise ValueError("give an ADDRESS or --ready-file")
    try:
        return json.loads(Path(args.ready_file).read_text())["address"]
    except FileNotFoundError:
        raise ValueError(f"--ready-file {args.ready_file}: not written yet (starting)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--ready-file {args.ready_file}: unreadable ({exc})") from None


def _channel(address: str) -> grpc.Channel:
    """Plaintext, or TLS with this process's cluster certificate when cluster mTLS is
    configured (LLMESH_CLUSTER_TLS_*): health needs no cluster secret."""
    tls = resolve_tls(load_config(ClusterAuthConfig, ENV_PREFIX), "operator")
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials())


def check(address: str, service: str, timeout_s: float) -> str:
    """The service's status name (SERVING, NOT_SERVING, ...) or why it did not answer."""
    with _channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return f"no answer ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def run(args: argparse.Namespace) -> int:
    try:
        address = probe_address(args)
    except ValueError as exc:
        print(f"llmesh health: {exc}", file=sys.stderr)
        return 1
    status = check(address, args.service, args.timeout_s)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmesh health", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
