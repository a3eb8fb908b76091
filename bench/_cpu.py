"""CPU time of processes and of the whole machine, from /proc (Linux; None elsewhere).

The fidelity bench uses it to tell how much of the machine its mesh used during the
workload and how much went to everything else (another job's tests, say).
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def _ticks_per_s() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one live process (its threads included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Fields after the command name, which may hold spaces: utime and stime are
            # fields 14 and 15 of the line, 12 and 13 after the closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _ticks_per_s()


def processes_cpu_s(pids: Iterable[int]) -> float | None:
    """Summed CPU seconds of several processes; None if any cannot be read."""
    total = 0.0
    for pid in pids:
        seconds = process_cpu_s(pid)
        if seconds is None:
            return None
        total += seconds
    return total


def machine_busy_s() -> float | None:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq;
    not idle, iowait, or steal: time the hypervisor gave to other machines)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks[:7]) - idle - iowait) / _ticks_per_s()


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def num_runnable_threads() -> int | None:
    """Threads runnable on the machine now, running or waiting for a core (the caller
    included)."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def num_running_threads(pids: Iterable[int]) -> int:
    """Threads of these processes in state R (running or runnable) now."""
    count = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "R":
                        count += 1
            except (OSError, IndexError):
                continue
    return count


class BackgroundLoad:
    """Samples, on a thread, how many runnable threads of `pids` (and of this process,
    the sampler's included) and of *other* processes compete for the cores;
    `mean(start, end)` averages the others over a time window (perf_counter),
    `mean_own(start, end)` the mesh's own."""

    def __init__(self, pids: Iterable[int], interval_s: float = 0.25) -> None:
        import threading

        self.pids = sorted({*pids, os.getpid()})
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (time, others)
        self.own_samples: list[tuple[float, int]] = []  # (time, own runnable threads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="background-load", daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import time

        while not self._stop.is_set():
            total = num_runnable_threads()
            if total is not None:
                own = num_running_threads(self.pids)
                now = time.perf_counter()
                self.samples.append((now, max(0, total - own)))
                self.own_samples.append((now, max(0, own - 1)))  # not the sampler
            self._stop.wait(self.interval_s)

    def mean(self, start: float, end: float) -> float | None:
        return _mean_in(self.samples, start, end)

    def mean_own(self, start: float, end: float) -> float | None:
        return _mean_in(self.own_samples, start, end)


def _mean_in(samples: list[tuple[float, int]], start: float, end: float) -> float | None:
    window = [n for t, n in samples if start <= t <= end]
    return sum(window) / len(window) if window else None


def effective_background(cores: float, own_threads: float | None, own_cores: float | None):
    """Background threads b for which processor sharing gives the mesh the CPU it got:
    each of its k runnable threads advanced at s = own_cores / k = cores / (k + b), so
    b = k (cores / own_cores - 1). (Linux shares between sessions before threads, so the
    count of others' runnable threads alone misstates the share; this measures it.)
    None when unknown; 0 when the mesh was not short of cores."""
    if not own_threads or not own_cores:
        return None
    return max(0.0, own_threads * (cores / own_cores - 1))
