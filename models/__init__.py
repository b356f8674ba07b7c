"""Flax/JAX models implementing the sparse-prefix model contract (installed as `sparse_prefix.models`).

`create(preset, *, seed=0, dtype=jnp.bfloat16) -> (model, params)` builds any registered preset.
"""

from .registry import available, build, create, register

__all__ = ["available", "build", "create", "register"]
