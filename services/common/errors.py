"""Errors a servicer raises to answer with a specific gRPC status.

Handlers stay thin: they raise one of these (or a plain `ValueError` for bad input)
and `ErrorMappingServerInterceptor` turns it into the status code with the message as
details. The message must name the offending field or id.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base class: `code` is the gRPC status the caller receives."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class NotFoundError(ServiceError):
    """The named request, instance or migration does not exist here."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ServiceError):
    """A request id is already in use."""

    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(ServiceError):
    """Admission control refused the call (mesh or instance full)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


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
