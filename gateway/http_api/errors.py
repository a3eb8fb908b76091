"""OpenAI's error shape, and how the gateway's internal errors map onto HTTP statuses.

{"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}
"""

from __future__ import annotations

import json
import math

from starlette.responses import Response

from services.common.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
    retry_after_ms,
)


class APIError(Exception):
    """An error answered in OpenAI's shape with `status`; `param` names the field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        error_type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.error_type = error_type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


def invalid(param: str | None, message: str) -> APIError:
    """400 for a bad field; the message starts with the field's name."""
    return APIError(400, message, param=param)


def from_service_error(exc: ServiceError) -> APIError:
    """The HTTP face of an error the shared request path raised."""
    message = str(exc)
    if isinstance(exc, ResourceExhaustedError):
        return APIError(
            429,
            message,
            error_type="rate_limit_error",
            code="rate_limit_exceeded",
            # The gRPC hint (retry-after-ms) in whole seconds, rounded up.
            headers={"Retry-After": str(math.ceil(retry_after_ms(exc.retry_after_s) / 1000))},
        )
    if isinstance(exc, UnavailableError):
        return APIError(503, message, error_type="service_unavailable", code="no_worker")
    if isinstance(exc, AlreadyExistsError):
        return APIError(409, message, code="request_id_in_use")
    if isinstance(exc, NotFoundError):
        return APIError(404, message, error_type="not_found_error")
    if isinstance(exc, DeadlineExceededError):
        return APIError(504, message, error_type="timeout_error", code="timeout")
    if isinstance(exc, FailedPreconditionError):
        return APIError(409, message, code="failed_precondition")
    return APIError(500, message, error_type="internal_error")
