"""The one path every client request takes, whichever API it came in by.

    open(GenerateRequest)   validate (validation.py), admit (admission.py), register
    run(session)            place it, then hand out its chunks; on exit (finished,
                            client gone, error) abort it on its worker and unregister

The gRPC servicer (servicer.py) and the OpenAI HTTP API (gateway/http_api/) both translate
their requests into a GenerateRequest and go through here, so the same request and seed
give the same tokens on either face, with the same validation, admission, failover,
migration-proof streaming and cancellation.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace

from gateway.admission import AdmissionControl
from gateway.cluster_view import ClusterView
from gateway.dispatcher import Dispatcher
from gateway.key_limits import ANONYMOUS, KeyLimits
from gateway.session import GenerationSession
from gateway.sessions import SessionTable
from gateway.telemetry import GatewayMetrics, RequestTelemetry
from gateway.tracker import RequestTracker
from gateway.validation import ModelLimits, validate_generate
from gateway.workers import WorkerPool
from protos import gateway_pb2
from services.common.errors import AlreadyExistsError, UnavailableError
from services.common.logging import bind_context, get_logger

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.gateway")


@dataclass(frozen=True)
class PlacementSettings:
    """How hard a session tries to find an instance (GatewayConfig's knobs)."""

    owner_address: str  # where workers push this gateway's outputs
    max_placements: int
    failover_wait_s: float = 10.0


class Generations:
    """Opens, runs and cleans up generation sessions for both client APIs."""

    def __init__(
        self,
        *,
        sessions: SessionTable,
        view: ClusterView,
        dispatcher: Dispatcher,
        pool: WorkerPool,
        admission: AdmissionControl,
        tokenizer,
        placement: PlacementSettings,
        model_id: str = "",
        metrics: GatewayMetrics | None = None,
        key_limits: KeyLimits | None = None,
    ) -> None:
        self.sessions = sessions
        self.view = view
        self.tokenizer = tokenizer
        self._dispatcher = dispatcher
        self._pool = pool
        self._admission = admission
        self._placement = placement
        self._model_id = model_id
        self._metrics = metrics  # None: request metrics are not recorded
        self._rng = random.Random()
        self._key_limits = key_limits or KeyLimits()  # default: no per-key limit
        self._client_keys: dict[str, str] = {}  # request id -> client key (limits)

    def model_limits(self) -> ModelLimits:
        """The served model's limits; UnavailableError until an instance registered."""
        limits = self.view.model_limits()
        if limits is None:
            raise UnavailableError("no instance has registered yet; retry shortly")
        return limits

    def open(
        self, request: gateway_pb2.GenerateRequest, client_key: str = ANONYMOUS
    ) -> GenerationSession:
        """Validate and admit one request and register its session (not placed yet).

        Raises ValueError naming the bad field, ResourceExhaustedError under admission
        control (the gateway's bounds, then the per-key limits of `client_key`, see
        key_limits.py), UnavailableError when no instance registered, AlreadyExistsError
        for a request id in flight. The caller must run() the session (run cleans it up).
        """
        limits = self.model_limits()
        spec = validate_generate(request, limits, self.tokenizer.encode, self._rng)
        self._admission.check(len(self.sessions), self.view)
        if spec.request_id in self._client_keys:
            raise AlreadyExistsError(f"request_id {spec.request_id!r} is already in flight")
        self._key_limits.acquire(client_key)
        session = GenerationSession(
            spec,
            RequestTracker(spec.request_id),
            self._dispatcher,
            self._pool,
            self._placement.owner_address,
            self._placement.max_placements,
            self._placement.failover_wait_s,
        )
        try:
            self.sessions.add(session)
        except BaseException:
            self._key_limits.release(client_key)
            raise
        self._client_keys[spec.request_id] = client_key
        return session

    @contextlib.asynccontextmanager
    async def run(
        self, session: GenerationSession, *, place: bool = True
    ) -> AsyncIterator[GenerationSession]:
        """Place the session (unless `place` is False: a resumed one runs already); the
        body iterates `session.chunks()`.

        However the body ends (last chunk, client gone, error) the request is aborted on
        its worker if it had not finished, and unregistered. Enter and exit it in one
        task (the trace span is attached to the current context).
        """
        with (
            tracer.start_as_current_span("gateway.generate") as span,
            bind_context(request_id=session.request_id),
        ):
            session.bind_trace()  # opened before this span existed
            span.set_attribute("llmesh.request_id", session.request_id)
            span.set_attribute("llmesh.num_prompt_tokens", len(session.spec.prompt_token_ids))
            log.info(
                "request_received",
                num_prompt_tokens=len(session.spec.prompt_token_ids),
                max_tokens=session.spec.sampling.max_tokens,
            )
            # Whole-request timings (TTFT, inter-token, end to end) and the GenAI span
            # attributes, the same for both APIs: session.chunks() reports each chunk.
            session.telemetry = RequestTelemetry(self._metrics, session.spec, self._model_id)
            failed = False  # placement or the stream failed (not: the client went away)
            try:
                if place:
                    with tracer.start_as_current_span("gateway.place"):
                        await session.place()
                yield session
                if session.tracker.is_finished:
                    span.set_attribute("llmesh.num_output_tokens", len(session.tracker.tokens))
                    span.set_attribute("llmesh.finish_reason", session.tracker.finish_reason.value)
                    log.info(
                        "request_finished",
                        finish_reason=session.tracker.finish_reason.value,
                        num_output_tokens=len(session.tracker.tokens),
                        num_placements=session.num_placements,
                    )
            except Exception:
                failed = True
                raise
            finally:
                if session.tracker.is_finished:
                    reason = session.tracker.finish_reason.value
                else:
                    reason = "error" if failed else ""  # "": counted as an abort
                session.telemetry.finish(reason)
                if session.abort():  # the client went away (or an error) before the end
                    log.info("request_cancelled", num_output_tokens=len(session.tracker.tokens))
                self.sessions.remove(session)
                self._key_limits.release(self._client_keys.pop(session.request_id, ANONYMOUS))
