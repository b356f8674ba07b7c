"""The NumPy reference: the plain O(N^2 M) dynamic program in float64 (host only).

F_0(j) = G(j) = sum_{t<=j} g(t) p(t);
F_m(j) = min_{s in grid, s <= j} F_{m-1}(s-1) + [G(j) - G(s-1)] - g(s) [P(j) - P(s-1)],
where P(j) = sum_{t<=j} p(t); F_m(j) = F_{m-1}(j) when no grid position is <= j. The bracket is the
cost of depths s..j resumed from s, so F_m(j) is the least cost of depths 0..j with at most m
checkpoints (adding a checkpoint never hurts, so "exactly one more, the last at s" covers "at most").
Ties go to the smaller s (np.argmin takes the first minimum). The JAX solver (dp.py) evaluates the very
same expression for each (j, s).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_prefix.placement.costs import Cost, CostLike, check_count, check_pmf, parse_cost
from sparse_prefix.placement.result import (Placement, backtrack, drop_idle, normalized,
                                             placement_cost)

_BLOCK_ELEMENTS = 1 << 18  # rows x candidates evaluated at once (2 MiB of float64)


def prefix_sums(pmf: np.ndarray, cost: Cost) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """P, G and g over depths 0..N (float64 [..., N+1] each) for a normalised pmf [..., N+1]."""
    g = cost.g(np.arange(pmf.shape[-1]))
    return np.cumsum(pmf, axis=-1), np.cumsum(pmf * g, axis=-1), np.broadcast_to(g, pmf.shape)


def reference_tables(pmf: np.ndarray, cost: Cost, layers: int, grid: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Argmin tables and the last layer's values of the plain DP.

    Args:
      pmf: float64 [N+1], normalised.
      cost: the cost model.
      layers: M, the budget (already capped at N // grid).
      grid: positions are multiples of it.

    Returns:
      (tables int32 [M, N+1], F_M float64 [N+1]).
    """
    prefix_mass, prefix_cost, g = prefix_sums(pmf, cost)
    n = pmf.shape[0] - 1
    starts = np.arange(grid, n + 1, grid)
    before = starts - 1
    slope, mass_before = g[starts], prefix_mass[before]
    block = max(1, _BLOCK_ELEMENTS // max(starts.size, 1))
    values = prefix_cost.copy()
    tables = np.zeros((layers, n + 1), np.int32)
    for m in range(layers):
        intercept = values[before] - prefix_cost[before]
        new_values = values.copy()
        for first in range(grid, n + 1, block):
            rows = np.arange(first, min(first + block, n + 1))
            width = rows[-1] // grid  # candidates s <= the block's last row
            drop = slope[None, :width] * (prefix_mass[rows, None] - mass_before[None, :width])
            segment = intercept[None, :width] + prefix_cost[rows, None]
            segment -= drop
            segment[starts[None, :width] > rows[:, None]] = np.inf
            best = np.argmin(segment, axis=1)
            tables[m, rows] = starts[best]
            new_values[rows] = segment[np.arange(rows.size), best]
        values = new_values
    return tables, values


def reference_solve(pmf: Any, budget: Any, cost: CostLike = "linear", grid: Any = 1) -> Placement:
    """Solve with the plain O(N^2 M) NumPy DP (float64; ties to the smaller s).

    Args:
      pmf: [N+1] weights of overlap depths 0..N (need not sum to 1).
      budget: int >= 0, the most checkpoints (capped at N // grid).
      cost: "linear", "hybrid:a,b" or a `Cost`.
      grid: int >= 1; positions are multiples of it.

    Returns:
      The optimal `Placement`.
    """
    pmf = normalized(check_pmf(pmf))
    budget = check_count(budget, "budget", 0)
    grid = check_count(grid, "grid", 1)
    model = parse_cost(cost)
    n = pmf.shape[0] - 1
    layers = min(budget, n // grid)
    full, values = reference_tables(pmf, model, layers, grid)
    tables = split_tables(full, grid)
    positions = drop_idle(backtrack(tables, layers, grid, n), pmf, n)
    return Placement(positions, placement_cost(pmf, positions, model), budget, model, grid, pmf, tables,
                     layers)


def split_tables(full: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Full tables int32 [M, N+1] -> (coarse [M-1, C] at rows c*grid - 1, final [N+1] = layer M)."""
    layers, width = full.shape
    coarse_rows = np.arange(grid - 1, grid * ((width - 1) // grid), grid)
    final = full[-1] if layers else np.zeros(width, np.int32)
    return full[:-1, coarse_rows] if layers else np.zeros((0, coarse_rows.size), np.int32), final
