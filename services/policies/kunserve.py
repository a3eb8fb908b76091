"""KunServe group policies: when a set of instances drops its replicated layers and
serves as one pipeline, and when the group restores.

The scheduler (or the simulator) calls `decide(loads, now)` every
`GroupConfig.interval_s` with fresh snapshots; the decision names the groups to form
(member ids in stage order) and the groups to restore. The policies are stateful only
through time: what held since when (votes, the restore condition, hysteresis).

    vote        an instance alone, not terminating, whose KV demand ((used blocks +
                blocks its waiting requests need) / total) has stayed >=
                `vote_demand_at_least` for `vote_window_s` and whose queued demand is at
                least its free blocks: memory, not compute, holds its queue back.
                Demand, not usage: an instance that preempts to make room drops its
                usage (to 0.76 in a live burst) while its demand stays above 1; a
                usage rule reset the vote at every preemption and held a second group
                back by 36 s.
    plan        voters (never members of a group, never terminating, never an
                instance restored less than `hold_s` ago) sorted by queued demand,
                most first, then by blocks in use, fewest first (less KV to
                exchange), leaving out for this round any with a migration in
                flight (its worker would refuse); the group size is the smallest of
                `group_sizes` whose freed memory covers the members' queued demand
                beyond their free blocks (the largest size otherwise) and for which
                there are enough voters. Several groups may form in one round, over disjoint voters.
    restore     a group serving for at least `hold_s` whose stage 0 reports no
                waiting requests and usage <= `restore_usage_at_most`, falling (lower
                than `restore_window_s` ago) and low for that whole window.

Capacity of a group of g members with weight share w (weights / memory of a member):
(g - w) / (g (1 - w)) times what the g members hold alone (docs/kunserve.md), so the
freed blocks are (gain(g) - 1) x the members' total blocks.

Registered names:
    kunserve    the rules above.
    llmesh      the rules above, but a planned drop waits while migration can absorb
                it: votes count as for kunserve, and this round's drops are skipped
                while the voters' queued demand beyond their free blocks
                (queued_excess_blocks, summed) fits in the room of the migration
                destinations, i.e. the free blocks beyond their own queues of every
                instance alone, not terminating and not voting, whose freeness is above
                `migration_dst_freeness_above`. So Llumnix's migration moves what it
                can, and the group forms as soon as the room left is too small (the
                votes have held meanwhile: no new window). Once there is no room, a
                voter the plan leaves over (too few voters to group) leads a group of
                the smallest size with the instances alone whose vote condition holds
                now, their window still running (plan order): migration keeps the
                instances alone level, so they are in the same overload, and waiting
                for their windows only lets the queue grow.
    none        never forms a group (every KV-centric baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.config import require
from services.policies.groups import capacity_gain
from services.policies.load import InstanceLoad
from services.policies.registry import register_group


@dataclass(frozen=True)
class GroupConfig:
    """Knobs of the group loop and its policies."""

    # Seconds between decisions.
    interval_s: float = 0.25
    # An instance votes while its KV demand ((used + queued blocks) / total) stays at
    # least this and its queued demand is at least its free blocks (which alone makes
    # demand >= 1: a value above 1 asks for a queue that much beyond memory)...
    vote_demand_at_least: float = 0.95
    # ...for this long.
    vote_window_s: float = 1.0
    # Group sizes the model's layer count allows, smallest first.
    group_sizes: tuple[int, ...] = (2, 4)
    # Weights / memory of one member (7B on a 24 GB GPU: 0.55).
    weight_share: float = 0.55
    # A group restores once its usage stayed at or below this, falling...
    restore_usage_at_most: float = 0.5
    # ...for this long, with nothing waiting.
    restore_window_s: float = 2.0
    # Hysteresis: a group serves at least this long; a restored instance does not
    # vote again for this long.
    hold_s: float = 5.0
    # `llmesh` only: an instance alone with freeness above this can take migrations.
    migration_dst_freeness_above: float = 4.0

    def __post_init__(self) -> None:
        require(self.interval_s > 0, f"interval_s={self.interval_s} must be > 0")
        require(
            self.vote_demand_at_least > 0,
            f"vote_demand_at_least={self.vote_demand_at_least} must be > 0",
        )
        require(
            0 <= self.restore_usage_at_most < self.vote_demand_at_least,
            f"restore_usage_at_most={self.restore_usage_at_most} must be in "
            f"[0, vote_demand_at_least={self.vote_demand_at_least})",
        )
        require(self.vote_window_s >= 0, f"vote_window_s={self.vote_window_s} must be >= 0")
        require(
            self.restore_window_s >= 0, f"restore_window_s={self.restore_window_s} must be >= 0"
        )
        require(self.hold_s >= 0, f"hold_s={self.hold_s} must be >= 0")
        require(
            len(self.group_sizes) > 0
            and all(isinstance(g, int) and g >= 2 for g in self.group_sizes)
            and list(self.group_sizes) == sorted(set(self.group_sizes)),
            f"group_sizes={self.group_sizes} must be increasing ints >= 2",
        )
        require(0 <= self.weight_share < 1, f"weight_share={self.weight_share} must be in [0, 1)")


def usage(load: InstanceLoad) -> float:
    """Used / total KV blocks (0 for an instance with no blocks)."""
    return load.num_used_blocks / load.num_total_blocks if load.num_total_blocks else 0.0


def demand(load: InstanceLoad) -> float:
    """KV demand over the instance's blocks: (used + what its waiting requests need) /
    total. Unlike usage, a preemption does not lower it (the preempted request's blocks
    come back as queued demand), so a vote does not reset each time the instance
    preempts to make room (0 for an instance with no blocks)."""
    if not load.num_total_blocks:
        return 0.0
    return (load.num_used_blocks + load.num_waiting_blocks) / load.num_total_blocks


def queued_excess_blocks(load: InstanceLoad) -> int:
    """Blocks the waiting requests need beyond the free ones (0 if they fit)."""
    free = load.num_total_blocks - load.num_used_blocks
    return max(0, load.num_waiting_blocks - free)


@dataclass(frozen=True)
class GroupDecision:
    """Groups to form (member ids, stage order) and groups to restore, this round."""

    drops: tuple[tuple[str, ...], ...] = ()
    restores: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()  # one line per drop, then per restore

    @property
    def is_empty(self) -> bool:
        return not self.drops and not self.restores


NO_DECISION = GroupDecision()


class GroupPolicy:
    """Base class: `decide(loads, now)` returns this round's drops and restores."""

    name = "base"

    def __init__(self, config: GroupConfig | None = None) -> None:
        self.config = config or GroupConfig()

    def decide(self, loads: Sequence[InstanceLoad], now: float) -> GroupDecision:
        raise NotImplementedError

    def note_formed(self, group_id: str, now: float) -> None:
        """The caller formed `group_id` (hysteresis counts from here)."""

    def note_restored(self, member_ids: Sequence[str], now: float) -> None:
        """The caller restored a group of these members."""


@register_group("none")
class NoGroups(GroupPolicy):
    """Never drops (the KV-centric baselines: recompute, llumnix)."""

    name = "none"

    def decide(self, loads, now):
        return NO_DECISION


@dataclass
class _Watch:
    """Since when a condition has held (None: it does not hold now)."""

    since: float | None = None

    def update(self, holds: bool, now: float) -> float:
        """Seconds it has held (0 the first time; -1 when it does not hold)."""
        if not holds:
            self.since = None
            return -1.0
        if self.since is None:
            self.since = now
        return now - self.since


@dataclass
class _GroupWatch:
    formed_at: float
    low: _Watch = field(default_factory=_Watch)
    history: list[tuple[float, float]] = field(default_factory=list)  # (time, usage)


@register_group("kunserve")
class KunServeGroups(GroupPolicy):
    """Votes over a window, a plan by queued demand and exchange size, restore with
    hysteresis (module docstring)."""

    name = "kunserve"

    def __init__(self, config: GroupConfig | None = None) -> None:
        super().__init__(config)
        self._votes: dict[str, _Watch] = {}
        self._groups: dict[str, _GroupWatch] = {}
        self._restored_at: dict[str, float] = {}

    # ---- hooks from the caller ----------------------------------------------------------

    def note_formed(self, group_id: str, now: float) -> None:
        self._groups[group_id] = _GroupWatch(formed_at=now)

    def note_restored(self, member_ids: Sequence[str], now: float) -> None:
        for instance_id in member_ids:
            self._restored_at[instance_id] = now
            self._votes.pop(instance_id, None)

    # ---- the decision -------------------------------------------------------------------

    def may_drop(self, voters: Sequence[InstanceLoad], alone: Sequence[InstanceLoad]) -> bool:
        """Whether this round's voters may form groups (`llmesh` narrows it); the votes
        keep counting either way."""
        return True

    def partners(
        self, left: Sequence[InstanceLoad], voting: Sequence[InstanceLoad]
    ) -> tuple[list[tuple[str, ...]], list[str]]:
        """Groups for the voters the plan left over (too few to group), once the drop
        is allowed; `voting`: the other instances alone, free to join, whose vote
        condition holds now but whose window has not run out (`llmesh` groups them
        with the voters; kunserve waits for their votes)."""
        return [], []

    def decide(self, loads, now):
        alone = [ld for ld in loads if not ld.is_in_group and not ld.is_terminating]
        voters = self._voters(alone, now)
        if voters and not self.may_drop(voters, alone):
            voters = []
        # A worker refuses to join a group while a migration of its runs (either end):
        # such a voter keeps its vote and is planned once the migration is over.
        ready = [ld for ld in voters if ld.num_migrating == 0]
        drops, reasons = self._plan(ready)
        planned = {i for group in drops for i in group}
        left = [ld for ld in ready if ld.instance_id not in planned]
        voter_ids = {ld.instance_id for ld in voters}
        voting = [
            ld
            for ld in alone
            if ld.instance_id not in voter_ids
            and ld.num_migrating == 0
            and self.is_voting(ld.instance_id)
        ]
        more, more_reasons = self.partners(left, voting) if left else ([], [])
        drops, reasons = drops + more, reasons + more_reasons
        restores, restore_reasons = self._restores(loads, now)
        for group in drops:
            for instance_id in group:
                self._votes.pop(instance_id, None)
        return GroupDecision(tuple(drops), tuple(restores), tuple(reasons + restore_reasons))

    def _voters(self, alone: Sequence[InstanceLoad], now: float) -> list[InstanceLoad]:
        cfg = self.config
        seen = {ld.instance_id for ld in alone}
        for instance_id in list(self._votes):
            if instance_id not in seen:
                del self._votes[instance_id]
        voters = []
        for ld in alone:
            restored_at = self._restored_at.get(ld.instance_id)
            if restored_at is not None and now - restored_at < cfg.hold_s:
                self._votes.pop(ld.instance_id, None)
                continue
            free = ld.num_total_blocks - ld.num_used_blocks
            holds = (
                ld.num_total_blocks > 0
                and demand(ld) >= cfg.vote_demand_at_least
                and ld.num_waiting > 0
                and ld.num_waiting_blocks >= free
            )
            held_s = self._votes.setdefault(ld.instance_id, _Watch()).update(holds, now)
            if held_s >= cfg.vote_window_s:
                voters.append(ld)
        return voters

    def is_voting(self, instance_id: str) -> bool:
        """Whether the instance's vote condition holds now (its window may be running)."""
        watch = self._votes.get(instance_id)
        return watch is not None and watch.since is not None

    def _plan(self, voters: list[InstanceLoad]) -> tuple[list[tuple[str, ...]], list[str]]:
        cfg = self.config
        ranked = sorted(voters, key=plan_rank)
        drops, reasons = [], []
        while len(ranked) >= cfg.group_sizes[0]:
            size = self._size(ranked)
            members, ranked = ranked[:size], ranked[size:]
            drops.append(tuple(ld.instance_id for ld in members))
            reasons.append(
                f"drop g={size}: {', '.join(ld.instance_id for ld in members)} "
                f"(queued beyond free: {sum(queued_excess_blocks(ld) for ld in members)} blocks)"
            )
        return drops, reasons

    def _size(self, ranked: list[InstanceLoad]) -> int:
        """The smallest allowed size whose freed blocks cover its members' excess."""
        cfg = self.config
        fitting = [g for g in cfg.group_sizes if g <= len(ranked)]
        for g in fitting:
            members = ranked[:g]
            total = sum(ld.num_total_blocks for ld in members)
            freed = (capacity_gain(g, cfg.weight_share) - 1) * total
            if freed >= sum(queued_excess_blocks(ld) for ld in members):
                return g
        return fitting[-1]

    def _restores(self, loads: Sequence[InstanceLoad], now: float) -> tuple[list[str], list[str]]:
        cfg = self.config
        leaders = {ld.group_id: ld for ld in loads if ld.is_in_group and not ld.is_group_follower}
        for group_id in list(self._groups):
            if group_id not in {ld.group_id for ld in loads if ld.is_in_group}:
                del self._groups[group_id]  # dissolved (by us or otherwise)
        restores, reasons = [], []
        for group_id, leader in sorted(leaders.items()):
            watch = self._groups.setdefault(group_id, _GroupWatch(formed_at=now))
            current = usage(leader)
            watch.history.append((now, current))
            window_start = now - cfg.restore_window_s
            while len(watch.history) > 1 and watch.history[1][0] <= window_start:
                watch.history.pop(0)
            before = watch.history[0][1]
            low = leader.num_waiting == 0 and current <= cfg.restore_usage_at_most
            held_s = watch.low.update(low, now)
            falling = current < before or current == 0
            if now - watch.formed_at >= cfg.hold_s and held_s >= cfg.restore_window_s and falling:
                restores.append(group_id)
                reasons.append(
                    f"restore {group_id}: usage {current:.2f} (was {before:.2f}), nothing waiting"
                )
        return restores, reasons


def plan_rank(load: InstanceLoad) -> tuple[int, int, str]:
    """Plan order: most queued demand beyond free blocks, then fewest blocks in use
    (less KV to exchange), then id."""
    return (-queued_excess_blocks(load), load.num_used_blocks, load.instance_id)


def migration_room_blocks(load: InstanceLoad) -> int:
    """Free blocks beyond what the instance's own queue needs (0 if its queue fills them)."""
    free = load.num_total_blocks - load.num_used_blocks
    return max(0, free - load.num_waiting_blocks)


@register_group("llmesh")
class LlmeshGroups(KunServeGroups):
    """KunServe's rules; a drop waits while migration destinations can absorb the
    voters' queued excess (module docstring)."""

    name = "llmesh"

    def may_drop(self, voters: Sequence[InstanceLoad], alone: Sequence[InstanceLoad]) -> bool:
        threshold = self.config.migration_dst_freeness_above
        voter_ids = {ld.instance_id for ld in voters}
        room = sum(
            migration_room_blocks(ld)
            for ld in alone
            if ld.instance_id not in voter_ids and ld.freeness > threshold
        )
        return sum(queued_excess_blocks(ld) for ld in voters) > room

    def partners(self, left, voting):
        """Each voter left over leads a group of the smallest size, filled with the
        instances alone whose vote holds now but whose window has not run out yet
        (most queued demand first). This runs only once `may_drop` found no room for
        the voters' excess: migration keeps the instances alone level, so a voter with
        no room left anywhere speaks for the others already voting, and waiting for
        their windows only lets the queue grow (docs/simulator.md, "Burst results")."""
        waiting = sorted(voting, key=plan_rank)
        size = self.config.group_sizes[0]
        drops, reasons = [], []
        for voter in sorted(left, key=plan_rank):
            if len(waiting) < size - 1:
                break
            members, waiting = [voter, *waiting[: size - 1]], waiting[size - 1 :]
            drops.append(tuple(ld.instance_id for ld in members))
            reasons.append(
                f"drop g={size}: {', '.join(ld.instance_id for ld in members)} "
                f"(no migration room; {voter.instance_id} voted, the others are voting; "
                f"queued beyond free: {sum(queued_excess_blocks(ld) for ld in members)} blocks)"
            )
        return drops, reasons
