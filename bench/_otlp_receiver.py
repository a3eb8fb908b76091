"""A real OTLP/gRPC trace receiver: the collector's TraceService (from the
`opentelemetry-proto` package) on a loopback port chosen by the OS. The observability
tests keep every span as it arrived over the wire; `bench serve` only counts them (a
collector's work is not what the benchmark measures)."""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    instance: str  # the resource's service.instance.id ("" if none)
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    attributes: dict = field(hash=False)
    links: tuple[tuple[str, str], ...] = ()  # (trace id, span id) of each link
    start_ns: int = 0
    end_ns: int = 0


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(v) for v in any_value.array_value.values)
    return getattr(any_value, kind) if kind else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request, context):
        if not self._receiver.keep_spans:
            num_spans = sum(
                len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
            )
            with self._receiver.lock:
                self._receiver.num_spans += num_spans
            return trace_service_pb2.ExportTraceServiceResponse()
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(
                        ReceivedSpan(
                            service=resource.get("service.name", ""),
                            instance=resource.get("service.instance.id", ""),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=tuple((li.trace_id.hex(), li.span_id.hex()) for li in span.links),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self._receiver.lock:
            self._receiver.spans.extend(spans)
            self._receiver.num_spans += len(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """with OtlpReceiver() as receiver: ... receiver.endpoint, receiver.snapshot()"""

    def __init__(self, keep_spans: bool = True) -> None:
        self.keep_spans = keep_spans
        self.num_spans = 0
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def snapshot(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
