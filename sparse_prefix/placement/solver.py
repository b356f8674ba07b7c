"""Public entry points: `solve` and `solve_batch` -- host glue around the jitted solver (dp.py).

Host side: validate, normalise, prefix sums in float64 NumPy (the reference uses the same arrays),
pad to a shape bucket, call the device, fetch only the backtracked positions; the argmin tables stay
on the device until a `positions_for` asks for them.

Compile reuse: N is padded up to a bucket of {2^k, 3*2^(k-1)} (>= 16; the padded depths carry no
mass and the backtrack starts at row N, so the answer is the unpadded one), the table height (the
budget) up to a power of two (>= 4), and a batch up to a power of two (padded with copies of row 0).
Distinct compilations are keyed by (N bucket, height bucket, batch bucket, grid, search passes, layer
schedule) only; the cost model and the budget are runtime values (on CPU the layer loop runs exactly
`budget` times; on accelerators height - 1 layers run, those past the budget masked, so that no
loop waits on a device-to-host predicate: `dp.layer_schedule`). One call takes two host-to-device
copies (the stacked prefix sums, the budget and row) and fetches one array (the positions). A batch runs
vmapped on accelerators and as a `lax.map` of the unbatched kernels on CPU (batched scatters are slow
there); either way one jitted call.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from sparse_prefix.placement import dp
from sparse_prefix.placement.costs import Cost, CostLike, check_count, check_pmf, parse_cost
from sparse_prefix.placement.reference import prefix_sums
from sparse_prefix.placement.result import (BatchPlacement, Placement, drop_idle, normalized,
                                             placement_cost)


def bucket(size: int, smallest: int = 16) -> int:
    """The smallest of {2^k, 3 * 2^(k-1)} (>= `smallest`, a power of two) that is >= `size`."""
    value = smallest
    while True:
        if value >= size:
            return value
        if value * 3 // 2 >= size:
            return value * 3 // 2
        value *= 2


def power_of_two(size: int) -> int:
    """The smallest power of two >= max(size, 1)."""
    return 1 << max(size - 1, 0).bit_length()


def _device_inputs(pmfs: np.ndarray, model: Cost, padded: int) -> np.ndarray:
    """(P, G, g) float64 [B, 3, padded+1] for normalised pmfs [B, N+1] (padded depths: zero mass).

    Stacked so that the device call takes one host-to-device copy for all three.
    """
    grown = np.zeros((pmfs.shape[0], padded + 1))
    grown[:, : pmfs.shape[1]] = pmfs
    return np.stack(prefix_sums(grown, model), axis=1)


def device_call(pmfs: np.ndarray, model: Cost, layers: int, grid: int, method: str, batched: bool,
                schedule: str = "auto"):
    """The jitted solver, its arguments and static settings for normalised pmfs [B, N+1].

    Returns:
      (jitted function, (sums float64 [3, R] or [B', 3, R], scalars int32 [2]), static keyword
      arguments) -- call it (inside `jax.enable_x64(True)`) or `.lower` it to inspect the program.
    """
    n = pmfs.shape[1] - 1
    padded = bucket(n)
    levels = (dp.search_levels(method, padded // grid), dp.search_levels(method, padded))
    height = power_of_two(max(layers, 4))
    static = dict(grid=grid, height=height, levels=levels,
                  schedule=dp.layer_schedule(schedule, height, levels[0]))
    rows = pmfs.shape[0]
    if batched:
        pmfs = np.concatenate([pmfs, np.repeat(pmfs[:1], power_of_two(rows) - rows, axis=0)])
    sums = _device_inputs(pmfs, model, padded)
    scalars = np.array([layers, n], np.int32)
    if batched:
        static["batching"] = "map" if dp.current_platform() == "cpu" else "vmap"
        return dp.solve_many, (sums, scalars), static
    return dp.solve_one, (sums[0], scalars), static


def _solve_device(pmfs: np.ndarray, model: Cost, layers: int, grid: int, method: str, batched: bool,
                  schedule: str = "auto"):
    """Run the jitted solver on normalised pmfs [B, N+1].

    Returns:
      ((coarse, final) device tables, positions int64 [B or 1, height], unordered, 0 = none).
    """
    function, args, static = device_call(pmfs, model, layers, grid, method, batched, schedule)
    with jax.enable_x64(True):
        coarse, final, found, _ = function(*args, **static)
        found = np.asarray(jax.device_get(found), np.int64).reshape(-1, static["height"])
    return (coarse, final), found


def _positions(found: np.ndarray, pmf: np.ndarray) -> np.ndarray:
    """Device backtrack output (unordered, 0 = none) -> sorted positions with idle ones dropped."""
    positions = np.sort(found[found > 0])
    return drop_idle(positions, pmf, pmf.shape[0] - 1)


def solve(pmf: Any, budget: Any, *, cost: CostLike = "linear", grid: Any = 1,
          method: str = "auto", schedule: str = "auto") -> Placement:
    """Optimal positions of at most `budget` checkpoints for the overlap-depth `pmf` (exact DP).

    Minimises sum_t p(t) (g(t) - g(c(t))), c(t) the deepest position <= t (0 if none), over sets of
    at most `budget` multiples of `grid` in 1..N. Ties go to the smaller position (up to float64
    rounding); positions that serve no mass are dropped (they change no cost).

    Args:
      pmf: [N+1] weights of overlap depths 0..N in tokens (need not sum to 1; finite, >= 0, some mass).
      budget: int >= 0, the most checkpoints; capped at N // grid.
      cost: "linear" (g(t) = t), "hybrid:a,b" or `hybrid(a, b)` (g(t) = a t + b t^2).
      grid: int >= 1; positions are multiples of it (solved exactly on the grid, every token costed).
      method: "auto" (by size and platform), "dense" (all row x candidate pairs) or "tiled:L" (L
        passes of the tiled monotone search per layer; see dp.py).
      schedule: how the layers run: "auto" (by platform and size), "dynamic" (a loop up to the
        budget), "scan" (a loop of static trip count, layers past the budget masked) or "unroll"
        (`dp.layer_schedule`). Every choice gives the same answer.

    Returns:
      The `Placement`; its `positions_for(L)` answers truncated pmfs from the same solve.

    Raises:
      TypeError / ValueError: bad pmf, budget, cost, grid, method or schedule (the message names it).
    """
    pmf = normalized(check_pmf(pmf))
    budget = check_count(budget, "budget", 0)
    grid = check_count(grid, "grid", 1)
    model = parse_cost(cost)
    n = pmf.shape[0] - 1
    layers = min(budget, n // grid)
    tables, found = _solve_device(pmf[None, :], model, layers, grid, method, batched=False,
                                  schedule=schedule)
    positions = _positions(found[0], pmf)
    return Placement(positions, placement_cost(pmf, positions, model), budget, model, grid, pmf, tables,
                     layers)


def solve_batch(pmfs: Any, budget: Any, *, cost: CostLike = "linear", grid: Any = 1,
                method: str = "auto", schedule: str = "auto") -> BatchPlacement:
    """`solve` for every row of `pmfs` [B, N+1] in one vmapped, jitted call.

    Args:
      pmfs: [B, N+1], B >= 1, every row a valid pmf (an all-zero row raises, naming the rows).
      budget, cost, grid, method, schedule: as in `solve`.

    Returns:
      A `BatchPlacement`: positions int64 [B, min(budget, N // grid)] (sorted, 0-padded at the end;
      the width is the capped budget, so a huge budget costs nothing), counts [B], expected_cost [B];
      `.row(i)` / `.positions_for(i, L)` from the same solve.
    """
    pmfs = normalized(check_pmf(pmfs, "pmfs", ndim=2))
    budget = check_count(budget, "budget", 0)
    grid = check_count(grid, "grid", 1)
    model = parse_cost(cost)
    rows, n = pmfs.shape[0], pmfs.shape[1] - 1
    layers = min(budget, n // grid)
    tables, found = _solve_device(pmfs, model, layers, grid, method, batched=True, schedule=schedule)
    positions = np.zeros((rows, layers), np.int64)
    counts = np.zeros(rows, np.int64)
    for i in range(rows):
        kept = _positions(found[i], pmfs[i])
        positions[i, : kept.size] = kept
        counts[i] = kept.size
    costs = np.array([placement_cost(pmfs[i], positions[i, : counts[i]], model) for i in range(rows)])
    return BatchPlacement(positions, counts, costs, budget, model, grid, pmfs, tables, layers)
