"""Dispatch policies: choose the instance for a new request."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.policies.load import InstanceLoad
from services.scheduler.policies.registry import register_dispatch


@dataclass(frozen=True)
class DispatchInfo:
    """What a dispatch policy knows about the new request."""

    request_id: str
    num_prompt_tokens: int
    priority: int = 0


class DispatchPolicy:
    """Base class: `choose` returns an instance id from loads, or None if none fits."""

    name = "base"

    def choose(self, loads: Sequence[InstanceLoad], request: DispatchInfo) -> str | None:
        raise NotImplementedError


@register_dispatch("freest")
class FreestDispatch(DispatchPolicy):
    """Llumnix: the instance with the highest freeness; ties go to the lowest id."""

    name = "freest"

    def choose(self, loads, request):
        candidates = [load for load in loads if not load.is_terminating]
        if not candidates:
            return None
        best = max(candidates, key=lambda load: (load.freeness, _neg_id(load.instance_id)))
        return best.instance_id


@register_dispatch("round_robin")
class RoundRobinDispatch(DispatchPolicy):
    """Baseline: instances in id order, one after another."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, loads, request):
        candidates = sorted(load.instance_id for load in loads if not load.is_terminating)
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)]


def _neg_id(instance_id: str) -> tuple[int, ...]:
    # max() with ties broken toward the lexicographically smallest id.
    return tuple(-ord(c) for c in instance_id)
