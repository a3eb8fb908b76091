"""Errors a servicer raises to answer with a specific gRPC status.

Handlers stay thin: they raise one of these (or a plain `ValueError` for bad input)
and `ErrorMappingServerInterceptor` turns it into the status code with the message as
details. The message must name the offending field or id.
"""

from __future__ import annotations

import math

import grpc


class ServiceError(Exception):
    """Base class: `code` is the gRPC status the caller receives."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with the status (e.g. a retry hint); none by default."""
        return ()


class NotFoundError(ServiceError):
    """The named request, instance or migration does not exist here."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ServiceError):
    """A request id is already in use."""

    code = grpc.StatusCode.ALREADY_EXISTS


# Trailing metadata of a RESOURCE_EXHAUSTED answer: milliseconds the caller should wait
# before trying again (the HTTP API sends the same hint, in whole seconds, as Retry-After).
RETRY_AFTER_MS_KEY = "retry-after-ms"


class ResourceExhaustedError(ServiceError):
    """Admission control refused the call (mesh or instance full, per-key limit):
    `retry_after_s` is how long the caller should wait, sent as `retry-after-ms`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_AFTER_MS_KEY, str(retry_after_ms(self.retry_after_s))),)


def retry_after_s_from_metadata(metadata) -> float | None:
    """The `retry-after-ms` hint of a call's trailing metadata, in seconds (None: none
    or not a number)."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_MS_KEY:
            try:
                milliseconds = int(value)
            except (TypeError, ValueError):
                return None
            return milliseconds / 1000 if milliseconds >= 0 else None
    return None


def retry_after_ms(retry_after_s: float) -> int:
    """A wait as whole milliseconds, rounded up (never 0: "retry at once" is not a hint)."""
    return max(1, math.ceil(round(retry_after_s * 1000, 6)))


class UnavailableError(ServiceError):
    """No instance can serve the call right now (retry later)."""

    code = grpc.StatusCode.UNAVAILABLE


class FailedPreconditionError(ServiceError):
    """The call is well-formed but the named instance or group is not in a state that
    allows it (already in a group, draining, still dropping)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceededError(ServiceError):
    """A call this service made on the caller's behalf did not answer in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
