"""The gateway's OpenAI-compatible HTTP API (see docs/http_api.md).

A second face of the same gateway: requests are translated into GenerateRequests and
run through gateway.generations, exactly like the gRPC API's.
"""
