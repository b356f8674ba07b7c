"""Flax/JAX models implementing the sparse-prefix model contract (installed as `sparse_prefix.models`).

`create(preset, *, seed=0, dtype=jnp.bfloat16) -> (model, params)` builds any registered preset.
"""

from .registry import available, build, create, register
from . import mamba2  # noqa: F401,E402  (registers the mamba2-* presets)
from . import hybrid  # noqa: F401,E402  (registers the hybrid / Qwen3.5 presets)

__all__ = ["available", "build", "create", "register"]
