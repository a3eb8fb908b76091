"""Synthetic and trace workloads: when requests arrive and how long they are.

A workload is a list of `SimRequest` sorted by arrival time, drawn from a seed:

    arrivals   poisson        exponential gaps, mean 1/rate
               gamma          gamma gaps with mean 1/rate and coefficient of variation
                              `cv` (cv > 1 is bursty: shape 1/cv^2, scale cv^2/rate)
    lengths    fixed:N        always N
               uniform:LO:HI  integers in [LO, HI]
               exponential:M  mean M (at least 1)
               zipf:A:LO:HI   long tail: P(n) ~ n^-A on [LO, HI] (bounded power law,
                              drawn by inverting the continuous CDF, then floored)
    trace      CSV with columns arrival_time_s, prompt_len, output_len[, priority]
               (a header row is required; extra columns are ignored)

Prompt and output lengths come from independent random streams, so changing one
distribution does not reshuffle the other. `max_total_tokens` truncates the output so
prompt + output fits the model's context.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.config import ConfigError, require

LENGTH_KINDS = ("fixed", "uniform", "exponential", "zipf")
ARRIVAL_KINDS = ("poisson", "gamma")


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a workload."""

    request_id: str
    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    priority: int = 0


@dataclass(frozen=True)
class LengthDistribution:
    """A token-length distribution; build it with `parse_length`."""

    kind: str  # one of LENGTH_KINDS
    params: tuple[float, ...]

    def __post_init__(self) -> None:
        require(
            self.kind in LENGTH_KINDS, f"length kind {self.kind!r} is not one of {LENGTH_KINDS}"
        )
        expected = {"fixed": 1, "uniform": 2, "exponential": 1, "zipf": 3}[self.kind]
        require(
            len(self.params) == expected,
            f"{self.spec!r}: {self.kind} takes {expected} parameter(s)",
        )
        if self.kind == "fixed":
            require(self.params[0] >= 1, f"{self.spec!r}: length must be >= 1")
        if self.kind == "uniform":
            require(1 <= self.params[0] <= self.params[1], f"{self.spec!r}: need 1 <= LO <= HI")
        if self.kind == "exponential":
            require(self.params[0] >= 1, f"{self.spec!r}: mean must be >= 1")
        if self.kind == "zipf":
            alpha, lo, hi = self.params
            require(alpha > 0 and 1 <= lo <= hi, f"{self.spec!r}: need A > 0 and 1 <= LO <= HI")

    @property
    def spec(self) -> str:
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n lengths (int64, each >= 1)."""
        p = self.params
        if self.kind == "fixed":
            out = np.full(n, int(p[0]))
        elif self.kind == "uniform":
            out = rng.integers(int(p[0]), int(p[1]), size=n, endpoint=True)
        elif self.kind == "exponential":
            out = np.ceil(rng.exponential(p[0], size=n))
        else:
            out = _bounded_power_law(rng, n, *p)
        return np.maximum(out.astype(np.int64), 1)

    def mean(self) -> float:
        """The distribution's mean (before context truncation)."""
        p = self.params
        if self.kind == "fixed":
            return p[0]
        if self.kind == "uniform":
            return (p[0] + p[1]) / 2
        if self.kind == "exponential":
            return p[0]
        return float(_bounded_power_law(np.random.default_rng(0), 200_000, *p).mean())


def _bounded_power_law(rng: np.random.Generator, n: int, alpha: float, lo: float, hi: float):
    # Inverse CDF of density ~ x^-alpha on [lo, hi + 1), floored to integers in [lo, hi].
    u = rng.random(n)
    top = hi + 1
    if math.isclose(alpha, 1.0):
        x = lo * (top / lo) ** u
    else:
        a, b = lo ** (1 - alpha), top ** (1 - alpha)
        x = (a + u * (b - a)) ** (1 / (1 - alpha))
    return np.minimum(np.floor(x), hi)


def parse_length(spec: str) -> LengthDistribution:
    """'fixed:128', 'uniform:32:512', 'exponential:256', 'zipf:1.2:16:4096'."""
    kind, *rest = spec.split(":")
    try:
        params = tuple(float(x) for x in rest)
    except ValueError:
        raise ConfigError(f"length {spec!r}: parameters must be numbers") from None
    return LengthDistribution(kind, params)


@dataclass(frozen=True)
class WorkloadConfig:
    """A synthetic workload."""

    num_requests: int = 1000
    # Mean arrival rate in requests per second.
    rate: float = 10.0
    # "poisson" or "gamma".
    arrival: str = "gamma"
    # Coefficient of variation of gamma gaps (1 = Poisson-like; > 1 is bursty).
    cv: float = 4.0
    # Optional time-varying rate: (duration_s, rate) segments, repeated; replaces `rate`.
    rate_schedule: tuple[tuple[float, float], ...] = ()
    prompt: LengthDistribution = LengthDistribution("zipf", (1.1, 16, 4000))
    output: LengthDistribution = LengthDistribution("zipf", (1.1, 16, 4000))
    # Fraction of requests with priority 1 (high).
    high_priority_fraction: float = 0.0
    # prompt + output is truncated to this (the model's context).
    max_total_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.num_requests >= 1, f"num_requests={self.num_requests} must be >= 1")
        require(self.rate > 0, f"rate={self.rate} must be > 0")
        require(
            self.arrival in ARRIVAL_KINDS, f"arrival={self.arrival!r} is not one of {ARRIVAL_KINDS}"
        )
        require(self.cv > 0, f"cv={self.cv} must be > 0")
        for duration, rate in self.rate_schedule:
            require(
                duration > 0 and rate > 0,
                f"rate_schedule segment ({duration}, {rate}) needs positive values",
            )
        require(
            0 <= self.high_priority_fraction <= 1,
            f"high_priority_fraction={self.high_priority_fraction} must be in [0, 1]",
        )
        require(
            self.max_total_tokens >= 2, f"max_total_tokens={self.max_total_tokens} must be >= 2"
        )


def generate(config: WorkloadConfig) -> list[SimRequest]:
    """The workload's requests, sorted by arrival; identical for identical configs."""
    n = config.num_requests
    streams = np.random.SeedSequence(config.seed).spawn(4)
    arrival_rng, prompt_rng, output_rng, priority_rng = (np.random.default_rng(s) for s in streams)
    # Gaps in units of "expected arrivals" (mean 1), then mapped onto the clock.
    if config.arrival == "poisson":
        gaps = arrival_rng.exponential(1.0, size=n)
    else:
        shape = 1.0 / config.cv**2
        gaps = arrival_rng.gamma(shape, 1.0 / shape, size=n)
    work = np.cumsum(gaps) - gaps[0]  # the first request arrives at t = 0
    if config.rate_schedule:
        arrivals = _time_of_work(work, config.rate_schedule)
    else:
        arrivals = work / config.rate
    prompts = np.minimum(config.prompt.sample(prompt_rng, n), config.max_total_tokens - 1)
    outputs = np.minimum(config.output.sample(output_rng, n), config.max_total_tokens - prompts)
    is_high = priority_rng.random(n) < config.high_priority_fraction
    width = len(str(n - 1))
    return [
        SimRequest(
            f"r{i:0{width}d}", float(arrivals[i]), int(prompts[i]), int(outputs[i]), int(is_high[i])
        )
        for i in range(n)
    ]


def _time_of_work(work: np.ndarray, schedule: tuple[tuple[float, float], ...]) -> np.ndarray:
    """Inverts the cumulative rate of a repeating piecewise-constant schedule (time
    rescaling), so bursts keep their shape while the mean rate follows the schedule."""
    durations = np.array([d for d, _ in schedule])
    rates = np.array([r for _, r in schedule])
    segment_work = durations * rates
    work_start = np.concatenate(([0.0], np.cumsum(segment_work)[:-1]))
    time_start = np.concatenate(([0.0], np.cumsum(durations)[:-1]))
    cycle_work, cycle_time = segment_work.sum(), durations.sum()
    cycles, rest = np.divmod(work, cycle_work)
    segment = np.searchsorted(work_start, rest, side="right") - 1
    return cycles * cycle_time + time_start[segment] + (rest - work_start[segment]) / rates[segment]


def load_trace(path: str | Path, max_total_tokens: int | None = None) -> list[SimRequest]:
    """Requests from a CSV trace (arrival_time_s, prompt_len, output_len[, priority])."""
    requests: list[SimRequest] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"arrival_time_s", "prompt_len", "output_len"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"trace {str(path)!r}: missing column(s) {sorted(missing)}")
        for line_no, row in enumerate(reader, start=2):
            try:
                arrival = float(row["arrival_time_s"])
                prompt, output = int(row["prompt_len"]), int(row["output_len"])
                priority = int(row.get("priority") or 0)
            except ValueError:
                raise ValueError(
                    f"trace {str(path)!r} line {line_no}: bad number in {row}"
                ) from None
            if arrival < 0 or prompt < 1 or output < 1:
                raise ValueError(
                    f"trace {str(path)!r} line {line_no}: need arrival >= 0 and lengths >= 1"
                )
            if max_total_tokens is not None:
                prompt = min(prompt, max_total_tokens - 1)
                output = min(output, max_total_tokens - prompt)
            requests.append(SimRequest("", arrival, prompt, output, priority))
    requests.sort(key=lambda r: r.arrival_s)
    width = len(str(max(len(requests) - 1, 0)))
    return [
        SimRequest(
            f"r{i:0{width}d}", r.arrival_s, r.num_prompt_tokens, r.num_output_tokens, r.priority
        )
        for i, r in enumerate(requests)
    ]
