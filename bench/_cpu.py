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
