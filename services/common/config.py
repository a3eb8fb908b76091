"""Typed configuration: frozen dataclasses filled from defaults, env vars and flags.

Every component declares a frozen dataclass (one line of doc per field, validation in
`__post_init__` raising `ConfigError` naming the bad value). Environment variables are
read here and nowhere else: field `foo_bar` of a config loaded with prefix `WORKER`
comes from `LLMESH_WORKER_FOO_BAR`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "LLMESH_"


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names it."""


def env_name(prefix: str, field: str) -> str:
    return (
        f"{ENV_PREFIX}{prefix.upper()}_{field.upper()}"
        if prefix
        else f"{ENV_PREFIX}{field.upper()}"
    )


def _parse(raw: str, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("", "none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(raw, inner[0], name)
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_parse(p.strip(), item, name) for p in raw.split(",") if p.strip())
    try:
        if annotation is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation in (int, float, str):
            return annotation(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {annotation.__name__}") from exc
    raise ConfigError(f"{name}: unsupported config type {annotation!r}")


def load_config(
    cls: type[T],
    prefix: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from its defaults, then env vars `LLMESH_<PREFIX>_<FIELD>`, then overrides.

    Overrides whose value is None are ignored, so argparse namespaces can be passed
    directly (`vars(args)`) with unset flags left as None.
    """
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):
        name = env_name(prefix, field.name)
        if name in environ:
            values[field.name] = _parse(environ[name], hints[field.name], name)
    for key, value in (overrides or {}).items():
        if value is not None and key in known:
            values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def require(condition: bool, message: str) -> None:
    """Validation helper for __post_init__: raise ConfigError(message) unless condition."""
    if not condition:
        raise ConfigError(message)
