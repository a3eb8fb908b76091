"""Every migration's first stage is sent under a transfer id the destination does not
wait for, so the data plane times out (transfer_timeout_s) on both sides."""

from __future__ import annotations

from services.common.logging import get_logger
from services.worker.migration.faults import FaultHooks

log = get_logger(__name__)


class MisdirectFirstStage(FaultHooks):
    def transfer_id(self, stage_index: int, transfer_id: str) -> str:
        if stage_index != 0:
            return transfer_id
        log.warning("migration_fault_misdirect", stage_index=stage_index)
        return transfer_id + "-misdirected"


migration_faults = MisdirectFirstStage()
