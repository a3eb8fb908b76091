"""`llmesh-gateway` / `python -m gateway`: run the client-facing gateway."""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.api_keys import load_api_keys
from gateway.config import GatewayConfig
from services.common.cluster_auth import add_cluster_auth_flags, configure
from services.common.config import ConfigError, flag_type, load_config
from services.common.logging import setup_logging
from services.common.procs import die_with_parent
from services.common.telemetry_config import add_telemetry_flags
from services.common.tracing import setup_tracing, shutdown_tracing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh-gateway",
        description="llmesh gateway (client API). Every flag also reads LLMESH_GATEWAY_<FLAG>.",
    )
    parser.add_argument("--bind", help="host:port of the client API (port 0 = any free port)")
    parser.add_argument(
        "--http-bind",
        dest="http_bind",
        help="host:port of the OpenAI-compatible HTTP API (port 0 = any free port, '' = off)",
    )
    parser.add_argument("--http-max-body-bytes", dest="http_max_body_bytes", type=int)
    parser.add_argument(
        "--advertise-address", dest="advertise_address", help="address workers push outputs to"
    )
    parser.add_argument("--scheduler", dest="scheduler_address", help="scheduler host:port")
    parser.add_argument("--model", help="'tiny' or a checkpoint directory (for its tokenizer)")
    parser.add_argument("--max-inflight-requests", dest="max_inflight_requests", type=int)
    parser.add_argument("--max-waiting-per-instance", dest="max_waiting_per_instance", type=int)
    for name, annotation in (
        ("admission_retry_after_s", float),
        ("key_max_concurrent", int | None),
        ("key_rate_per_s", float | None),
        ("key_burst", int),
    ):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, type=flag_type(annotation, name, flag))
    parser.add_argument("--log-level", dest="log_level")
    add_telemetry_flags(parser)
    add_cluster_auth_flags(parser)
    parser.add_argument(
        "--api-keys-file",
        dest="api_keys_file",
        help="client API keys, one per line (name:key allowed); also "
        "$LLMESH_GATEWAY_API_KEYS (comma-separated); none = no client authentication",
    )
    parser.add_argument("--tls-cert", dest="tls_cert", help="TLS certificate of the client ports")
    parser.add_argument("--tls-key", dest="tls_key", help="its private key (PEM)")
    parser.add_argument(
        "--internal-bind",
        dest="internal_bind",
        help="with TLS: host:port where workers push outputs (default: any free port)",
    )
    parser.add_argument(
        "--ready-file", dest="ready_file", help="write the bound address here once serving"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = parse_args(argv)
    try:
        config = load_config(GatewayConfig, "GATEWAY", vars(args))
        configure(vars(args), role="gateway")  # no cluster secret: refuse to start
        load_api_keys(config.api_keys, config.api_keys_file)  # a bad key file: refuse too
    except ConfigError as exc:
        print(f"llmesh-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging("gateway", config.log_level)
    setup_tracing("llmesh-gateway", config.telemetry)
    from gateway.server import serve

    try:
        asyncio.run(serve(config))
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
