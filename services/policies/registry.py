"""Policies are registered by name so configs and CLIs can pick them.

One registry per kind of decision (dispatch, migration pairing, request selection,
scaling, KunServe groups). `make_<kind>_policy(name, **kwargs)` builds a fresh
instance; an unknown name (a configuration value) raises ConfigError listing the
known ones.
"""

from __future__ import annotations

from collections.abc import Callable

from services.common.config import ConfigError

DISPATCH_POLICIES: dict[str, type] = {}
MIGRATION_POLICIES: dict[str, type] = {}
SELECTION_POLICIES: dict[str, type] = {}
SCALING_POLICIES: dict[str, type] = {}
GROUP_POLICIES: dict[str, type] = {}


def _register(registry: dict[str, type], kind: str, name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in registry:
            raise ValueError(f"{kind} policy {name!r} is already registered")
        registry[name] = cls
        return cls

    return decorator


def _make(registry: dict[str, type], kind: str, name: str, kwargs: dict):
    try:
        cls = registry[name]
    except KeyError:
        raise ConfigError(
            f"{kind} policy {name!r} is unknown; choose from {sorted(registry)}"
        ) from None
    return cls(**kwargs)


def register_dispatch(name: str) -> Callable[[type], type]:
    return _register(DISPATCH_POLICIES, "dispatch", name)


def register_migration(name: str) -> Callable[[type], type]:
    return _register(MIGRATION_POLICIES, "migration", name)


def register_selection(name: str) -> Callable[[type], type]:
    return _register(SELECTION_POLICIES, "selection", name)


def register_scaling(name: str) -> Callable[[type], type]:
    return _register(SCALING_POLICIES, "scaling", name)


def register_group(name: str) -> Callable[[type], type]:
    return _register(GROUP_POLICIES, "group", name)


def make_dispatch_policy(name: str, **kwargs):
    """A new dispatch policy instance by registered name."""
    return _make(DISPATCH_POLICIES, "dispatch", name, kwargs)


def make_migration_policy(name: str, **kwargs):
    """A new migration pairing policy instance by registered name."""
    return _make(MIGRATION_POLICIES, "migration", name, kwargs)


def make_selection_policy(name: str, **kwargs):
    """A new request selection policy instance by registered name."""
    return _make(SELECTION_POLICIES, "selection", name, kwargs)


def make_scaling_policy(name: str, **kwargs):
    """A new scaling policy instance by registered name."""
    return _make(SCALING_POLICIES, "scaling", name, kwargs)


def make_group_policy(name: str, **kwargs):
    """A new KunServe group policy instance by registered name."""
    return _make(GROUP_POLICIES, "group", name, kwargs)
