"""Observability end to end, with real receivers: a mesh exporting OTLP traces to a
TraceService receiver in this process and scraped by a real Prometheus server, through
a workload with a live migration and a KunServe drop and restore.

One workload (module fixture) feeds every test: what the receiver got over the wire
(one trace per request across the gateway and both workers, the migration span with a
child per stage, the KunServe operations), what Prometheus scraped (every PromQL
expression of the Grafana dashboard returns data; the migration's counter and
downtime), and `promtool check metrics` on each service's exposition.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from bench._otlp_receiver import OtlpReceiver, ReceivedSpan
from gateway.client import AsyncClient
from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common.grpc_client import cluster_channel
from services.common.procs import REPO_ROOT, LocalMesh
from tests.integration.conftest import reference_tokens, wait_until, wait_worker_idle
from tests.integration.kunserve_helpers import drop, restore, run_streams, workload
from tests.integration.prometheus_server import PrometheusServer

pytestmark = pytest.mark.timeout(600)
DASHBOARD = REPO_ROOT / "deploy/compose/observability/grafana/dashboards/llmesh.json"
TIMEOUT_S = 180.0
MIGRATED = "obs-migrated"
MIGRATED_PROMPT = [(11 * j + 5) % 256 for j in range(300)]
MIGRATED_SAMPLING = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.7, "seed": 5}
KUNSERVE_REQUESTS = workload(4, 21, 300)
# Grafana's variables, as "All" and a rate window that covers the whole workload.
DASHBOARD_VARIABLES = {"$__rate_interval": "5m", "$model_name": ".*", "$instance_id": ".*"}


@pytest.fixture(scope="module")
def receiver():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def omesh(tmp_path_factory, receiver):
    mesh = LocalMesh(
        log_dir=tmp_path_factory.mktemp("observability"),
        num_workers=2,
        env={
            "LLMESH_WORKER_TORCH_THREADS": "1",
            # The standard OpenTelemetry variables configure every service.
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            # Only this test drops and restores; the migration loop runs (its rounds
            # are a dashboard panel) but a light load gives it nothing to pair.
            "LLMESH_SCHEDULER_GROUP_POLICY": "none",
        },
    )
    mesh.start()
    yield mesh
    mesh.stop()
    assert [p.name for p in mesh.processes() if p.is_alive()] == []


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, omesh):
    targets = {
        "llmesh-gateway": [omesh.gateway.metrics_address],
        "llmesh-scheduler": [omesh.scheduler.metrics_address],
        "llmesh-worker": [w.metrics_address for w in omesh.workers],
    }
    assert all(all(addresses) for addresses in targets.values()), targets
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), targets)
    server.start()
    try:
        wait_until(
            lambda: set(server.targets_up().values()) == {"up"} and len(server.targets_up()) == 4,
            timeout_s=60,
            what="prometheus scraping all four services",
        )
        yield server
    finally:
        server.stop()


def _migrate_during_stream(mesh: LocalMesh) -> tuple[str, str, list]:
    """Stream MIGRATED; once it has a token, the scheduler moves it to the other worker."""

    async def scenario():
        async with AsyncClient(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
            stream = client.generate_stream(
                prompt_token_ids=MIGRATED_PROMPT, request_id=MIGRATED, **MIGRATED_SAMPLING
            )
            first = await anext(stream)
            rest = asyncio.ensure_future(_collect(stream))
            src = first.instance_id
            dst = next(w.name for w in mesh.workers if w.name != src)
            with cluster_channel(mesh.scheduler_address) as channel:
                reply = scheduler_pb2_grpc.SchedulerStub(channel).Migrate(
                    scheduler_pb2.SchedulerMigrateRequest(
                        src_instance_id=src, dst_instance_id=dst, request_id=MIGRATED
                    ),
                    timeout=10,
                )
            assert reply.ordered
            return src, dst, [first, *await rest]

    return asyncio.run(scenario())


async def _collect(stream) -> list:
    return [chunk async for chunk in stream]


@pytest.fixture(scope="module")
def run(omesh, prometheus, reference_engine):
    """The workload, once: a live migration, then a KunServe drop and restore of both
    workers while requests stream. Every token is checked against one local engine."""
    src, dst, chunks = _migrate_during_stream(omesh)
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == reference_tokens(reference_engine, [(MIGRATED_PROMPT, MIGRATED_SAMPLING)])[0]
    producers = [c.instance_id for c in chunks if c.token_ids]
    assert (producers[0], producers[-1]) == (src, dst)

    members = [w.name for w in omesh.workers]
    groups = {}

    def drop_serve_restore():
        groups["id"] = drop(omesh, members).group.group_id
        time.sleep(1.0)  # the group serves as one pipeline for a while
        restore(omesh, groups["id"])

    got = run_streams(omesh, KUNSERVE_REQUESTS, "obs-kun", drop_serve_restore)
    assert got == reference_tokens(reference_engine, KUNSERVE_REQUESTS)
    for worker in omesh.workers:
        report = wait_worker_idle(worker.address)
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        assert report.load.num_used_blocks == 0
    return {"src": src, "dst": dst, "group_id": groups["id"]}


# ---- traces -------------------------------------------------------------------------


def _spans_when(receiver: OtlpReceiver, predicate, what: str) -> list[ReceivedSpan]:
    """The receiver's spans once predicate(spans) holds (exports arrive in batches)."""
    found: list[ReceivedSpan] = []

    def ready():
        found[:] = receiver.snapshot()
        return predicate(found)

    wait_until(ready, timeout_s=30, what=what)
    return found


def _by_request(spans: list[ReceivedSpan], name: str, request_id: str) -> list[ReceivedSpan]:
    return [
        s for s in spans if s.name == name and s.attributes.get("llmesh.request_id") == request_id
    ]


def _assert_parents_intact(trace: list[ReceivedSpan]) -> None:
    """Exactly one root (the gateway's), every other span's parent in the same trace."""
    ids = {s.span_id for s in trace}
    roots = [s for s in trace if not s.parent_span_id]
    assert [(r.service, r.name) for r in roots] == [("llmesh-gateway", "gateway.generate")]
    orphans = [
        (s.service, s.name) for s in trace if s.parent_span_id and s.parent_span_id not in ids
    ]
    assert orphans == []


def test_migrated_request_is_one_trace_with_a_span_per_stage(run, receiver):
    def complete(spans):
        migrated_in = [
            s
            for s in _by_request(spans, "worker.request", MIGRATED)
            if s.attributes.get("llmesh.migrated_in")
        ]
        return (
            _by_request(spans, "migration", MIGRATED)
            and _by_request(spans, "gateway.generate", MIGRATED)
            and migrated_in
        )

    spans = _spans_when(receiver, complete, "the migrated request's spans")
    [root] = _by_request(spans, "gateway.generate", MIGRATED)
    trace = [s for s in spans if s.trace_id == root.trace_id]
    _assert_parents_intact(trace)
    # Gateway, scheduler and both workers are in this one trace, and nowhere else.
    assert {s.service for s in trace} == {"llmesh-gateway", "llmesh-scheduler", "llmesh-worker"}
    assert {s.instance for s in trace if s.service == "llmesh-worker"} == {run["src"], run["dst"]}
    assert {s.trace_id for s in spans if s.attributes.get("llmesh.request_id") == MIGRATED} == {
        root.trace_id
    }
    # GenAI semantic conventions on the gateway's span.
    attrs = root.attributes
    assert attrs["gen_ai.usage.input_tokens"] == len(MIGRATED_PROMPT)
    assert attrs["gen_ai.usage.output_tokens"] == MIGRATED_SAMPLING["max_tokens"]
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert attrs["gen_ai.request.seed"] == MIGRATED_SAMPLING["seed"]
    assert 0 < attrs["gen_ai.server.time_to_first_token"] < attrs["gen_ai.server.request.duration"]
    assert attrs["gen_ai.server.time_per_output_token"] > 0

    by_id = {s.span_id: s for s in trace}
    [src_request] = [s for s in trace if s.name == "worker.request" and s.instance == run["src"]]
    [dst_request] = [s for s in trace if s.name == "worker.request" and s.instance == run["dst"]]
    assert src_request.parent_span_id == root.span_id
    assert src_request.attributes["llmesh.migrated_out"] is True
    # The destination continues the source's span.
    assert dst_request.parent_span_id == src_request.span_id
    assert dst_request.attributes["llmesh.finish_reason"] == "length"
    # Queue, prefill, decode at the source (one decode span, not one per token); only
    # decode at the destination, which received the request mid-generation.
    phases = Counter(
        (by_id[s.parent_span_id].instance, s.name)
        for s in trace
        if s.name.startswith("worker.") and s.name != "worker.request"
    )
    assert phases == {
        (run["src"], "worker.queue"): 1,
        (run["src"], "worker.prefill"): 1,
        (run["src"], "worker.decode"): 1,
        (run["dst"], "worker.decode"): 1,
    }

    [migration] = _by_request(trace, "migration", MIGRATED)
    assert migration.parent_span_id == src_request.span_id
    assert migration.instance == run["src"]
    m = migration.attributes
    assert (m["llmesh.outcome"], m["llmesh.mode"], m["llmesh.reason"]) == ("COMMITTED", "live", "")
    assert (m["llmesh.src_instance_id"], m["llmesh.dst_instance_id"]) == (run["src"], run["dst"])
    assert m["llmesh.downtime_ms"] > 0
    children = [s for s in trace if s.parent_span_id == migration.span_id]
    stages = sorted(
        (s for s in children if s.name == "migration.stage"),
        key=lambda s: s.attributes["llmesh.stage_index"],
    )
    # One child per stage: as many as the migration says it made, numbered in order.
    assert len(stages) == m["llmesh.num_stages"] >= 2
    assert [s.attributes["llmesh.stage_index"] for s in stages] == list(range(len(stages)))
    assert [s.attributes["llmesh.is_last"] for s in stages] == [False] * (len(stages) - 1) + [True]
    assert sum(s.attributes["llmesh.num_blocks"] for s in stages) == m["llmesh.num_blocks"]
    assert sum(s.attributes["llmesh.num_bytes"] for s in stages) == m["llmesh.num_bytes"] > 0
    assert all(s.end_ns > s.start_ns for s in stages)
    assert sorted(s.name for s in children if s.name != "migration.stage") == [
        "migration.commit",
        "migration.prepare",
    ]


def test_kunserve_requests_and_operations_are_traced(run, receiver):
    request_ids = [f"obs-kun-{i}" for i in range(len(KUNSERVE_REQUESTS))]

    def complete(spans):
        names = {s.name for s in spans}
        return {"kunserve.restore", "scheduler.restore_group"} <= names and all(
            _by_request(spans, "gateway.generate", r) for r in request_ids
        )

    spans = _spans_when(receiver, complete, "the KunServe spans")
    # Each request: one trace, whichever workers served it across the drop and restore.
    for request_id in request_ids:
        [root] = _by_request(spans, "gateway.generate", request_id)
        mine = [
            s
            for s in spans
            if s.attributes.get("llmesh.request_id") == request_id
            and s.name != "kunserve.exchange.send"
        ]
        assert {s.trace_id for s in mine} == {root.trace_id}, [
            (s.name, s.instance, s.trace_id[:6], s.parent_span_id[:6], s.attributes) for s in mine
        ]
        _assert_parents_intact([s for s in spans if s.trace_id == root.trace_id])

    [drop_root] = [s for s in spans if s.name == "scheduler.drop_group"]
    assert drop_root.attributes["llmesh.group_id"] == run["group_id"]
    drop_trace = [s for s in spans if s.trace_id == drop_root.trace_id]
    ids = {s.span_id for s in drop_trace}
    assert all(s.parent_span_id in ids for s in drop_trace if s is not drop_root)
    members = {w for w in (run["src"], run["dst"])}
    assert {s.instance for s in drop_trace if s.name == "kunserve.drop"} == members
    assert all(
        s.attributes["llmesh.freed_weight_bytes"] > 0
        for s in drop_trace
        if s.name == "kunserve.drop"
    )
    sends = [s for s in drop_trace if s.name == "kunserve.exchange.send"]
    assert sends, "the drop exchanged the running requests' KV"
    for send in sends:
        assert send.attributes["llmesh.request_id"] in request_ids
        assert send.attributes["llmesh.num_bytes"] > 0
        assert send.attributes["llmesh.num_chunks"] >= 1
        assert send.attributes["llmesh.num_pauses"] >= 0
    [restore_root] = [s for s in spans if s.name == "scheduler.restore_group"]
    restore_trace = [s for s in spans if s.trace_id == restore_root.trace_id]
    assert {s.instance for s in restore_trace if s.name == "kunserve.restore"} == members


# ---- metrics ------------------------------------------------------------------------


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("type") == "prometheus":
                exprs.append(target["expr"])
    return exprs


def _substitute(expr: str) -> str:
    for name, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"an unknown dashboard variable in {expr}"
    return expr


def _value(prometheus: PrometheusServer, expr: str) -> float:
    result = prometheus.query(expr)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def _scraped_after_workload(prometheus: PrometheusServer, run) -> None:
    """Prometheus has scraped the workload's last events."""
    checks = (
        'llmesh:kunserve_restores_total{outcome="ok"} == 1',
        'sum(llmesh:migrations_total{outcome="committed"}) == 1',
        "sum(llmesh:gateway_requests_in_flight) == 0",
    )
    try:
        wait_until(
            lambda: all(prometheus.query(check) for check in checks),
            timeout_s=30,
            what="prometheus scraping the workload's end",
        )
    except AssertionError:
        seen = {c: prometheus.query(c.split(" == ")[0]) for c in checks}
        raise AssertionError({**seen, **prometheus.targets_up()}) from None
    time.sleep(2.5)  # two more scrapes: rate() windows end after the last change


def test_every_dashboard_expression_returns_data(run, prometheus):
    _scraped_after_workload(prometheus, run)
    exprs = _dashboard_expressions()
    assert len(exprs) >= 40
    empty = []
    for expr in exprs:
        result = prometheus.query(_substitute(expr))
        values = [float(r["value"][1]) for r in result]
        if not any(math.isfinite(v) for v in values):
            empty.append((expr, values))
    assert empty == []


def test_migration_is_counted_with_its_labels_and_downtime(run, prometheus, receiver):
    _scraped_after_workload(prometheus, run)
    src, dst = run["src"], run["dst"]
    live = f'mode="live", model_name="tiny", instance_id="{src}"'
    assert _value(prometheus, f'llmesh:migrations_total{{{live}, outcome="committed"}}') == 1
    assert _value(prometheus, f'llmesh:migrations_total{{{live}, outcome="aborted"}}') == 0
    assert _value(prometheus, f'sum(llmesh:migrations_total{{instance_id="{dst}"}})') == 0
    assert _value(prometheus, f"llmesh:migration_downtime_seconds_count{{{live}}}") == 1
    downtime_s = _value(prometheus, f"llmesh:migration_downtime_seconds_sum{{{live}}}")
    [migration] = _by_request(receiver.snapshot(), "migration", MIGRATED)
    assert downtime_s == pytest.approx(migration.attributes["llmesh.downtime_ms"] / 1000, rel=1e-9)
    assert (
        _value(prometheus, f"llmesh:migration_bytes_total{{{live}}}")
        == migration.attributes["llmesh.num_bytes"]
    )
    assert _value(prometheus, 'llmesh:kunserve_drops_total{outcome="ok"}') == 1
    assert _value(prometheus, 'llmesh:kunserve_restores_total{outcome="ok"}') == 1
    finished = 1 + len(KUNSERVE_REQUESTS)
    assert _value(prometheus, 'llmesh:request_success_total{finished_reason="length"}') == finished
    assert _value(prometheus, "llmesh:e2e_request_latency_seconds_count") == finished
    expected_tokens = MIGRATED_SAMPLING["max_tokens"] + sum(
        s["max_tokens"] for _, s in KUNSERVE_REQUESTS
    )
    assert _value(prometheus, "llmesh:generation_tokens_total") == expected_tokens


# promtool's one lint the names cannot pass: Prometheus reserves ':' for recording
# rules, and the vLLM names this mesh mirrors (vllm:..., here llmesh:...) carry one.
COLON_LINT = re.compile(r"^llmesh:\w+ metric names should not contain ':'$")


def test_promtool_checks_every_exposition(run, omesh):
    for proc in omesh.processes():
        with urllib.request.urlopen(f"http://{proc.metrics_address}/metrics", timeout=10) as reply:
            body = reply.read()
        checked = subprocess.run(
            ["promtool", "check", "metrics"], input=body, capture_output=True, timeout=60
        )
        problems = [line for line in checked.stdout.decode().splitlines() if line.strip()]
        problems += [line for line in checked.stderr.decode().splitlines() if line.strip()]
        # Exit 3 is "lint problems" (1 would be an exposition promtool cannot parse).
        assert checked.returncode in (0, 3), (proc.name, problems)
        assert [p for p in problems if not COLON_LINT.match(p.strip())] == [], proc.name
        assert len(problems) == len({n for n in re.findall(rb"^# TYPE (\S+)", body, re.M)}), (
            proc.name
        )


def test_deploy_prometheus_config_is_valid():
    config = Path(REPO_ROOT / "deploy/compose/observability/prometheus.yml")
    checked = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
