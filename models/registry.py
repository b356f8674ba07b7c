"""Presets of real model shapes: `create(preset) -> (model, params)` (public).

Each family module registers its presets with `@register("name")` on a function that takes the compute
dtype and returns a model object (which has `init_params(key) -> params`). Importing
`sparse_prefix.models` imports every family, so every preset is available.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

_PRESETS: dict[str, Callable[[Any], Any]] = {}


def register(name: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator: register `builder(dtype) -> model` under preset `name`."""

    def wrap(builder: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if name in _PRESETS:
            raise ValueError(f"preset {name!r} is registered twice")
        _PRESETS[name] = builder
        return builder

    return wrap


def available() -> list[str]:
    """Names of all registered presets, sorted."""
    return sorted(_PRESETS)


def build(preset: str, *, dtype=jnp.bfloat16) -> Any:
    """The model object of `preset` (no parameters allocated)."""
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a string, got {type(preset).__name__}")
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(available())}")
    return _PRESETS[preset](dtype)


def create(preset: str, *, seed: int = 0, dtype=jnp.bfloat16) -> tuple[Any, Any]:
    """(model, params) for `preset`, parameters initialised from `seed` in `dtype`."""
    model = build(preset, dtype=dtype)
    return model, model.init_params(jax.random.PRNGKey(seed))
