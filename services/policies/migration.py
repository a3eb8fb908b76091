"""Migration pairing policies: which overloaded instance sends requests to which free one.

The global scheduler (or the simulator) calls `pair(loads)` every
`MigrationConfig.interval_s`; each pair tells the source's llumlet to move up to
`num_requests` of its running requests (chosen by a selection policy, selection.py)
to the destination by live migration.

Registered names:
    freeness   Llumnix: sources have freeness below `src_freeness_below` (terminating
               instances always qualify: their freeness is -inf), destinations above
               `dst_freeness_above`; the i-th least free source is paired with the i-th
               freest destination. The default.
    none       never migrates (the round-robin and load-balance baselines).

Members of a KunServe group are never paired: their requests hold KV on every member.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.config import require
from services.policies.load import InstanceLoad
from services.policies.registry import register_migration


@dataclass(frozen=True)
class MigrationConfig:
    """Knobs of the migration loop and of the `freeness` pairing policy."""

    # Seconds between pairing rounds.
    interval_s: float = 0.05
    # An instance whose freeness is below this migrates requests out.
    src_freeness_below: float = 2.0
    # An instance whose freeness is above this accepts migrated requests.
    dst_freeness_above: float = 4.0
    # Requests a normal source moves per pair and round.
    num_requests_per_pair: int = 1
    # Requests a terminating (draining) source moves per pair and round.
    num_drain_requests_per_pair: int = 4
    # An instance already in this many migrations (either direction) is skipped.
    max_migrations_per_instance: int = 2

    def __post_init__(self) -> None:
        require(self.interval_s > 0, f"interval_s={self.interval_s} must be > 0")
        require(
            not (math.isnan(self.src_freeness_below) or math.isnan(self.dst_freeness_above)),
            "src_freeness_below and dst_freeness_above must be numbers",
        )
        require(
            self.dst_freeness_above >= self.src_freeness_below,
            f"dst_freeness_above={self.dst_freeness_above} must be >= "
            f"src_freeness_below={self.src_freeness_below}",
        )
        for name in (
            "num_requests_per_pair",
            "num_drain_requests_per_pair",
            "max_migrations_per_instance",
        ):
            require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class MigrationPair:
    """Move up to `num_requests` running requests from src to dst."""

    src_instance_id: str
    dst_instance_id: str
    num_requests: int


class MigrationPolicy:
    """Base class: `pair` returns the migrations to start this round."""

    name = "base"

    def __init__(self, config: MigrationConfig | None = None) -> None:
        self.config = config or MigrationConfig()

    def pair(self, loads: Sequence[InstanceLoad]) -> list[MigrationPair]:
        raise NotImplementedError


@register_migration("freeness")
class FreenessMigration(MigrationPolicy):
    """Llumnix pairing by freeness rank (least free source <-> freest destination)."""

    name = "freeness"

    def pair(self, loads):
        cfg = self.config
        # A KunServe group's requests hold KV on every member: they do not migrate.
        has_slot = [
            ld
            for ld in loads
            if ld.num_migrating < cfg.max_migrations_per_instance and not ld.is_in_group
        ]
        sources = sorted(
            (
                ld
                for ld in has_slot
                if ld.num_running > 0
                and (ld.is_terminating or ld.freeness < cfg.src_freeness_below)
            ),
            key=lambda ld: (ld.freeness, ld.instance_id),
        )
        destinations = sorted(
            (
                ld
                for ld in has_slot
                if not ld.is_terminating and ld.freeness > cfg.dst_freeness_above
            ),
            key=lambda ld: (-ld.freeness, ld.instance_id),
        )
        return [
            MigrationPair(
                src.instance_id,
                dst.instance_id,
                cfg.num_drain_requests_per_pair
                if src.is_terminating
                else cfg.num_requests_per_pair,
            )
            for src, dst in zip(sources, destinations, strict=False)
        ]


@register_migration("none")
class NoMigration(MigrationPolicy):
    """Never migrates."""

    name = "none"

    def pair(self, loads):
        return []
