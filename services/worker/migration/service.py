"""The worker's migration component: both protocol roles, wired to the worker.

It owns the data-plane transport, the source and destination of the protocol, the
gRPC clients to peers, and the per-request bookkeeping a move needs (owner gateway,
trace context, placement epoch). `WorkerInstance` calls it; the servicer exposes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from kvtransport import Transport
from services.common.logging import get_logger
from services.common.messages import OutputDelta
from services.policies import make_selection_policy
from services.worker.async_engine import AsyncEngine
from services.worker.engine import LLMEngine, RequestState
from services.worker.migration.config import MigrationConfig
from services.worker.migration.destination import MigrationDestination
from services.worker.migration.faults import NO_FAULTS, FaultHooks
from services.worker.migration.grpc_client import GrpcDestinationClient
from services.worker.migration.source import MigrationSource
from services.worker.migration.status import MigrationMode
from services.worker.migration.types import MigrationResult, MigrationTarget, RequestHandoff

log = get_logger(__name__)


class WorkerMigration:
    def __init__(
        self,
        instance_id: str,
        async_engine: AsyncEngine,
        transport: Transport,
        config: MigrationConfig,
        hooks: MigrationHooks,
        faults: FaultHooks = NO_FAULTS,
    ) -> None:
        self.instance_id = instance_id
        self.transport = transport
        self.config = config
        self._engine = async_engine
        self._hooks = hooks
        self._selection = make_selection_policy(config.selection)
        self._clients: dict[str, GrpcDestinationClient] = {}
        self._tasks: set[asyncio.Task] = set()
        self.epochs: dict[str, int] = {}  # request id -> placement epoch (absent = 0)
        self.source = MigrationSource(
            instance_id,
            async_engine,
            transport,
            config,
            client_for=self._client_for,
            handoff_for=self._handoff_for,
            on_committed=self._on_committed,
            faults=faults,
            trace_context_of=hooks.trace_context_of,
        )
        self.destination = MigrationDestination(
            async_engine,
            transport,
            config,
            on_adopting=self._on_adopting,
            on_adopt_failed=lambda handoff: hooks.forget(handoff.state.request_id),
            is_draining=hooks.is_draining,
        )

    @property
    def num_active(self) -> int:
        return self.source.num_active + self.destination.num_active

    def start(self) -> None:
        self.destination.start()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.destination.close()
        for client in self._clients.values():
            await client.close()
        await self.transport.close()

    # ---- source ----------------------------------------------------------------------

    async def migrate_out(
        self,
        target: MigrationTarget,
        request_id: str = "",
        num_requests: int = 1,
        mode: MigrationMode = MigrationMode.LIVE,
    ) -> list[MigrationResult]:
        """Migrate request_id, or the num_requests chosen by the selection policy."""
        if target.instance_id == self.instance_id:
            raise ValueError(f"dst_instance_id={target.instance_id!r} is this instance")
        if not target.transport_address and mode is not MigrationMode.RECOMPUTE:
            raise ValueError("dst_transport_address must not be empty")
        if num_requests < 0:
            raise ValueError(f"num_requests={num_requests} must be >= 0")
        if request_id:
            request_ids = [request_id]
        else:

            def candidates(engine: LLMEngine):
                return [
                    (r.request_id, r.num_tokens, r.num_blocks, r.priority)
                    for r in engine.running_requests()
                    if not self.source.is_migrating(r.request_id)
                ]

            running = await self._engine.run(candidates)
            request_ids = self._selection.select(running, num_requests or 1)
        self._hooks.on_count_changed()
        try:
            results = await asyncio.gather(
                *(self.source.migrate(r, target, mode) for r in request_ids)
            )
        finally:
            self._hooks.on_count_changed()
        for result in results:
            self._hooks.on_migrated(result, mode)
        return list(results)

    def migrate_out_soon(self, target: MigrationTarget, request_id: str, num_requests: int) -> None:
        """A scheduler command: migrate in the background."""
        task = asyncio.create_task(self.migrate_out(target, request_id, num_requests))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("migration_command_failed", error=repr(task.exception()))

    def _client_for(self, target: MigrationTarget) -> GrpcDestinationClient:
        client = self._clients.get(target.address)
        if client is None:
            client = self._clients[target.address] = GrpcDestinationClient(
                target.address, self.config.rpc_timeout_s
            )
        return client

    def _handoff_for(self, request_id: str, state: RequestState) -> RequestHandoff:
        return RequestHandoff(
            state=state,
            owner_address=self._hooks.owner_of(request_id) or "",
            trace_context=self._hooks.trace_context_of(request_id),
            placement_epoch=self.epochs.get(request_id, 0) + 1,
        )

    def _on_committed(self, handoff: RequestHandoff, target: MigrationTarget) -> None:
        request_id = handoff.state.request_id
        # Tell the owner where the request runs now (it watches that worker from here on).
        notice = OutputDelta(
            request_id=request_id,
            first_token_index=len(handoff.state.output_token_ids),
            token_ids=(),
            moved_to_instance_id=target.instance_id,
            moved_to_address=target.address,
            placement_epoch=handoff.placement_epoch,
        )
        self._hooks.publish([notice])
        self._hooks.forget(request_id)
        self.epochs.pop(request_id, None)

    # ---- destination -----------------------------------------------------------------

    def _on_adopting(self, handoff: RequestHandoff) -> None:
        self.epochs[handoff.state.request_id] = handoff.placement_epoch
        self._hooks.adopt(handoff)


class MigrationHooks:
    """What the migration component needs from the worker instance."""

    def __init__(
        self,
        owner_of: Callable[[str], str | None],
        trace_context_of: Callable[[str], dict[str, str]],
        publish: Callable[[list[OutputDelta]], None],
        adopt: Callable[[RequestHandoff], None],
        forget: Callable[[str], None],
        is_draining: Callable[[], bool],
        on_count_changed: Callable[[], None],
        on_migrated: Callable[[MigrationResult, MigrationMode], None] = lambda result, mode: None,
    ) -> None:
        """on_migrated(result, mode): each outgoing migration's end (the metrics)."""
        self.owner_of = owner_of
        self.trace_context_of = trace_context_of
        self.publish = publish
        self.adopt = adopt
        self.forget = forget
        self.is_draining = is_draining
        self.on_count_changed = on_count_changed
        self.on_migrated = on_migrated
