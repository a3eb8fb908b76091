"""A clock that moves only when a test moves it.

Components that measure time take `clock=` (a callable returning seconds, like
time.monotonic); tests pass a FakeClock and set or advance `now` instead of sleeping.
"""

from __future__ import annotations


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
