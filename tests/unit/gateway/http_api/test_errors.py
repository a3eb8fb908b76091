"""Errors of the shared request path in OpenAI's shape: a status per kind, 500 only for
what nobody expected."""

from __future__ import annotations

import pytest

from gateway.http_api.errors import from_service_error
from services.common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ResourceExhaustedError("full"), 429),
        (UnavailableError("no worker"), 503),
        (AlreadyExistsError("in use"), 409),
        (NotFoundError("gone"), 404),
        (DeadlineExceededError("scheduler too slow"), 504),
        (FailedPreconditionError("draining"), 409),
        (ServiceError("unexpected"), 500),
    ],
)
def test_each_service_error_has_its_status(error, status):
    api_error = from_service_error(error)
    assert (api_error.status, api_error.message) == (status, str(error))


@pytest.mark.parametrize(("retry_after_s", "header"), [(1.0, "1"), (0.2, "1"), (2.5, "3")])
def test_429_carries_the_grpc_hint_in_whole_seconds_rounded_up(retry_after_s, header):
    api_error = from_service_error(ResourceExhaustedError("full", retry_after_s))
    assert (api_error.status, api_error.headers) == (429, {"Retry-After": header})
    assert api_error.body()["error"]["code"] == "rate_limit_exceeded"
