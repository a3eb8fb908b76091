"""The Starlette app of the OpenAI-compatible API: routes, body limits, error shapes.

    POST /v1/completions        POST /v1/chat/completions
    GET  /v1/models[/NAME]      GET  /health             GET /metrics (when given)

Every error, including a 404 route, a 405 method, a malformed or oversized body and
an unexpected exception, is answered in OpenAI's error shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api_keys import ApiKeyMiddleware, ApiKeys
from gateway.generations import Generations
from gateway.http_api.chat_template import ChatTemplate
from gateway.http_api.errors import APIError, from_service_error, invalid
from gateway.http_api.fields import check_text_is_unicode
from gateway.http_api.handler import GenerationResponse
from gateway.http_api.protocol import parse_request
from gateway.http_api.runner import PlanRun
from gateway.key_limits import client_key
from services.common.errors import ServiceError
from services.common.logging import get_logger

log = get_logger(__name__)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_body_bytes: int) -> object:
    """The parsed body; 413 past max_body_bytes, 400 when it is not JSON."""
    too_large = APIError(
        413,
        f"the request body exceeds the limit of {max_body_bytes} bytes (http_max_body_bytes)",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_body_bytes:
            raise too_large
    if not body:
        raise invalid(None, "the request body is empty; send a JSON object")
    try:
        parsed = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise invalid(None, f"the request body is not valid JSON: {exc}") from None
    check_text_is_unicode(parsed)
    return parsed


def build_app(
    generations: Generations,
    chat_template: ChatTemplate,
    *,
    model_id: str,
    max_body_bytes: int,
    metrics: Callable[[], Response] | None = None,
    api_keys: ApiKeys | None = None,
) -> Starlette:
    """The HTTP face of `generations`. `metrics`, when given, answers GET /metrics (the
    gateway's Prometheus exposition plugs in here); with `api_keys`, /v1/* answers 401
    without one of them (gateway.api_keys)."""

    def served_models() -> tuple[str, ...]:
        limits = generations.view.model_limits()
        names = (limits.model_id, model_id) if limits is not None else (model_id,)
        return tuple(dict.fromkeys(names))

    def generation_endpoint(is_chat: bool):
        async def endpoint(request: Request):
            body = await read_json(request, max_body_bytes)
            plan = parse_request(
                body,
                is_chat=is_chat,
                served_models=served_models(),
                limits=generations.model_limits(),
                chat_template=chat_template,
            )
            log.info(
                "http_request",
                response_id=plan.response_id,
                path=request.url.path,
                num_choices=len(plan.choices),
                stream=plan.stream,
                user=plan.user,
            )
            key = client_key(request.headers.get("authorization"))
            return GenerationResponse(PlanRun(generations, plan, key))

        return endpoint

    def model_card() -> dict:
        card = {"id": served_models()[0], "object": "model", "created": 0, "owned_by": "llmesh"}
        limits = generations.view.model_limits()
        if limits is not None:
            card["max_model_len"] = limits.max_model_len
        return card

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in served_models():
            raise APIError(
                404,
                f"The model `{name}` does not exist",
                param="model",
                error_type="not_found_error",
                code="model_not_found",
            )
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        num_instances = len(generations.view.instances)
        if num_instances == 0:
            raise APIError(
                503, "no worker instance is up", error_type="service_unavailable", code="no_worker"
            )
        return JSONResponse({"status": "ok", "num_instances": num_instances})

    routes = [
        Route("/v1/completions", generation_endpoint(is_chat=False), methods=["POST"]),
        Route("/v1/chat/completions", generation_endpoint(is_chat=True), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    if metrics is not None:
        routes.append(Route("/metrics", lambda request: metrics(), methods=["GET"]))

    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    async def service_error(request: Request, exc: ServiceError) -> Response:
        return from_service_error(exc).response()

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, error_type=kind, headers=exc.headers).response()

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("http_internal_error", path=request.url.path)
        return APIError(500, f"internal error: {exc}", error_type="internal_error").response()

    return Starlette(
        routes=routes,
        middleware=[Middleware(ApiKeyMiddleware, keys=api_keys)] if api_keys else [],
        exception_handlers={
            APIError: api_error,
            ServiceError: service_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
