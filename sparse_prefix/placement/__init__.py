"""Exact checkpoint placement: overlap-depth pmf -> positions minimising expected recomputation.

Public: `solve`, `solve_batch`, `Placement`, `BatchPlacement`, costs (`linear`, `hybrid`, `Cost`),
`expected_cost`, the baselines (`block_positions`, `balanced_positions`, `log_positions`,
`sqrt_positions`, `end_positions`) and, for tests, `reference_solve` and `brute_force`.
"""

from sparse_prefix.placement.baselines import (balanced_positions, block_positions, end_positions,
                                               log_positions, sqrt_positions)
from sparse_prefix.placement.costs import LINEAR, Cost, hybrid, parse_cost
from sparse_prefix.placement.reference import reference_solve
from sparse_prefix.placement.result import BatchPlacement, Placement, brute_force, expected_cost
from sparse_prefix.placement.solver import solve, solve_batch

linear = LINEAR

__all__ = [
    "BatchPlacement", "Cost", "LINEAR", "Placement", "balanced_positions", "block_positions",
    "brute_force", "end_positions", "expected_cost", "hybrid", "linear", "log_positions", "parse_cost",
    "reference_solve", "solve", "solve_batch", "sqrt_positions",
]
