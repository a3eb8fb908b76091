"""The gateway's request metrics (vLLM's names) and GenAI span attributes."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.cluster_view import InstanceView
from gateway.telemetry import GatewayMetrics, RequestTelemetry
from gateway.validation import GenerationSpec
from protos import gateway_pb2
from services.common.errors import UnavailableError
from services.common.messages import InstanceSpec, SamplingSpec
from services.policies import InstanceLoad
from tests.unit.gateway.fakes import idle_generations

SPEC = GenerationSpec("req-1", (1, 2, 3, 4), SamplingSpec(max_tokens=5, seed=9), 0, False)
TINY = {"model_name": "tiny"}


def _traced(run) -> dict:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span("gateway.generate"):
        run()
    [span] = exporter.get_finished_spans()
    return dict(span.attributes)


def test_a_finished_request_is_counted_and_its_span_carries_genai_attributes():
    metrics = GatewayMetrics("tiny")

    def run():
        telemetry = RequestTelemetry(metrics, SPEC, "tiny")
        assert metrics.registry.get_sample_value("llmesh:gateway_requests_in_flight", TINY) == 1
        telemetry.on_tokens(1)
        telemetry.on_tokens(0)  # a notice without tokens (a migration's)
        telemetry.on_tokens(3)
        telemetry.on_tokens(1)
        telemetry.finish("length")

    attributes = _traced(run)
    value = metrics.registry.get_sample_value
    assert value("llmesh:gateway_requests_in_flight", TINY) == 0
    assert value("llmesh:time_to_first_token_seconds_count", TINY) == 1
    assert value("llmesh:inter_token_latency_seconds_count", TINY) == 4  # one per later token
    assert value("llmesh:e2e_request_latency_seconds_count", TINY) == 1
    assert value("llmesh:generation_tokens_total", TINY) == 5
    assert value("llmesh:prompt_tokens_total", TINY) == 4
    assert value("llmesh:request_success_total", {**TINY, "finished_reason": "length"}) == 1
    assert value("llmesh:request_generation_tokens_sum", TINY) == 5
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.request.model"] == "tiny"
    assert attributes["gen_ai.request.max_tokens"] == 5
    assert attributes["gen_ai.request.seed"] == 9
    assert attributes["gen_ai.response.id"] == "req-1"
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (
        4,
        5,
    )
    assert (
        0
        <= attributes["gen_ai.server.time_to_first_token"]
        <= attributes["gen_ai.server.request.duration"]
    )
    assert attributes["gen_ai.server.time_per_output_token"] >= 0


def test_a_request_the_client_left_counts_as_abort_without_latency():
    metrics = GatewayMetrics("tiny")

    def run():
        telemetry = RequestTelemetry(metrics, SPEC, "tiny")
        telemetry.on_tokens(1)
        telemetry.finish("")

    attributes = _traced(run)
    value = metrics.registry.get_sample_value
    assert value("llmesh:request_success_total", {**TINY, "finished_reason": "abort"}) == 1
    assert value("llmesh:e2e_request_latency_seconds_count", TINY) == 0
    assert "gen_ai.response.finish_reasons" not in attributes
    assert "gen_ai.server.time_per_output_token" not in attributes


def test_without_metrics_only_the_span_is_annotated():
    attributes = _traced(lambda: RequestTelemetry(None, SPEC, "tiny").finish("stop"))
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_a_request_whose_placement_fails_is_counted_as_an_error_not_an_abort():
    class NoInstance:
        async def choose(self, request_id, num_tokens, priority, exclude):
            raise UnavailableError("no instance can take it")

    metrics = GatewayMetrics("tiny")
    generations = idle_generations()
    generations._metrics, generations._dispatcher = metrics, NoInstance()
    spec = InstanceSpec("w", "addr-w", "tiny", 16, 4, 0, 4, 2048, 258, 257)
    generations.view.update([InstanceView(spec, InstanceLoad("w", 100, 0, 0, 0))])
    request = gateway_pb2.GenerateRequest(request_id="r1", prompt_token_ids=[1, 2])
    request.sampling.max_tokens = 3
    session = generations.open(request)
    with pytest.raises(UnavailableError):
        async with generations.run(session):
            pass
    reasons = {
        reason: metrics.registry.get_sample_value(
            "llmesh:request_success_total", {**TINY, "finished_reason": reason}
        )
        for reason in ("error", "abort")
    }
    assert reasons == {"error": 1.0, "abort": None}
    assert len(generations.sessions) == 0
