"""Per-request sampling parameters and the request's deterministic random stream.

Torch-free: the scheduler, the simulator and the wire formats use these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.worker.engine.errors import InvalidSamplingParamsError

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token and when to stop."""

    max_tokens: int = 16  # most new tokens to generate (> 0)
    temperature: float = 0.0  # 0 = greedy (argmax); > 0 = sample from softmax(logits / T)
    top_p: float = 1.0  # nucleus: keep the smallest prefix of sorted probs reaching top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    seed: int | None = None  # the random stream; None = the engine draws one at admission
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end generation (the id is emitted)
    ignore_eos: bool = False  # keep going past the model's EOS ids

    def __post_init__(self) -> None:
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(
            _is_int(self.max_tokens) and self.max_tokens > 0,
            "max_tokens",
            self.max_tokens,
            "an int > 0",
        )
        _check(
            _is_number(self.temperature)
            and math.isfinite(self.temperature)
            and self.temperature >= 0,
            "temperature",
            self.temperature,
            "a finite number >= 0",
        )
        _check(
            _is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
            "top_p",
            self.top_p,
            "a number in (0, 1]",
        )
        _check(
            _is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an int >= 0 (0 = off)"
        )
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "None or an int")
        _check(
            isinstance(self.stop_token_ids, tuple)
            and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            "a tuple of ints >= 0",
        )
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidSamplingParamsError(
            f"SamplingParams.{field} must be {expected}, got {value!r}"
        )


def splitmix64(x: int) -> int:
    """One step of the splitmix64 mixer on a Python int (mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_for(seed: int, position: int) -> float:
    """The request's random number in [0, 1) for the token sampled at `position`.

    A pure function of (seed, position): the same on every machine, whatever the batch,
    and unchanged by preemption, migration or pipelining. `position` is the index the
    new token gets in prompt + output.
    """
    return (splitmix64(splitmix64(seed & _MASK64) ^ position) >> 11) * (1.0 / (1 << 53))
