"""Each request's record as the run's events reach it: first token, tokens generated,
finish, preemptions (and the time they cost), migrations.

Apart from cluster.py because it is bookkeeping, not scheduling: the simulator's event
handlers and the group pipeline report what happened, the ledger keeps the books, and at
the end it checks that every request finished exactly once with all its tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.simulator.metrics import RequestRecord
from services.simulator.result import SimulationError
from services.simulator.workload import SimRequest
from services.worker.engine.outputs import RequestOutput


class RequestLedger:
    def __init__(self, requests: Sequence[SimRequest]) -> None:
        self.records = {
            r.request_id: RequestRecord(
                r.request_id, r.arrival_s, r.priority, r.num_prompt_tokens, r.num_output_tokens
            )
            for r in requests
        }
        self.num_finished = 0

    def note_preempted(self, request_ids: Sequence[str], now: float) -> None:
        """The requests lost their KV; the loss counts from now until their next token."""
        for request_id in request_ids:
            record = self.records[request_id]
            record.num_preemptions += 1
            if math.isnan(record.preempted_at_s):
                record.preempted_at_s = now

    def note_outputs(self, instance_id: str, outputs: Sequence[RequestOutput], now: float) -> None:
        """A step's (or a group's micro-batch's) tokens reach the requests' records."""
        records = self.records
        for out in outputs:
            record = records[out.request_id]
            if record.num_generated == 0:
                record.first_token_s = now
            record.num_generated = out.first_token_index + len(out.new_token_ids)
            if record.preempted_at_s == record.preempted_at_s:  # not NaN: recovering
                record.preemption_loss_s += now - record.preempted_at_s
                record.preempted_at_s = math.nan
            if out.finished:
                record.finish_s = now
                record.num_finishes += 1
                record.instance_id = instance_id
                self.num_finished += 1

    def note_migrated(self, request_id: str) -> None:
        self.records[request_id].num_migrations += 1

    def conserved(self) -> list[RequestRecord]:
        """Every record, once each finished exactly once with all its tokens."""
        records = list(self.records.values())
        for record in records:
            if record.num_finishes != 1 or record.num_generated != record.num_output_tokens:
                raise SimulationError(f"request {record.request_id} broke conservation: {record}")
        return records
