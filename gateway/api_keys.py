"""Client API keys at the gateway: loaded once, checked in constant time on every call.

Keys come from `--api-keys-file` / `LLMESH_GATEWAY_API_KEYS_FILE` (one key per line,
`#` comments, optionally `name:key`) and `LLMESH_GATEWAY_API_KEYS` (comma-separated).
None configured = client authentication off (the local demo). Clients send
`authorization: Bearer <key>` (gRPC metadata) or `Authorization: Bearer <key>` (HTTP;
the official openai client does with `api_key=`). A missing or wrong key gets
UNAUTHENTICATED / HTTP 401 before anything reaches the request path; health checks
(grpc.health.v1, GET /health) and GET /metrics stay open.

A presented token is hashed and compared with every key's hash by hmac.compare_digest,
so neither the time taken nor an early exit tells how much of it matched.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

from gateway.http_api.errors import APIError
from services.common.auth_interceptors import GuardServerInterceptor, metadata_value
from services.common.config import ConfigError

PUBLIC_SERVICES = ("llmesh.v1.Gateway",)  # the client API: API keys, not cluster auth
# HTTP paths that need a key when keys are configured (/health and /metrics do not).
GUARDED_HTTP_PREFIX = "/v1/"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(value: str | bytes | None) -> str:
    """The token of an `authorization: Bearer <token>` value ("" when absent/malformed)."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = (value or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


@dataclass(frozen=True)
class ApiKeys:
    """The accepted keys, as (name, sha256) pairs; never the keys themselves."""

    entries: tuple[tuple[str, bytes], ...]

    def identify(self, token: str) -> str | None:
        """The name of the key `token` is, or None; constant time in the token."""
        presented = _digest(token)
        found = None
        for name, digest in self.entries:  # no early exit
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found if token else None

    def refusal(self, authorization: str | bytes | None) -> str:
        """ "" when the header carries an accepted key, else why not."""
        token = bearer_token(authorization)
        if not token:
            return "no API key (send 'Authorization: Bearer <key>')"
        return "" if self.identify(token) is not None else "invalid API key"


def parse_keys(lines: list[str], origin: str) -> list[tuple[str, str]]:
    """(name, key) per key line: `# comments` and blank lines skipped, `name:key` named."""
    keys = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, key = line.partition(":")
        name, key = (name.strip(), key.strip()) if sep else (f"{origin}:{number}", line)
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"{origin} line {number}: an API key must be one word")
        keys.append((name, key))
    return keys


def load_api_keys(keys: tuple[str, ...], keys_file: str) -> ApiKeys | None:
    """The keys of GatewayConfig's api_keys and api_keys_file; None when there are none."""
    found = parse_keys(list(keys), "LLMESH_GATEWAY_API_KEYS")
    if keys_file:
        try:
            text = Path(keys_file).read_text()
        except OSError as exc:
            raise ConfigError(f"api_keys_file={keys_file!r}: unreadable ({exc})") from None
        found += parse_keys(text.splitlines(), keys_file)
        if not found:
            raise ConfigError(f"api_keys_file={keys_file!r} holds no key")
    return ApiKeys(tuple((name, _digest(key)) for name, key in found)) if found else None


def api_key_interceptor(keys: ApiKeys) -> GuardServerInterceptor:
    """Refuses the client API's calls without an accepted `authorization` metadata."""
    return GuardServerInterceptor(
        lambda service: service in PUBLIC_SERVICES,
        lambda method, metadata: keys.refusal(metadata_value(metadata, "authorization")),
        grpc.StatusCode.UNAUTHENTICATED,
        "the gateway needs an API key",
    )


class ApiKeyMiddleware:
    """ASGI middleware of the HTTP API: 401 in OpenAI's shape for /v1/* without a key."""

    def __init__(self, app, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(GUARDED_HTTP_PREFIX):
            headers = dict(scope["headers"])
            reason = self.keys.refusal(headers.get(b"authorization"))
            if reason:
                error = APIError(
                    401,
                    f"{reason}; the gateway requires an API key",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
