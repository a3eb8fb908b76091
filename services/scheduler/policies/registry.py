"""Policies are registered by name so configs and CLIs can pick them."""

from __future__ import annotations

from collections.abc import Callable

DISPATCH_POLICIES: dict[str, type] = {}


def register_dispatch(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in DISPATCH_POLICIES:
            raise ValueError(f"dispatch policy {name!r} is already registered")
        DISPATCH_POLICIES[name] = cls
        return cls

    return decorator


def make_dispatch_policy(name: str, **kwargs):
    """A new dispatch policy instance by registered name."""
    try:
        cls = DISPATCH_POLICIES[name]
    except KeyError:
        raise ValueError(
            f"dispatch policy {name!r} is unknown; choose from {sorted(DISPATCH_POLICIES)}"
        ) from None
    return cls(**kwargs)
