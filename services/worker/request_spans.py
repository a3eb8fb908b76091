"""Each request's spans on this worker: `worker.request` and its phases.

    worker.request   submit (or adoption after a migration) .. finish / leaving here
      worker.queue     submit .. the step that began its prefill
      worker.prefill   that step .. its first token here
      worker.decode    first token .. finish / leaving (one span, not one per token;
                       attributes: tokens decoded here)

`worker.request` continues the trace the gateway put in RequestState.trace_context
(a migrated-in request: the source worker's `worker.request`), so a request is one
trace across the gateway and every worker that served it. Phase spans are written
when a phase ends, with their real start and end times; a request that arrives
mid-decode (migrated in) has only a decode span here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from opentelemetry import trace

from services.common.tracing import context_from_dict, context_to_dict

tracer = trace.get_tracer("llmesh.worker")


@dataclass
class _Timeline:
    span: trace.Span
    submitted_ns: int
    started_ns: int = 0  # its prefill began (0: not yet)
    first_token_ns: int = 0  # its first token here (0: not yet)
    num_tokens: int = 0  # tokens generated here
    is_migrated_in: bool = False


class RequestSpans:
    """The spans of the requests on one worker (event-loop thread only)."""

    def __init__(self) -> None:
        self._timelines: dict[str, _Timeline] = {}

    def start(
        self, request_id: str, trace_context: dict[str, str], attributes: dict, decoding: bool
    ) -> trace.Span:
        """`decoding`: it arrives mid-generation (migrated in), no queue or prefill here.
        A request already tracked is refused (ValueError): its span must not be lost."""
        if request_id in self._timelines:
            raise ValueError(f"request {request_id} already has a worker.request span")
        now = time.time_ns()
        span = tracer.start_span(
            "worker.request",
            context=context_from_dict(trace_context),
            attributes=attributes,
            start_time=now,
        )
        timeline = _Timeline(span, now, is_migrated_in=decoding)
        if decoding:
            timeline.started_ns = timeline.first_token_ns = now
        self._timelines[request_id] = timeline
        return span

    def span_of(self, request_id: str) -> trace.Span | None:
        timeline = self._timelines.get(request_id)
        return timeline.span if timeline is not None else None

    def context_of(self, request_id: str) -> dict[str, str]:
        """The W3C headers of the request's span here ({} if it is not here)."""
        timeline = self._timelines.get(request_id)
        if timeline is None:
            return {}
        return context_to_dict(trace.set_span_in_context(timeline.span))

    def on_started(self, step_start_ns: int, request_ids: list[str]) -> None:
        """A step began these requests' prefill: their queueing is over."""
        for request_id in request_ids:
            timeline = self._timelines.get(request_id)
            if timeline is None or timeline.started_ns:
                continue
            timeline.started_ns = step_start_ns
            self._phase(timeline, "worker.queue", timeline.submitted_ns, step_start_ns)

    def on_tokens(self, request_id: str, num_tokens: int) -> None:
        timeline = self._timelines.get(request_id)
        if timeline is None or num_tokens == 0:
            return
        if not timeline.first_token_ns:
            now = time.time_ns()
            timeline.first_token_ns = now
            if not timeline.started_ns:  # began in a pipeline step (KunServe stage 0)
                timeline.started_ns = timeline.submitted_ns
            self._phase(timeline, "worker.prefill", timeline.started_ns, now)
        timeline.num_tokens += num_tokens

    def end(self, request_id: str, attributes: dict) -> trace.Span | None:
        """The request finished or left: its decode span, then its request span (returned,
        ended, for the caller's last log line)."""
        timeline = self._timelines.pop(request_id, None)
        if timeline is None:
            return None
        now = time.time_ns()
        if timeline.first_token_ns:
            self._phase(
                timeline,
                "worker.decode",
                timeline.first_token_ns,
                now,
                {
                    "llmesh.num_decoded_tokens": timeline.num_tokens
                    - (0 if timeline.is_migrated_in else 1)
                },
            )
        timeline.span.set_attributes(attributes)
        timeline.span.end(end_time=now)
        return timeline.span

    def end_all(self) -> None:
        for request_id in list(self._timelines):
            self.end(request_id, {"llmesh.finish_reason": "shutdown"})

    @staticmethod
    def _phase(timeline: _Timeline, name: str, start_ns: int, end_ns: int, attributes=None):
        context = trace.set_span_in_context(timeline.span)
        span = tracer.start_span(name, context=context, attributes=attributes, start_time=start_ns)
        span.end(end_time=max(start_ns, end_ns))
