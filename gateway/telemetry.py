"""What the gateway measures of each request: the vLLM-named request metrics and the
OpenTelemetry GenAI attributes of its `gateway.generate` span.

The gateway is where a request is whole: its time to first token, inter-token
latencies and end-to-end latency hold across migrations and failovers, which a worker
(seeing only its part) cannot measure.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.validation import GenerationSpec
from services.common.metrics import LATENCY_BUCKETS, PREFIX, TOKEN_LATENCY_BUCKETS

# Prompt / generation length buckets (tokens), as vLLM's request_*_tokens histograms.
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class GatewayMetrics:
    """Every metric of one gateway process, on its own registry."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name}
        keys = list(self.labels)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            metric = Histogram(PREFIX + name, doc, keys, buckets=buckets, registry=self.registry)
            return metric.labels(**self.labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, keys, registry=self.registry).labels(**self.labels)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Request arrival to its first token.", LATENCY_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between two output tokens.", TOKEN_LATENCY_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Request arrival to its last token.", LATENCY_BUCKETS
        )
        self.prompt_lengths = histogram(
            "request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_COUNT_BUCKETS
        )
        self.generation_lengths = histogram(
            "request_generation_tokens", "Output tokens per finished request.", TOKEN_COUNT_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Output tokens streamed.")
        self.finished = Counter(
            PREFIX + "request_success",
            "Finished requests by finish reason (stop, length, abort, error).",
            [*keys, "finished_reason"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            PREFIX + "gateway_requests_in_flight",
            "Requests the gateway is streaming.",
            keys,
            registry=self.registry,
        ).labels(**self.labels)


class RequestTelemetry:
    """One request's timings at the gateway (arrival to its last chunk)."""

    def __init__(self, metrics: GatewayMetrics | None, spec: GenerationSpec, model: str) -> None:
        self._metrics = metrics
        self._spec = spec
        self._arrival = self._last = time.perf_counter()
        self._first_token_at = 0.0
        self.num_tokens = 0
        span = trace.get_current_span()
        sampling = spec.sampling
        span.set_attributes(
            {
                "gen_ai.operation.name": "text_completion",
                "gen_ai.provider.name": "llmesh",
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": sampling.max_tokens,
                "gen_ai.request.temperature": sampling.temperature,
                "gen_ai.request.top_p": sampling.top_p,
                "gen_ai.request.top_k": sampling.top_k,
                "gen_ai.request.seed": sampling.seed,
                "gen_ai.response.id": spec.request_id,
                "gen_ai.usage.input_tokens": len(spec.prompt_token_ids),
            }
        )
        self._span = span
        if metrics is not None:
            metrics.in_flight.inc()

    def on_tokens(self, num_tokens: int) -> None:
        """A chunk with num_tokens new tokens went to the client."""
        if num_tokens == 0:
            return
        now = time.perf_counter()
        metrics = self._metrics
        if not self._first_token_at:
            self._first_token_at = now
            if metrics is not None:
                metrics.ttft.observe(now - self._arrival)
            num_gaps, gap = num_tokens - 1, 0.0  # tokens of one chunk arrived together
        else:
            num_gaps, gap = num_tokens, (now - self._last) / num_tokens
        if metrics is not None:
            for _ in range(num_gaps):
                metrics.itl.observe(gap)
            metrics.generation_tokens.inc(num_tokens)
        self._last = now
        self.num_tokens += num_tokens

    def finish(self, finish_reason: str) -> None:
        """The stream ended (finish_reason "" when the client left before the end,
        "error" when placement or the stream failed)."""
        now = time.perf_counter()
        duration = now - self._arrival
        attributes: dict = {
            "gen_ai.usage.output_tokens": self.num_tokens,
            "gen_ai.server.request.duration": duration,
        }
        if finish_reason:
            attributes["gen_ai.response.finish_reasons"] = (finish_reason,)
        if self._first_token_at:
            attributes["gen_ai.server.time_to_first_token"] = self._first_token_at - self._arrival
        if self.num_tokens > 1:
            attributes["gen_ai.server.time_per_output_token"] = (now - self._first_token_at) / (
                self.num_tokens - 1
            )
        self._span.set_attributes(attributes)
        metrics = self._metrics
        if metrics is None:
            return
        metrics.in_flight.dec()
        metrics.finished.labels(**metrics.labels, finished_reason=finish_reason or "abort").inc()
        if finish_reason and finish_reason != "error":  # completed: its latency counts
            metrics.e2e.observe(duration)
            metrics.prompt_tokens.inc(len(self._spec.prompt_token_ids))
            metrics.prompt_lengths.observe(len(self._spec.prompt_token_ids))
            metrics.generation_lengths.observe(self.num_tokens)
