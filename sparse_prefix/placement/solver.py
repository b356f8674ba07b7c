"""Public entry points: `solve` and `solve_batch` -- host glue around the jitted solver (dp.py).

Host side: validate, normalise, prefix sums in float64 NumPy (the reference uses the same arrays),
pad to a shape bucket, call the device, fetch one array; after a device backtrack the argmin tables
stay on the device until a `positions_for` asks for them.

Compile reuse: N is padded up to a bucket of {2^k, 3*2^(k-1)} (>= 16; the padded depths carry no
mass and the backtrack starts at row N, so the answer is the unpadded one), the table height (the
budget) up to a power of two (>= 4), and a batch up to a power of two (padded with copies of row 0).
Distinct compilations are keyed by (N bucket, height bucket, batch bucket, grid, search passes, layer
schedule) only; the cost model and the budget are runtime values (on CPU the layer loop runs exactly
`budget` times; on accelerators height - 1 layers run, those past the budget masked, so that no
loop waits on a device-to-host predicate: `dp.layer_schedule`). One call takes one host-to-device
copy (`dp.pack`: the prefix sums, the budget and row, written in place) and fetches one array: the
positions, or for small tables (`dp.host_backtrack`, e.g. N = 256, M = 30) the tables themselves,
backtracked here in M NumPy steps -- the device then runs only the layers. A batch runs
vmapped on accelerators and as a `lax.map` of the unbatched kernels on CPU (batched scatters are slow
there); either way one jitted call.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from sparse_prefix.placement import dp
from sparse_prefix.placement.costs import Cost, CostLike, check_count, check_pmf, parse_cost
from sparse_prefix.placement.result import (BatchPlacement, Placement, drop_idle, normalized,
                                             placement_cost)
from sparse_prefix.placement.result import backtrack as backtrack_tables


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


def _device_buffer(pmfs: np.ndarray, model: Cost, padded: int, layers: int) -> np.ndarray:
    """The packed device input (`dp.pack`) float64 [B, 3 (padded+1) + 2] for normalised pmfs [B, N+1].

    Written in place: (P, G) are the prefix sums of the pmf padded with zero mass (rows past N repeat
    row N -- bitwise what a cumulative sum over the zero padding gives), g = g(0..padded), then M, N.
    """
    count, n, rows = pmfs.shape[0], pmfs.shape[1] - 1, padded + 1
    buffer = np.empty((count, 3 * rows + 2))
    mass, cost, g = (buffer[:, k * rows: (k + 1) * rows] for k in range(3))
    g[:] = model.g(np.arange(rows))
    np.cumsum(pmfs, axis=1, out=mass[:, : n + 1])
    np.cumsum(pmfs * g[0, : n + 1], axis=1, out=cost[:, : n + 1])
    mass[:, n + 1:] = mass[:, n: n + 1]
    cost[:, n + 1:] = cost[:, n: n + 1]
    buffer[:, -2], buffer[:, -1] = layers, n
    return buffer


def device_call(pmfs: np.ndarray, model: Cost, layers: int, grid: int, method: str, batched: bool,
                schedule: str = "auto", backtrack: str = "auto"):
    """The jitted solver, its argument and static settings for normalised pmfs [B, N+1].

    Args:
      backtrack: "device", "host" or "auto" (`dp.host_backtrack` by the table size); the rest as in
        `solve`.

    Returns:
      (jitted function, (buffer float64 [3 R + 2] or [B', 3 R + 2],), static keyword arguments) --
      call it (inside `jax.enable_x64(True)`) or `.lower` it to inspect the program.
    """
    n = pmfs.shape[1] - 1
    padded = bucket(n)
    levels = (dp.search_levels(method, padded // grid), dp.search_levels(method, padded))
    height = power_of_two(max(layers, 4))
    if backtrack == "auto":
        backtrack = "host" if dp.host_backtrack(padded + 1, padded // grid, height) else "device"
    static = dict(grid=grid, height=height, levels=levels,
                  schedule=dp.layer_schedule(schedule, height, levels[0]), backtrack=backtrack)
    rows = pmfs.shape[0]
    if batched:
        pmfs = np.concatenate([pmfs, np.repeat(pmfs[:1], power_of_two(rows) - rows, axis=0)])
    buffer = _device_buffer(pmfs, model, padded, layers)
    if batched:
        static["batching"] = "map" if dp.current_platform() == "cpu" else "vmap"
        return dp.solve_many, (buffer,), static
    return dp.solve_one, (buffer[0],), static


def _solve_device(pmfs: np.ndarray, model: Cost, layers: int, grid: int, method: str, batched: bool,
                  schedule: str = "auto", backtrack: str = "auto"):
    """Run the jitted solver on normalised pmfs [B, N+1]: one copy in, one fetch out.

    Returns:
      ((coarse, final) tables -- on the host after a host backtrack, else left on the device --,
      positions int64 [B or 1, K] -- a device backtrack's, unordered, 0 = none -- or None).
    """
    function, args, static = device_call(pmfs, model, layers, grid, method, batched, schedule,
                                         backtrack)
    with jax.enable_x64(True):
        fetched, tables, _ = function(*args, **static)
    fetched = np.asarray(fetched)
    if static["backtrack"] == "host":
        return dp.split_tables(fetched, static["height"], args[0].shape[-1] // 3), None
    return tables, fetched.reshape(-1, static["height"]).astype(np.int64)


def _positions(found: np.ndarray | None, tables: tuple[Any, Any], pmf: np.ndarray, layers: int,
               grid: int) -> np.ndarray:
    """Sorted positions of the optimum for row N, idle ones dropped.

    From a device backtrack's output `found` (unordered, 0 = none), or, when it is None, by
    backtracking host `tables` (the same walk, so the same positions).
    """
    n = pmf.shape[0] - 1
    if found is None:
        positions = backtrack_tables(tables, layers, grid, n)
    else:
        positions = np.sort(found[found > 0])
    return drop_idle(positions, pmf, n)


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
    positions = _positions(None if found is None else found[0], tables, pmf, layers, grid)
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
        row_tables = tuple(t[i] for t in tables) if found is None else None
        kept = _positions(None if found is None else found[i], row_tables, pmfs[i], layers, grid)
        positions[i, : kept.size] = kept
        counts[i] = kept.size
    costs = np.array([placement_cost(pmfs[i], positions[i, : counts[i]], model) for i in range(rows)])
    return BatchPlacement(positions, counts, costs, budget, model, grid, pmfs, tables, layers)
