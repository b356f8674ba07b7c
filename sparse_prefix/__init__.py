"""sparse-prefix."""

from sparse_prefix.planner import Planner

__all__ = ["Engine", "Planner", "StateStore"]

_LAZY = {"Engine": "sparse_prefix.engine", "StateStore": "sparse_prefix.store"}


def __getattr__(name: str):
    """`Engine` and `StateStore` import jax; load them on first use so `import sparse_prefix` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparse_prefix' has no attribute {name!r}")
