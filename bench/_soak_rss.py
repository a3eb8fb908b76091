"""Resident memory of the mesh's processes over a soak, and its slope after warm-up.

RSS is read from /proc/PID/status (VmRSS, kB) every `interval_s` on a thread; the
slope is an ordinary least-squares fit of MiB against minutes over the samples after
`warmup_s`, so a flat process reads ~0 and a leak reads its growth per minute.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


def read_rss_mib(pid: int) -> float | None:
    """VmRSS of a live process in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute (0 below 2)."""
    if len(samples) < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_v = sum(v for _, v in samples) / len(samples)
    var_t = sum((t - mean_t) ** 2 for t, _ in samples)
    if var_t == 0:
        return 0.0
    cov = sum((t - mean_t) * (v - mean_v) for t, v in samples)
    return cov / var_t * 60.0


@dataclass
class RssSampler:
    """Samples every named PID until stopped: `samples[name]` = [(seconds, MiB)]."""

    pids: dict[str, int]
    interval_s: float = 1.0
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started_at: float = 0.0

    def start(self) -> RssSampler:
        self._started_at = time.monotonic()
        self.samples = {name: [] for name in self.pids}
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            now = time.monotonic() - self._started_at
            for name, pid in self.pids.items():
                rss = read_rss_mib(pid)
                if rss is not None:
                    self.samples[name].append((now, rss))
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self, warmup_s: float) -> dict[str, dict[str, float]]:
        """Per process: RSS at the end of warm-up and at the end, and the slope after."""
        result = {}
        for name, samples in self.samples.items():
            after = [(t, v) for t, v in samples if t >= warmup_s] or samples[-2:]
            result[name] = {
                "rss_start_mib": round(after[0][1], 1) if after else 0.0,
                "rss_end_mib": round(samples[-1][1], 1) if samples else 0.0,
                "rss_slope_mib_per_min": round(slope_per_min(after), 3),
            }
        return result
