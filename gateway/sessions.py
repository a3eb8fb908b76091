"""In-flight sessions of this gateway by request id, shared by both client APIs and the
workers' output sinks: routes worker outputs and instance losses to the sessions.

Outputs for a request no session here owns are an orphan to abort only when this
gateway served the request itself (e.g. its Submit landed after the client left). A
request it never served belongs to another gateway: typically the one that ran at this
address before a restart, whose clients are resuming their streams elsewhere right
now (docs/mesh.md, "Gateway failover"); aborting it would make those resumes find
nothing. Its worker keeps it until a resume re-homes it, or it finishes.
"""

from __future__ import annotations

import asyncio
import collections

from gateway.session import GenerationSession
from services.common.errors import AlreadyExistsError
from services.common.logging import get_logger

log = get_logger(__name__)

MAX_ENDED_IDS = 10_000  # sessions remembered after they ended, for orphan aborts


class SessionTable:
    """In-flight sessions by request id; routes worker outputs and instance losses."""

    def __init__(self) -> None:
        self._sessions: dict[str, GenerationSession] = {}
        # on_moved(instance_id, address): a request migrated there (watch that worker).
        self.on_moved = None
        # Ids of the sessions that ended here, the newest last (orphans we may abort).
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: GenerationSession) -> None:
        if session.request_id in self._sessions:
            raise AlreadyExistsError(f"request_id {session.request_id!r} is already in flight")
        self._sessions[session.request_id] = session
        self._empty.clear()

    def remove(self, session: GenerationSession, served: bool = True) -> None:
        """served=False: it never ran here (a resume's placeholder): its request's
        later outputs are not this gateway's orphans."""
        if self._sessions.get(session.request_id) is session:
            del self._sessions[session.request_id]
            if served:
                self._ended[session.request_id] = None
                self._ended.move_to_end(session.request_id)
                if len(self._ended) > MAX_ENDED_IDS:
                    self._ended.popitem(last=False)
        if not self._sessions:
            self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def get(self, request_id: str) -> GenerationSession | None:
        return self._sessions.get(request_id)

    def on_outputs(self, instance_id: str, deltas) -> list[str]:
        """Route a batch; returns the ids of unfinished requests that a session here
        served but none owns any more (orphans: abort them)."""
        orphans = []
        for delta in deltas:
            session = self._sessions.get(delta.request_id)
            if session is not None:
                if delta.moved_to_instance_id and self.on_moved is not None:
                    self.on_moved(delta.moved_to_instance_id, delta.moved_to_address)
                if delta.moved_to_instance_id and session.on_moved is not None:
                    session.on_moved(delta.moved_to_instance_id, delta.moved_to_address)
                session.tracker.on_output(delta, instance_id)
            elif not delta.is_finished and delta.request_id in self._ended:
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
