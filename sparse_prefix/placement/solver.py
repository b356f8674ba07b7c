"""Public entry points: `solve` and `solve_batch` (host glue around the solvers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_prefix.placement.costs import CostLike, check_count, check_pmf, parse_cost
from sparse_prefix.placement.reference import reference_solve
from sparse_prefix.placement.result import BatchPlacement, Placement


def solve(pmf: Any, budget: Any, *, cost: CostLike = "linear", grid: Any = 1) -> Placement:
    """Optimal positions of at most `budget` checkpoints for the overlap-depth `pmf`."""
    return reference_solve(pmf, budget, cost, grid)


def solve_batch(pmfs: Any, budget: Any, *, cost: CostLike = "linear", grid: Any = 1) -> BatchPlacement:
    """`solve` for every row of `pmfs` [B, N+1]."""
    pmfs = check_pmf(pmfs, "pmfs", ndim=2)
    budget = check_count(budget, "budget", 0)
    grid = check_count(grid, "grid", 1)
    model = parse_cost(cost)
    rows = [reference_solve(row, budget, model, grid) for row in pmfs]
    positions = np.zeros((len(rows), budget), np.int64)
    for i, row in enumerate(rows):
        positions[i, : row.positions.size] = row.positions
    tables = np.stack([row._tables for row in rows])
    return BatchPlacement(positions, np.array([r.positions.size for r in rows], np.int64),
                          np.array([r.expected_cost for r in rows]), budget, model, grid,
                          np.stack([r._pmf for r in rows]), tables, rows[0]._layers)
