"""sparse-prefix."""

from sparse_prefix.planner import Planner

__all__ = ["Planner"]
