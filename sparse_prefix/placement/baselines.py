"""Baseline placements (pure functions of the request length; used by the Planner's fixed policies).

Every function returns int64 [K] sorted, unique positions in 1..length. A position may equal `length`
(a checkpoint after the request's last token) only where the rule itself lands there: `block` when B
divides the length, `log` when 768*2^i == length, `sqrt` when floor(sqrt(L)) divides L, and always
for `end`. `balanced` reaches `length` only for tiny lengths, 2*length <= k+1 (its last point
k*L/(k+1) = L - L/(k+1) then rounds up to L). With ``grid=k`` every position is
snapped down to a multiple of k; zeros are dropped and duplicates merged, so fewer may come back.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparse_prefix.placement.costs import check_count


def _finish(positions: np.ndarray, grid: Any) -> np.ndarray:
    """Snap down to `grid`, drop zeros, dedupe, sort (int64 [K])."""
    grid = check_count(grid, "grid", 1)
    snapped = (np.asarray(positions, dtype=np.int64) // grid) * grid
    return np.unique(snapped[snapped >= 1])


def block_positions(length: Any, block: Any, *, grid: Any = 1) -> np.ndarray:
    """B, 2B, 3B, ... <= length (may include `length` itself)."""
    length = check_count(length, "length", 0)
    block = check_count(block, "block", 1)
    return _finish(np.arange(block, length + 1, block), grid)


def balanced_positions(length: Any, k: Any, *, grid: Any = 1) -> np.ndarray:
    """k evenly spaced positions round(i * length / (k + 1)), i = 1..k (deduped, >= 1).

    Rounding is half-to-even on the exact rational i*L/(k+1) (integer arithmetic, no float error).
    """
    length = check_count(length, "length", 0)
    k = check_count(k, "k", 0)
    i = np.arange(1, k + 1, dtype=np.int64)
    numerator, denominator = i * length, k + 1
    quotient, remainder = np.divmod(numerator, denominator)
    twice = 2 * remainder
    round_up = (twice > denominator) | ((twice == denominator) & (quotient % 2 == 1))
    return _finish(quotient + round_up, grid)


def log_positions(length: Any, base: Any = 768, *, grid: Any = 1) -> np.ndarray:
    """base * 2^i <= length, i = 0, 1, ... (may include `length` itself)."""
    length = check_count(length, "length", 0)
    base = check_count(base, "base", 1)
    found = []
    position = base
    while position <= length:
        found.append(position)
        position *= 2
    return _finish(np.array(found, dtype=np.int64), grid)


def sqrt_positions(length: Any, *, grid: Any = 1) -> np.ndarray:
    """Multiples of floor(sqrt(length)) that are <= length (none for length 0)."""
    length = check_count(length, "length", 0)
    if length == 0:
        return _finish(np.zeros(0, np.int64), grid)
    step = math.isqrt(length)
    return _finish(np.arange(step, length + 1, step), grid)


def end_positions(length: Any, *, grid: Any = 1) -> np.ndarray:
    """[length] (none for length 0; snapped down with `grid`)."""
    length = check_count(length, "length", 0)
    return _finish(np.array([length], dtype=np.int64), grid)
