"""Typed reads of a JSON request body's fields; every failure names the field.

JSON has no int/bool distinction Python respects (`True` is an int), so each reader
checks the type itself and answers a 400 such as `max_tokens must be an integer, got
"5"` rather than letting a wrong type reach the request path.
"""

from __future__ import annotations

import math
from typing import Any

from gateway.http_api.errors import APIError, invalid

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Fields:
    """The body of one request; `take_*` marks a field as read, `check_unknown` the rest."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise invalid(None, f"the request body must be a JSON object, got {shown(body)}")
        self._body = body
        self._read: set[str] = set()

    def has(self, name: str) -> bool:
        return self._body.get(name) is not None

    def take(self, name: str) -> Any:
        """The raw value (None when absent or null)."""
        self._read.add(name)
        return self._body.get(name)

    def take_int(
        self, name: str, default: int | None, minimum: int, maximum: int = INT32_MAX
    ) -> int | None:
        value = self.take(name)
        if value is None:
            return default
        if not is_int(value):
            raise invalid(name, f"{name} must be an integer, got {shown(value)}")
        if not minimum <= value <= maximum:
            raise invalid(name, f"{name}={value} must be in [{minimum}, {maximum}]")
        return value

    def take_number(self, name: str, default: float | None) -> float | None:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise invalid(name, f"{name} must be a number, got {shown(value)}")
        if not math.isfinite(value):
            raise invalid(name, f"{name} must be finite, got {value}")
        return float(value)

    def take_bool(self, name: str, default: bool) -> bool:
        value = self.take(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(name, f"{name} must be true or false, got {shown(value)}")
        return value

    def take_str(self, name: str) -> str | None:
        value = self.take(name)
        if value is not None and not isinstance(value, str):
            raise invalid(name, f"{name} must be a string, got {shown(value)}")
        return value

    def take_object(self, name: str) -> dict | None:
        value = self.take(name)
        if value is not None and not isinstance(value, dict):
            raise invalid(name, f"{name} must be an object, got {shown(value)}")
        return value

    def take_default_only(self, name: str, allowed: tuple[Any, ...], why: str) -> None:
        """A field llmesh accepts only at its no-op value (e.g. presence_penalty=0)."""
        value = self.take(name)
        if value is not None and value not in allowed:
            raise invalid(name, f"{name}={shown(value)} is not supported: {why}")

    def check_unknown(self) -> None:
        unknown = sorted(set(self._body) - self._read)
        if unknown:
            raise APIError(
                400,
                f"Unrecognized request argument supplied: {unknown[0]}",
                param=unknown[0],
                code="unknown_parameter",
            )


def int_list(name: str, value: Any, max_value: int = INT32_MAX) -> list[int]:
    """A list of integers in [0, max_value] (token ids)."""
    if not isinstance(value, list):
        raise invalid(name, f"{name} must be a list of integers, got {shown(value)}")
    for i, item in enumerate(value):
        if not is_int(item) or not 0 <= item <= max_value:
            raise invalid(name, f"{name}[{i}]={shown(item)} must be an integer in [0, {max_value}]")
    return value


def string_list(name: str, value: Any, max_items: int) -> list[str]:
    """A string or a list of up to max_items strings."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(name, f"{name} must be a string or a list of strings, got {shown(value)}")
    if len(value) > max_items:
        raise invalid(name, f"{name} has {len(value)} entries; at most {max_items} are supported")
    return value


def check_text_is_unicode(value: Any, path: str = "") -> None:
    """400 naming the field when a string (or key) holds an unpaired surrogate.

    JSON's `\\ud800` escape decodes to one, which is not Unicode text: it cannot be
    tokenized or put in a protobuf string (it used to end in a 500).
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            where = path or "the request body"
            raise invalid(
                path or None,
                f"{where} holds an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not text",
            ) from None
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_text_is_unicode(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text_is_unicode(key, path)
            check_text_is_unicode(item, f"{path}.{key}" if path else str(key))
