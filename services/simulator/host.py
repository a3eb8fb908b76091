"""Instances that share one machine's CPU cores (the fidelity mesh).

By default every simulated instance has its own accelerator: a step lasts what the
cost model says, and the mesh around the engines costs nothing or a fixed latency. The
fidelity bench runs its real workers, gateway, scheduler and client as processes on
one machine, so they all compete for its few cores. `SharedHost` models that as
processor sharing: each job (an instance's step, a request's way through gateway,
scheduler and worker, the streaming of a step's tokens back to the client) is `work_s`
seconds of one core, and while k jobs are running on c cores each advances at
min(1, c / k):

    cores = 2, three jobs of 4 ms started together:
        0 ms ... each runs at 2/3 ... 6 ms  all three end together
    cores = 2, jobs of 2 ms and 4 ms, then a third of 4 ms starts at 1 ms:
        0-1 ms   both at full speed           (1 and 3 ms of work left)
        1-2.5 ms all three at 2/3             (the first ends at 2.5 ms)
        2.5 ms-  two left, full speed again

Other processes on the machine (a loaded host) are `num_background_jobs` runnable
threads on average that never finish: they take their share, each job then advancing
at min(1, c / (k + b)) -- Linux gives every runnable thread an equal share.

A job's end event is scheduled for the current speed; when the number of running jobs
changes the speed, every running job's end is rescheduled and the stale events are
ignored (each carries a ticket, unique over the run).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from services.simulator.loop import EventLoop


@dataclass
class _Job:
    work_left_s: float  # seconds of one core
    on_done: Callable[[Any], None]
    arg: Any
    ticket: int = 0


class SharedHost:
    def __init__(self, loop: EventLoop, num_cores: float, num_background_jobs: float = 0.0) -> None:
        if not num_cores > 0:
            raise ValueError(f"num_cores={num_cores} must be > 0")
        if not num_background_jobs >= 0:
            raise ValueError(f"num_background_jobs={num_background_jobs} must be >= 0")
        self.loop = loop
        self.num_cores = num_cores
        self.num_background_jobs = num_background_jobs
        self._jobs: dict[Hashable, _Job] = {}  # running, in start order
        self._since = 0.0  # virtual time up to which work was accounted
        self._num_tickets = 0  # tickets are unique across jobs: keys are reused
        self.busy_core_s = 0.0  # core-seconds of work done (for utilisation)

    @property
    def num_running(self) -> int:
        return len(self._jobs)

    def speed(self) -> float:
        """Fraction of a core each running job gets."""
        k = len(self._jobs)
        return min(1.0, self.num_cores / (k + self.num_background_jobs)) if k else 1.0

    def run(
        self, key: Hashable, work_s: float, on_done: Callable[[Any], None], arg: Any = None
    ) -> None:
        """Starts a job of `work_s` seconds of one core; `on_done(arg)` runs when it is done.
        `key` names it while it runs (e.g. the instance whose step it is)."""
        assert key not in self._jobs, f"{key!r} is already running"
        self._advance()
        old_speed = self.speed()
        self._jobs[key] = job = _Job(max(0.0, work_s), on_done, arg)
        if self.speed() == old_speed:
            self._schedule_end(key, job)
        else:
            self._schedule_all()

    def _advance(self) -> None:
        now = self.loop.now
        done = (now - self._since) * self.speed()
        if done > 0:
            for job in self._jobs.values():
                self.busy_core_s += min(done, job.work_left_s)
                job.work_left_s = max(0.0, job.work_left_s - done)
        self._since = now

    def _schedule_end(self, key: Hashable, job: _Job) -> None:
        self._num_tickets += 1
        job.ticket = self._num_tickets
        self.loop.at(
            self.loop.now + job.work_left_s / self.speed(), self._on_end, (key, job.ticket)
        )

    def _schedule_all(self) -> None:
        for key, job in self._jobs.items():
            self._schedule_end(key, job)

    def _on_end(self, event: tuple[Hashable, int]) -> None:
        key, ticket = event
        job = self._jobs.get(key)
        if job is None or job.ticket != ticket:
            return  # rescheduled since
        self._advance()
        old_speed = self.speed()
        del self._jobs[key]
        if self.speed() != old_speed:
            self._schedule_all()
        job.on_done(job.arg)
