"""Typed configuration: frozen dataclasses filled from defaults, env vars and flags.

Every component declares a frozen dataclass (one line of doc per field, validation in
`__post_init__` raising `ConfigError` naming the bad value). Environment variables are
read here and nowhere else: field `foo_bar` of a config loaded with prefix `WORKER`
comes from `LLMESH_WORKER_FOO_BAR`. A field whose type is itself a config dataclass
nests: field `scheduling_policy` of `WorkerConfig.engine` comes from
`LLMESH_WORKER_ENGINE_SCHEDULING_POLICY`, and from the override `engine.scheduling_policy`
(an argparse `dest`); a nested config is declared `field(default_factory=ItsClass)` and
starts from its class's defaults. A field may also name a process-wide variable in its
metadata, `field(metadata={ENV: "LLMESH_KERNELS"})`, read when its own name is not set
(a tuple names several, the first set wins: the OpenTelemetry `OTEL_*` variables).

Values are spelled the same in env vars and flags (`flag_type`): `none` unsets an
optional field, a size (a `*_bytes` field) is bytes or carries a unit (`256MiB`),
durations are seconds (`*_s`), booleans `1/0`, `true/false`, `yes/no` or `on/off`.

This module imports nothing from the services: every component may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "LLMESH_"
# Field metadata key: a process-wide environment variable that also sets the field.
ENV = "env"
# LLMESH_* variables that are not fields of the config whose prefix they share, so
# load_config does not warn about them: where the CLI finds the services (they share
# the gateway's and the scheduler's prefixes), process-wide settings read through field
# metadata or their own configs, and what launchers set for their children.
NON_CONFIG_VARIABLES = frozenset(
    {
        "LLMESH_GATEWAY_ADDRESS",  # services/cli/status.py ClientAddresses
        "LLMESH_SCHEDULER_ADDRESS",  # services/cli/status.py ClientAddresses
        "LLMESH_GATEWAY_CA",  # services/cli/status.py ClientAddresses
        "LLMESH_KERNELS",  # EngineConfig.kernels (field metadata)
        "LLMESH_KERNEL_CACHE",  # KernelBuildConfig.cache
        "LLMESH_TEST_HOOKS",  # services/worker/config.py TestHooksConfig (tests only)
        "LLMESH_PARENT_PID",  # services/common/procs.py: set by launchers for die_with_parent
        "LLMESH_PYTHON",  # ./llmesh: the interpreter that creates .venv
    }
)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names it."""


def env_name(prefix: str, field: str) -> str:
    return (
        f"{ENV_PREFIX}{prefix.upper()}_{field.upper()}"
        if prefix
        else f"{ENV_PREFIX}{field.upper()}"
    )


# Units a size (`*_bytes` field) may carry, e.g. "256MiB"; a bare number is bytes.
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(raw: str, name: str) -> int:
    """A size in bytes: `4096`, `256MiB`, `0.25 MiB`, `2GiB` (KiB/MiB/GiB, any case).

    Fractions of a byte round down; the result must be at least 1 byte, so a zero, a
    negative or a too small value is refused, never clamped.
    """
    match = _SIZE.fullmatch(raw)
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    num_bytes = int(float(match.group(1)) * unit) if match and unit else 0
    if num_bytes < 1:
        raise ConfigError(
            f"{name}={raw!r} is not a size of at least 1 byte (bytes, or with KiB/MiB/GiB)"
        )
    return num_bytes


def _parse(raw: str, annotation: Any, name: str, field: str) -> Any:
    """`raw` (the text of env var or flag `name`) as a value of `field`'s type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("", "none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(raw, inner[0], name, field)
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_parse(p.strip(), item, name, field) for p in raw.split(",") if p.strip())
    if annotation is int and field.endswith("_bytes"):
        return parse_size(raw, name)
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


class _ExplicitNone:
    """A flag's `none`: unlike None (the flag was not given), it overrides the env var."""

    def __repr__(self) -> str:
        return "none"


EXPLICIT_NONE = _ExplicitNone()


def flag_type(annotation: Any, field: str, flag: str) -> Callable[[str], Any]:
    """An argparse `type` for `flag`, which sets `field`: it takes exactly the spellings
    the field's environment variable takes (`none` for an optional, `256MiB` for a size)
    and refuses the others naming the flag."""

    def parse(raw: str) -> Any:
        try:
            value = _parse(raw, annotation, flag, field)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return EXPLICIT_NONE if value is None else value

    return parse


def _nested_overrides(overrides: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The overrides of nested field `name`: `{name: {...}}` and dotted `name.sub` keys."""
    nested = dict(overrides.get(name) or {})
    prefix = f"{name}."
    for key, value in overrides.items():
        if key.startswith(prefix):
            nested[key[len(prefix) :]] = value
    return nested


def _load(cls: type[T], prefix: str, overrides: Mapping[str, Any], environ: Mapping[str, str]) -> T:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            # A nested config starts from its own class's defaults, like a top-level one.
            if field.default_factory is not annotation:
                raise TypeError(
                    f"{cls.__name__}.{field.name}: declare a nested config as "
                    f"field(default_factory={annotation.__name__})"
                )
            given = overrides.get(field.name)
            if isinstance(given, annotation):  # a whole nested config wins, like any override
                values[field.name] = given
            else:
                values[field.name] = _load(
                    annotation,
                    f"{prefix}_{field.name}" if prefix else field.name,
                    _nested_overrides(overrides, field.name),
                    environ,
                )
            continue
        shared = field.metadata.get(ENV) or ()
        for name in (
            env_name(prefix, field.name),
            *([shared] if isinstance(shared, str) else shared),
        ):
            if name and name in environ:
                values[field.name] = _parse(environ[name], annotation, name, field.name)
                break
        value = overrides.get(field.name)
        if value is not None:
            values[field.name] = None if value is EXPLICIT_NONE else value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from exc


def load_config(
    cls: type[T],
    prefix: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Build `cls` from its defaults, then env vars `LLMESH_<PREFIX>_<FIELD>`, then overrides.

    Overrides whose value is None are ignored, so argparse namespaces can be passed
    directly (`vars(args)`) with unset flags left as None (a flag's explicit `none` is
    EXPLICIT_NONE, which sets None); keys that name no field are ignored too. A nested
    config's overrides are `{"engine": {...}}` or dotted keys (`"engine.block_size"`).

    An env var `LLMESH_<PREFIX>_*` that names no field (a typo, or a name from an older
    release such as LLMESH_SCHEDULER_LEASE_MS) is logged as a WARNING and ignored, unless
    it is one of NON_CONFIG_VARIABLES.
    """
    environ = os.environ if environ is None else environ
    if prefix:
        _warn_unknown_variables(cls, prefix, environ)
    return _load(cls, prefix, overrides or {}, environ)


def _env_names(cls: type, prefix: str) -> set[str]:
    """The env var of every field of `cls`, nested configs' fields included."""
    hints = typing.get_type_hints(cls)
    names: set[str] = set()
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            names |= _env_names(annotation, f"{prefix}_{field.name}")
        else:
            names.add(env_name(prefix, field.name))
    return names


def _warn_unknown_variables(cls: type, prefix: str, environ: Mapping[str, str]) -> None:
    known = _env_names(cls, prefix) | NON_CONFIG_VARIABLES
    start = env_name(prefix, "")
    for name in sorted(environ):
        if name.startswith(start) and name not in known:
            log.warning(
                "%s matches no field of %s (loaded from %s*): ignored",
                name,
                cls.__name__,
                start,
            )


def require(condition: bool, message: str) -> None:
    """Validation helper for __post_init__: raise ConfigError(message) unless condition."""
    if not condition:
        raise ConfigError(message)
