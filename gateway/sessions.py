"""In-flight sessions of this gateway by request id, shared by both client APIs and the
workers' output sinks: routes worker outputs and instance losses to the sessions."""

from __future__ import annotations

import asyncio

from gateway.session import GenerationSession
from services.common.errors import AlreadyExistsError
from services.common.logging import get_logger

log = get_logger(__name__)


class SessionTable:
    """In-flight sessions by request id; routes worker outputs and instance losses."""

    def __init__(self) -> None:
        self._sessions: dict[str, GenerationSession] = {}
        # on_moved(instance_id, address): a request migrated there (watch that worker).
        self.on_moved = None
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: GenerationSession) -> None:
        if session.request_id in self._sessions:
            raise AlreadyExistsError(f"request_id {session.request_id!r} is already in flight")
        self._sessions[session.request_id] = session
        self._empty.clear()

    def remove(self, session: GenerationSession) -> None:
        if self._sessions.get(session.request_id) is session:
            del self._sessions[session.request_id]
        if not self._sessions:
            self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def get(self, request_id: str) -> GenerationSession | None:
        return self._sessions.get(request_id)

    def on_outputs(self, instance_id: str, deltas) -> list[str]:
        """Route a batch; returns the ids of unfinished requests no session here owns."""
        orphans = []
        for delta in deltas:
            session = self._sessions.get(delta.request_id)
            if session is not None:
                if delta.moved_to_instance_id and self.on_moved is not None:
                    self.on_moved(delta.moved_to_instance_id, delta.moved_to_address)
                if delta.moved_to_instance_id and session.on_moved is not None:
                    session.on_moved(delta.moved_to_instance_id, delta.moved_to_address)
                session.tracker.on_output(delta, instance_id)
            elif not delta.is_finished:
                orphans.append(delta.request_id)
        return orphans

    def on_instance_lost(self, instance_id: str, reason: str) -> None:
        num_affected = sum(
            s.tracker.mark_lost(instance_id, reason) for s in self._sessions.values()
        )
        if num_affected:
            log.warning(
                "instance_lost_requests", instance_id=instance_id, num_requests=num_affected
            )
