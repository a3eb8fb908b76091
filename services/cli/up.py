"""`llmesh up`: a whole mesh on this machine, one OS process per service.

Starts the scheduler, N workers and the gateway on loopback (the same way compose
runs them: `python -m <service> --flags`), waits until every one is healthy and the
gateway sees all workers, then shows a live table of the instances. Ctrl-C or SIGTERM
stops everything (gateway, workers, scheduler, in that order); children also get
SIGTERM from the kernel should this process die abruptly, so none is left behind.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from services.cli.status import fetch_cluster, render_table
from services.common.cluster_auth import ensure_secret_file
from services.common.procs import LocalMesh, ServiceStartError
from services.policies.presets import PRESETS

HELP = "start scheduler, gateway and workers on this machine and show a live cluster table"
REFRESH_S = 0.5


def add_arguments(parser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="number of workers (default 2)")
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (embedded, no download) or a checkpoint directory"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface every service binds (default loopback)"
    )
    parser.add_argument(
        "--gateway-port", type=int, default=50051, help="client API port (0 = any free port)"
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="OpenAI-compatible HTTP API port (0 = any free port)",
    )
    parser.add_argument(
        "--scheduler-port", type=int, default=50052, help="scheduler port (0 = any free port)"
    )
    parser.add_argument(
        "--log-dir", default=None, help="where each service logs (default: a new temp dir)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per worker (default: cores / workers)",
    )
    parser.add_argument(
        "--autoscale",
        action="store_true",
        help="let the scheduler start and drain workers with the load "
        "(--workers is then the minimum)",
    )
    parser.add_argument(
        "--max-workers", type=int, default=4, help="--autoscale: most workers (default 4)"
    )
    parser.add_argument(
        "--policy",
        default=None,
        choices=sorted(PRESETS),
        help="the scheduler's policy preset (default llmesh; llmesh and kunserve drop "
        "KunServe groups under overload, docs/kunserve.md)",
    )
    parser.add_argument(
        "--migration-policy",
        default=None,
        help="scheduler migration pairing: freeness (default) or none",
    )
    parser.add_argument(
        "--otlp-endpoint",
        default=None,
        help="send every service's traces to this OTLP/gRPC collector (e.g. "
        "http://127.0.0.1:4317, Jaeger's); sets OTEL_EXPORTER_OTLP_ENDPOINT for them",
    )
    parser.add_argument(
        "--api-keys-file",
        default=None,
        help="turn client authentication on: the gateway accepts these API keys "
        "(one per line; default off for the local demo, docs/security.md)",
    )
    parser.add_argument("--no-table", action="store_true", help="do not draw the live table")


class _StopRequested:
    """Set by SIGINT/SIGTERM; the main loop polls it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def run(args) -> int:
    if args.workers < 1:
        print(f"llmesh up: --workers={args.workers} must be >= 1", file=sys.stderr)
        return 2
    if args.autoscale and args.max_workers < args.workers:
        print(
            f"llmesh up: --max-workers={args.max_workers} must be >= --workers={args.workers}",
            file=sys.stderr,
        )
        return 2
    most_workers = args.max_workers if args.autoscale else args.workers
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // most_workers)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="llmesh-up-"))
    stop = _StopRequested()
    stop.install()
    worker_args = ("--torch-threads", str(threads))
    scheduler_args: tuple[str, ...] = ()
    if args.policy:
        scheduler_args += ("--policy", args.policy)
    if args.migration_policy:
        scheduler_args += ("--migration-policy", args.migration_policy)
    if args.autoscale:
        # The scheduler's provisioner starts (and stops) every worker.
        scheduler_args += (
            "--autoscale",
            "--min-instances", str(args.workers),
            "--max-instances", str(args.max_workers),
            "--worker-model", args.model,
            "--worker-args", " ".join(worker_args),
            "--worker-log-dir", str(log_dir / "workers"),
        )  # fmt: skip
    gateway_args: tuple[str, ...] = ()
    api_key = ""
    if args.api_keys_file:
        try:
            api_key = first_api_key(args.api_keys_file)
        except (OSError, ValueError) as exc:
            print(f"llmesh up: --api-keys-file: {exc}", file=sys.stderr)
            return 2
        gateway_args += ("--api-keys-file", args.api_keys_file)
    secret = cluster_secret_origin()
    mesh = LocalMesh(
        gateway_args=gateway_args,
        gateway_api_key=api_key,
        log_dir=log_dir,
        num_workers=0 if args.autoscale else args.workers,
        wait_instances=args.workers,
        model=args.model,
        host=args.host,
        scheduler_port=args.scheduler_port,
        gateway_port=args.gateway_port,
        gateway_http_port=args.http_port,
        worker_args=worker_args,
        scheduler_args=scheduler_args,
        # The standard variable: workers the auto-scaler starts inherit it too.
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": args.otlp_endpoint} if args.otlp_endpoint else {},
    )
    scaling = f", auto-scaling up to {args.max_workers}" if args.autoscale else ""
    print(
        f"llmesh: starting scheduler, {args.workers} worker(s){scaling} and gateway "
        f"(model {args.model}); logs in {log_dir}\n"
        f"llmesh: internal authentication on (cluster secret: {secret})"
    )
    try:
        mesh.start()
    except (ServiceStartError, OSError) as exc:
        print(f"llmesh up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    try:
        _print_banner(mesh, args)
        _watch(mesh, stop, show_table=not args.no_table and sys.stdout.isatty())
    finally:
        print("llmesh: stopping gateway, workers and scheduler ...", flush=True)
        mesh.stop()
        print("llmesh: stopped", flush=True)
    return 0


def _print_banner(mesh: LocalMesh, args) -> None:
    gateway = mesh.gateway_address
    default_gateway = gateway == "127.0.0.1:50051"
    flag = "" if default_gateway else f" --gateway {gateway}"
    metrics = "  ".join(
        f"{p.name}=http://{p.metrics_address}/metrics"
        for p in mesh.processes()
        if p.metrics_address
    )
    client_auth = (
        f"on (API keys from {args.api_keys_file}; send Authorization: Bearer <key>)"
        if args.api_keys_file
        else "off (any client may call the gateway; --api-keys-file turns it on)"
    )
    traces = (
        f"OTLP to {args.otlp_endpoint}" if args.otlp_endpoint else "not exported (--otlp-endpoint)"
    )
    print(
        f"\nllmesh is up: gateway {gateway}  scheduler {mesh.scheduler_address}  "
        f"workers {_worker_list(mesh)}\n"
        f"  metrics: {metrics}\n"
        f"  traces:  {traces}\n"
        f"  client authentication: {client_auth}\n"
        f'  try:  ./llmesh generate{flag} "Hello, llmesh" --max-tokens 16\n'
        f"        curl http://{mesh.gateway_http_address}/v1/completions -H 'Content-Type: application/json' "
        f'-d \'{{"model": "{args.model}", "prompt": "Hello", "max_tokens": 16}}\'\n'
        f"        ./llmesh status{'' if mesh.scheduler_address == '127.0.0.1:50052' else ' --scheduler ' + mesh.scheduler_address}\n"
        f"  OpenAI API: http://{mesh.gateway_http_address}/v1 (docs/http_api.md)\n"
        f"  Ctrl-C stops everything.\n",
        flush=True,
    )


def first_api_key(path: str) -> str:
    """A key of the file (`up` waits for the gateway through its client API with it)."""
    from gateway.api_keys import parse_keys

    keys = parse_keys(Path(path).read_text().splitlines(), path)
    if not keys:
        raise ValueError(f"{path} holds no key")
    return keys[0][1]


def cluster_secret_origin() -> str:
    """Where this mesh's processes find the cluster secret; writes the per-user default
    file (0600) when neither it nor LLMESH_CLUSTER_SECRET(_FILE) is there."""
    if os.environ.get("LLMESH_CLUSTER_SECRET"):
        return "$LLMESH_CLUSTER_SECRET"
    if os.environ.get("LLMESH_CLUSTER_SECRET_FILE"):
        return os.environ["LLMESH_CLUSTER_SECRET_FILE"]
    return str(ensure_secret_file())


def _worker_list(mesh: LocalMesh) -> str:
    try:
        rows, _ = fetch_cluster(mesh.scheduler_address, timeout_s=1.0)
    except grpc.RpcError:
        return ", ".join(f"{w.name}={w.address}" for w in mesh.workers)
    return ", ".join(f"{r.spec.instance_id}={r.spec.address}" for r in rows)


def _watch(mesh: LocalMesh, stop: _StopRequested, show_table: bool) -> None:
    """Until a stop signal: redraw the table, report services that exit on their own."""
    reported_dead: set[str] = set()
    live = None
    if show_table:
        from rich.live import Live

        live = Live(render_table([], "llmesh cluster"), refresh_per_second=4, transient=False)
        live.start()
    try:
        while not stop.event.wait(REFRESH_S):
            for proc in mesh.processes():
                if not proc.is_alive() and proc.name not in reported_dead:
                    reported_dead.add(proc.name)
                    message = f"llmesh: {proc.name} exited with code {proc.popen.returncode}; log: {proc.log_path}"
                    if live is not None:
                        live.console.print(message)
                    else:
                        print(message, flush=True)
            if live is not None:
                live.update(_table(mesh))
    finally:
        if live is not None:
            live.stop()
    if stop.signal_name:
        print(f"llmesh: got {stop.signal_name}", flush=True)


def _table(mesh: LocalMesh):
    title = f"llmesh cluster  (gateway {mesh.gateway_address}, {time.strftime('%H:%M:%S')})"
    try:
        rows, summary = fetch_cluster(mesh.scheduler_address, timeout_s=1.0)
    except grpc.RpcError as exc:
        return render_table([], f"{title}  scheduler unreachable: {exc.code().name}")
    return render_table(rows, f"{title}  {summary.describe()}")
