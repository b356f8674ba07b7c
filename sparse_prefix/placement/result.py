"""Solve results (`Placement`, `BatchPlacement`) and the host-side helpers every solver shares.

Shape legend: N = the largest overlap depth (a pmf has N+1 entries, depths 0..N); M = the budget (most
positions); C = N // grid candidate positions; R >= N+1 rows (solvers may pad N up to a bucket);
B = batch rows.

Argmin tables (from the same solve, kept for `positions_for`): ``coarse`` int32 [>= M-1, >= C] --
``coarse[m-1, c-1]`` is the last position of an optimal placement of at most m checkpoints for the
depths 0..c*grid-1 (0: none) -- and ``final`` int32 [R], the last position of the optimum with at most
M checkpoints for depths 0..j, for every row j. Backtracking from row L gives the optimum for the pmf
truncated to 0..L: s = final[L], then s <- coarse[m-1, s/grid - 1] for m = M-1, ..., 1.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any

import numpy as np

from sparse_prefix.placement.costs import Cost, CostLike, check_count, check_pmf, parse_cost


def normalized(pmf: np.ndarray) -> np.ndarray:
    """pmf scaled by a power of two so that each row's largest weight lies in [1, 2) (float64).

    A power-of-two scale is exact, so integer weights (counts) keep every sum of the DP exact and ties
    are decided exactly (to the smaller position) by every solver; dividing by the total would round.
    The scale also keeps huge or tiny weights away from overflow.
    """
    _, exponent = np.frexp(pmf.max(axis=-1, keepdims=True))
    return np.ldexp(pmf, 1 - exponent)


def backtrack(tables: tuple[Any, Any], layers: int, grid: int, row: int) -> np.ndarray:
    """Positions of the optimum for depths 0..`row` with at most `layers` checkpoints.

    Args:
      tables: (coarse int [>= layers-1, C], final int [> row]) argmin tables (module docstring).
      layers: the budget (capped) the tables were solved with.
      grid: the position grid.
      row: the largest depth served (L).

    Returns:
      int64 [K] sorted positions, K <= layers.
    """
    coarse, final = tables
    found = []
    s = int(final[row]) if layers > 0 else 0
    for m in range(layers - 1, -1, -1):
        if s == 0:
            break
        found.append(s)
        s = int(coarse[m - 1, s // grid - 1]) if m > 0 else 0
    return np.array(found[::-1], dtype=np.int64)


def nonzero_prefix(pmf: np.ndarray) -> np.ndarray:
    """int64 [N+2]: entry i counts the depths t < i with p(t) > 0 (exact, unlike a float prefix sum)."""
    return np.concatenate([[0], np.cumsum(pmf > 0)])


def drop_idle(positions: np.ndarray, pmf: np.ndarray, row: int, nonzero: np.ndarray | None = None
              ) -> np.ndarray:
    """Drop positions that serve no mass: c_i with pmf == 0 on [c_i, c_{i+1}) (c_{K+1} = row + 1).

    Such a checkpoint changes no cost (only depths in [c_i, c_{i+1}) resume from it), so the optimum
    keeps its cost with fewer checkpoints. The test is exact: it counts nonzero entries.

    Args:
      positions: int64 [K] sorted, in 1..row.
      pmf: float64 [>= row+1] non-negative.
      row: the largest depth served.
      nonzero: `nonzero_prefix(pmf)` if already at hand.

    Returns:
      int64 [K'] the kept positions, sorted.
    """
    if positions.size == 0:
        return positions
    nonzero = nonzero_prefix(pmf[: row + 1]) if nonzero is None else nonzero
    ends = np.append(positions[1:], row + 1)
    return positions[nonzero[ends] - nonzero[positions] > 0]


def placement_cost(pmf: np.ndarray, positions: np.ndarray, cost: Cost) -> float:
    """sum_t p(t) (g(t) - g(c(t))) / sum_t p(t), c(t) = the largest position <= t (0 if none).

    Args:
      pmf: float64 [N+1] non-negative with positive total.
      positions: int [K] sorted positions.
      cost: the cost model.
    """
    depths = np.arange(pmf.shape[0])
    anchors = np.concatenate([[0], positions])[np.searchsorted(positions, depths, side="right")]
    return float(np.sum(pmf * (cost.g(depths) - cost.g(anchors))) / pmf.sum())


def expected_cost(pmf: Any, positions: Any, cost: CostLike = "linear") -> float:
    """Expected recomputation cost of `positions` under the overlap `pmf` (public, validating).

    Args:
      pmf: [N+1] weights of overlap depths 0..N (need not sum to 1).
      positions: 1-D integers in 1..N (any order; duplicates are merged).
      cost: "linear", "hybrid:a,b" or a `Cost`.

    Returns:
      sum_t p(t)(g(t) - g(c(t))) / sum_t p(t).
    """
    pmf = check_pmf(pmf)
    model = parse_cost(cost)
    array = np.asarray(positions)
    if array.ndim != 1:
        raise ValueError(f"positions must be 1-D, got shape {array.shape}")
    if array.size and (array.dtype == bool or not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"positions must be integers, got dtype {array.dtype}")
    array = np.unique(array.astype(np.int64))
    n = pmf.shape[0] - 1
    if array.size and (array[0] < 1 or array[-1] > n):
        raise ValueError(f"positions must lie in 1..{n}, got {array.tolist()}")
    return placement_cost(pmf, array, model)


def check_length(length: Any, name: str = "length") -> int:
    """A request length L as an int >= 0."""
    return check_count(length, name, 0)


@dataclasses.dataclass(frozen=True)
class Placement:
    """An optimal placement of at most `budget` checkpoints for one overlap pmf.

    Attributes:
      positions: int64 [K] sorted, unique, in 1..N, multiples of `grid`, K <= budget.
      expected_cost: sum_t p(t)(g(t) - g(c(t))) / sum_t p(t) of `positions`.
      budget: the budget asked for (the solve caps it at N // grid).
      cost: the cost model.
      grid: positions are multiples of it.
    """

    positions: np.ndarray
    expected_cost: float
    budget: int
    cost: Cost
    grid: int
    _pmf: np.ndarray = dataclasses.field(repr=False, compare=False)
    _tables: Any = dataclasses.field(repr=False, compare=False)
    _layers: int = dataclasses.field(repr=False, compare=False)

    @property
    def max_depth(self) -> int:
        """N, the largest depth of the solved pmf."""
        return self._pmf.shape[0] - 1

    @functools.cached_property
    def _host_tables(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self._tables is None else tuple(np.asarray(t) for t in self._tables)

    @functools.cached_property
    def _nonzero(self) -> np.ndarray:
        return nonzero_prefix(self._pmf)

    def positions_for(self, length: Any) -> np.ndarray:
        """Optimal positions for the pmf truncated to depths 0..L (mass at depths > L dropped).

        Comes from the same solve (the argmin tables), so it costs O(budget). A length L > N
        truncates nothing and returns the full optimum; every position is <= min(L, N). It equals
        `solve` on the truncated pmf as long as the truncated weights are not subnormal once the
        pmf is scaled to a largest weight in [1, 2) (below ~2e-308 of the largest weight: too few
        mantissa bits to rank placements; `solve` of the truncated pmf alone rescales them).

        Args:
          length: L, an int >= 0 (a request's length).

        Returns:
          int64 [K] sorted positions in 1..min(L, N).
        """
        row = min(check_length(length), self.max_depth)
        if self._tables is None:
            return brute_force(self._pmf[: row + 1], self.budget, self.cost, self.grid).positions
        found = backtrack(self._host_tables, self._layers, self.grid, row)
        return drop_idle(found, self._pmf, row, self._nonzero)

    def expected_cost_for(self, length: Any) -> float:
        """Expected cost of `positions_for(L)` under the pmf truncated to 0..L (0.0 if it has no mass)."""
        row = min(check_length(length), self.max_depth)
        truncated = self._pmf[: row + 1]
        if not truncated.sum() > 0:
            return 0.0
        return placement_cost(truncated, self.positions_for(row), self.cost)


@dataclasses.dataclass(frozen=True)
class BatchPlacement:
    """Optimal placements for B pmfs solved together.

    Attributes:
      positions: int64 [B, min(budget, N // grid)], each row sorted ascending, padded with 0 at the end.
      counts: int64 [B], the real positions per row.
      expected_cost: float64 [B].
      budget, cost, grid: as in `Placement`.
    """

    positions: np.ndarray
    counts: np.ndarray
    expected_cost: np.ndarray
    budget: int
    cost: Cost
    grid: int
    _pmfs: np.ndarray = dataclasses.field(repr=False, compare=False)
    _tables: Any = dataclasses.field(repr=False, compare=False)
    _layers: int = dataclasses.field(repr=False, compare=False)

    def __len__(self) -> int:
        return self.positions.shape[0]

    @functools.cached_property
    def _host_tables(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(np.asarray(t) for t in self._tables)

    def row(self, index: Any) -> Placement:
        """Row `index` as a `Placement` (its `positions_for` uses the batch's tables)."""
        i = check_count(index, "index", 0)
        if i >= len(self):
            raise ValueError(f"index {i} is out of range for a batch of {len(self)}")
        count = int(self.counts[i])
        return Placement(self.positions[i, :count].copy(), float(self.expected_cost[i]), self.budget,
                         self.cost, self.grid, self._pmfs[i], tuple(t[i] for t in self._host_tables),
                         self._layers)

    @functools.cached_property
    def _rows(self) -> dict[int, Placement]:
        """Rows built by `positions_for`, kept: a row's host-side tables and nonzero counts are
        computed once, not on every request a serving planner plans."""
        return {}

    def positions_for(self, index: Any, length: Any) -> np.ndarray:
        """`row(index).positions_for(length)`."""
        i = check_count(index, "index", 0)
        placement = self._rows.get(i)
        if placement is None:
            placement = self._rows[i] = self.row(i)
        return placement.positions_for(length)


def brute_force(pmf: Any, budget: Any, cost: CostLike = "linear", grid: Any = 1) -> Placement:
    """Enumerate every set of at most `budget` grid positions (tiny N only: tests).

    Ties go to fewer positions, then to the lexicographically smallest set.

    Args:
      pmf: [N+1] weights of depths 0..N.
      budget: int >= 0; grid: int >= 1; cost: as in `solve`.

    Returns:
      The optimal `Placement` (its `positions_for` enumerates again).
    """
    pmf = normalized(check_pmf(pmf))
    budget = check_count(budget, "budget", 0)
    grid = check_count(grid, "grid", 1)
    model = parse_cost(cost)
    n = pmf.shape[0] - 1
    candidates = np.arange(grid, n + 1, grid)
    best, best_cost = np.zeros(0, np.int64), placement_cost(pmf, np.zeros(0, np.int64), model)
    for size in range(1, min(budget, candidates.size) + 1):
        for subset in itertools.combinations(candidates.tolist(), size):
            positions = np.array(subset, dtype=np.int64)
            value = placement_cost(pmf, positions, model)
            if value < best_cost:
                best, best_cost = positions, value
    return Placement(best, best_cost, budget, model, grid, pmf, None, min(budget, candidates.size))
