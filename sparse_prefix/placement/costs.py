"""Recomputation cost models and the input checks shared by every solver.

A cost model is an increasing function g with g(0) = 0: recomputing a request whose overlap depth is t
from a checkpoint at c <= t costs g(t) - g(c) (no checkpoint: c = 0). ``linear`` is g(t) = t (tokens);
``hybrid(a, b)`` is g(t) = a*t + b*t^2, the shape of a stack whose attention layers make the prefix cost
quadratic. Any such separable g keeps the DP's min-of-lines structure (DESIGN, Placement).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class Cost:
    """g(t) = a*t + b*t^2 with a > 0, b >= 0 (``linear`` is a = 1, b = 0).

    Attributes:
      a: the linear coefficient (> 0, finite).
      b: the quadratic coefficient (>= 0, finite).
    """

    a: float = 1.0
    b: float = 0.0

    def __post_init__(self):
        for name, value, lower_ok in (("a", self.a, False), ("b", self.b, True)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"hybrid cost parameter {name} must be a real number, got {value!r}")
            if not math.isfinite(value) or value < 0 or (value == 0 and not lower_ok):
                bound = ">= 0" if lower_ok else "> 0"
                raise ValueError(f"hybrid cost parameter {name} must be finite and {bound}, got {value!r}")
        object.__setattr__(self, "a", float(self.a))
        object.__setattr__(self, "b", float(self.b))

    @property
    def is_linear(self) -> bool:
        """True for g(t) = t exactly."""
        return self.a == 1.0 and self.b == 0.0

    def g(self, depths: Any) -> np.ndarray:
        """g at integer depths, float64 (same shape as `depths`)."""
        t = np.asarray(depths, dtype=np.float64)
        return self.a * t + self.b * (t * t)

    def __str__(self) -> str:
        return "linear" if self.is_linear else f"hybrid:{self.a!r},{self.b!r}"


LINEAR = Cost()

CostLike = Union[str, Cost]


def hybrid(a: float, b: float) -> Cost:
    """The hybrid cost g(t) = a*t + b*t^2 (a > 0, b >= 0); raises ValueError/TypeError otherwise."""
    return Cost(a, b)


def parse_cost(cost: CostLike) -> Cost:
    """Canonical `Cost` from ``"linear"``, ``"hybrid:a,b"`` or a `Cost`.

    Raises:
      TypeError: `cost` is neither a string nor a `Cost`.
      ValueError: an unknown name or malformed/invalid hybrid parameters.
    """
    if isinstance(cost, Cost):
        return cost
    if not isinstance(cost, str):
        raise TypeError(f"cost must be 'linear', 'hybrid:a,b' or a Cost, got {type(cost).__name__}")
    text = cost.strip()
    if text == "linear":
        return LINEAR
    if text.startswith("hybrid:"):
        parts = text[len("hybrid:"):].split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            a, b = (float(part) for part in parts)
        except ValueError:
            raise ValueError(f"cost {cost!r}: expected 'hybrid:a,b' with two numbers") from None
        return Cost(a, b)
    raise ValueError(f"cost {cost!r} is unknown: expected 'linear' or 'hybrid:a,b'")


def check_count(value: Any, name: str, minimum: int) -> int:
    """`value` as a Python int >= `minimum`; bools, floats and strings are rejected.

    Raises:
      TypeError: not an integer (``2.0``, ``"3"``, ``True`` included).
      ValueError: below `minimum`.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_pmf(pmf: Any, name: str = "pmf", ndim: int = 1) -> np.ndarray:
    """`pmf` as a float64 array of `ndim` dims, finite, non-negative, with positive mass (per row).

    Args:
      pmf: array-like of real numbers; [N+1] for ndim=1, [B, N+1] for ndim=2.
      name: the argument name used in error messages.
      ndim: 1 or 2.

    Returns:
      float64 array of the same shape (a copy).

    Raises:
      TypeError: not real-valued numbers.
      ValueError: wrong rank, empty, NaN/inf, negative entries or a row with zero total mass.
    """
    try:
        array = np.asarray(pmf)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be an array of real numbers: {error}") from None
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{name} must hold real numbers, got dtype {array.dtype}")
    if array.ndim != ndim:
        shape = "[N+1]" if ndim == 1 else "[B, N+1]"
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    if np.any(array < 0):
        raise ValueError(f"{name} has negative entries (min {array.min()!r})")
    with np.errstate(over="ignore"):
        totals = array.sum(axis=-1)
    if not np.all(np.isfinite(totals)):
        raise ValueError(f"{name} is too large: its total mass overflows float64")
    if np.any(totals <= 0):
        where = "" if ndim == 1 else f" (rows {np.flatnonzero(totals <= 0).tolist()})"
        raise ValueError(f"{name} has zero total mass{where}")
    return array
