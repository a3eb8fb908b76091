"""The SDK's channel to a gateway: TLS when given a CA, the API key on every call.

`api_key` travels as `authorization: Bearer <key>` metadata (the gateway's
gateway.api_keys checks it); `root_certificates` (PEM bytes of the CA that signed the
gateway's certificate) makes the channel TLS. An API key over plaintext is readable by
anyone on the path: use TLS beyond loopback (docs/security.md).
"""

from __future__ import annotations

import grpc

from services.common.auth_interceptors import SyncMetadata, aio_metadata_interceptors, bearer
from services.common.grpc_client import CHANNEL_OPTIONS


def aio_gateway_channel(
    address: str, api_key: str | None = None, root_certificates: bytes | None = None
) -> grpc.aio.Channel:
    interceptors = aio_metadata_interceptors(bearer(api_key)) if api_key else None
    if root_certificates is None:
        return grpc.aio.insecure_channel(
            address, options=CHANNEL_OPTIONS, interceptors=interceptors
        )
    return grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates),
        options=CHANNEL_OPTIONS,
        interceptors=interceptors,
    )


def gateway_channel(
    address: str, api_key: str | None = None, root_certificates: bytes | None = None
) -> grpc.Channel:
    channel = (
        grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        if root_certificates is None
        else grpc.secure_channel(
            address, grpc.ssl_channel_credentials(root_certificates), options=CHANNEL_OPTIONS
        )
    )
    return grpc.intercept_channel(channel, SyncMetadata(bearer(api_key))) if api_key else channel
