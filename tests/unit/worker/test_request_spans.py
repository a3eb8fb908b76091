"""A request's spans on a worker: request, queue, prefill, one decode; a migrated-in
request continues its trace with a decode span only."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.worker import request_spans
from services.worker.request_spans import RequestSpans

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
GATEWAY = {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"}


@pytest.fixture
def exporter(monkeypatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(request_spans, "tracer", provider.get_tracer("test"))
    return exporter


def _by_name(exporter):
    return {s.name: s for s in exporter.get_finished_spans()}


def test_a_request_has_queue_prefill_and_one_decode_span(exporter):
    spans = RequestSpans()
    spans.start("r", GATEWAY, {"llmesh.request_id": "r"}, decoding=False)
    submitted = exporter.get_finished_spans()
    assert submitted == ()
    request = spans.span_of("r")
    started_ns = request.start_time + 1_000
    spans.on_started(started_ns, ["r", "unknown"])
    spans.on_tokens("r", 1)
    for _ in range(9):
        spans.on_tokens("r", 1)
    spans.end("r", {"llmesh.finish_reason": "length"})
    got = _by_name(exporter)
    assert sorted(got) == ["worker.decode", "worker.prefill", "worker.queue", "worker.request"]
    root = got["worker.request"]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert f"{root.parent.span_id:016x}" == "b7ad6b7169203331"
    for name in ("worker.queue", "worker.prefill", "worker.decode"):
        assert got[name].parent.span_id == root.context.span_id
        assert got[name].context.trace_id == root.context.trace_id
    assert (got["worker.queue"].start_time, got["worker.queue"].end_time) == (
        root.start_time,
        started_ns,
    )
    assert got["worker.prefill"].start_time == started_ns
    assert got["worker.prefill"].end_time == got["worker.decode"].start_time
    assert got["worker.decode"].end_time == root.end_time
    assert got["worker.decode"].attributes["llmesh.num_decoded_tokens"] == 9
    assert root.attributes["llmesh.finish_reason"] == "length"
    assert spans.context_of("r") == {}


def test_a_migrated_in_request_continues_the_trace_with_decode_only(exporter):
    source = RequestSpans()
    source.start("r", GATEWAY, {}, decoding=False)
    handoff_context = source.context_of("r")
    source.end("r", {"llmesh.migrated_out": True})
    exporter.clear()
    destination = RequestSpans()
    destination.start("r", handoff_context, {"llmesh.migrated_in": True}, decoding=True)
    destination.on_started(1, ["r"])  # no queue span: it was already running
    destination.on_tokens("r", 1)
    destination.on_tokens("r", 1)
    destination.end("r", {})
    got = _by_name(exporter)
    assert sorted(got) == ["worker.decode", "worker.request"]
    assert got["worker.decode"].attributes["llmesh.num_decoded_tokens"] == 2
    assert (
        f"{got['worker.request'].parent.span_id:016x}"
        == handoff_context["traceparent"].split("-")[2]
    )


def test_end_all_ends_every_open_request(exporter):
    spans = RequestSpans()
    for request_id in ("a", "b"):
        spans.start(request_id, {}, {}, decoding=False)
    spans.end_all()
    assert sorted(
        s.attributes.get("llmesh.finish_reason") for s in exporter.get_finished_spans()
    ) == [
        "shutdown",
        "shutdown",
    ]
    assert spans.end("a", {}) is None


def test_a_second_start_of_a_tracked_request_is_refused_and_the_first_span_survives(exporter):
    spans = RequestSpans()
    first = spans.start("r", GATEWAY, {"llmesh.request_id": "r"}, decoding=False)
    with pytest.raises(ValueError, match="already has a worker.request span"):
        spans.start("r", GATEWAY, {"llmesh.request_id": "r"}, decoding=False)
    assert spans.span_of("r") is first
    spans.end("r", {"llmesh.finish_reason": "length"})
    [request] = [s for s in exporter.get_finished_spans() if s.name == "worker.request"]
    assert request.attributes["llmesh.finish_reason"] == "length"
