"""The jitted JAX solver: the DP's layers, each one monotone row-minimum search (device code).

With P(j) = sum_{t<=j} p(t), G(j) = sum_{t<=j} g(t) p(t) and a candidate position s (a multiple of
`grid`), layer m's value at row j (the least cost of depths 0..j with at most m checkpoints) is

    F_m(j) = min_{s <= j} (F_{m-1}(s-1) - G(s-1)) + G(j) - g(s) (P(j) - P(s-1))          (1)

-- the same float64 expression, in the same order, as the NumPy reference -- and F_m(j) = G(j) for
j < grid. Only the rows s - 1 feed the next layer, so layers 1..M-1 run on the C = N // grid
*coarse* rows j = c * grid - 1 (c = 1..C) and only layer M runs on every row 0..N (so that
`positions_for(L)` can start anywhere). Every layer is a row-minimum search over C lines
(search.py). Per layer: O(L K (C + rows)) work for the search's K^L ~ rows, L dependent passes.

Tables: coarse int32 [height, C] -- entry [m-1, c-1] is the last position of layer m's optimum at
row c * grid - 1 (0: none) -- and final int32 [R], layer M's at every row. Layers run in a
`lax.fori_loop` with a dynamic trip count, so one compilation serves every budget <= height. All
arithmetic is float64: call inside `jax.enable_x64(True)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.placement.search import Lines, row_argmin

Array = jax.Array

# "auto" per platform: (dense up to this many rows, else one search pass per factor of ~radix rows).
# CPU measured (BENCHMARKS.md). GPU, untuned: dense is one fused reduction and kernel launches
# dominate, so dense much further and fewer, wider passes.
AUTO = {"cpu": (64, 32), "gpu": (4096, 128)}


def current_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") that jitted calls run on now (honours jax.default_device)."""
    device = getattr(jax.config, "jax_default_device", None)
    if device is None:
        return jax.default_backend()
    return device if isinstance(device, str) else device.platform


def search_levels(method: str, rows: int, platform: str | None = None) -> int:
    """Passes of the row-minimum search: "dense" = 1, "tiled:L" = L, "auto" by size and platform.

    Args:
      method: "auto", "dense" or "tiled:L" (L >= 1).
      rows: the rows searched.
      platform: jax platform for "auto" (default: `current_platform()`).
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {method!r}")
    if method == "dense":
        return 1
    if method.startswith("tiled:") and method[6:].isdigit() and int(method[6:]) >= 1:
        return int(method[6:])
    if method != "auto":
        raise ValueError(f"method must be 'auto', 'dense' or 'tiled:L' (L >= 1), got {method!r}")
    dense_up_to, radix = AUTO.get(platform or current_platform(), AUTO["gpu"])
    if rows <= dense_up_to:
        return 1
    return max(1, int(np.ceil(np.log(rows) / np.log(radix) - 1e-9)))


def _layer(values: Array, lines_data: tuple[Array, Array, Array], row_mass: Array, row_cost: Array,
           limit: Array, fallback: Array, grid: int, levels: int) -> tuple[Array, Array]:
    """One layer over some rows: (F_m at the rows [R'], last positions int32 [R'], 0 = none).

    Args:
      values: F_{m-1} at the coarse rows [C]; lines_data: (G, P at the coarse rows, g at positions).
      row_mass, row_cost, limit: P, G and the last valid column of the rows searched [R'].
      fallback: F_m where no position is allowed (F_{m-1} there) [R'].
    """
    coarse_cost, coarse_mass, slope = lines_data
    lines = Lines(values - coarse_cost, slope, coarse_mass)
    arg = row_argmin(lines, row_mass, row_cost, limit, levels)
    best = jnp.where(arg >= 0, lines.at(jnp.maximum(arg, 0), row_mass, row_cost), fallback)
    return best, jnp.where(arg >= 0, grid * (arg + 1), 0).astype(jnp.int32)


def solve_tables(prefix_mass: Array, prefix_cost: Array, g: Array, layers: Array, row: Array, *,
                 grid: int, height: int, levels: tuple[int, int]) -> tuple[Array, Array, Array, Array]:
    """All layers of one pmf and the backtrack from `row` (vmap or map it for a batch).

    Args:
      prefix_mass, prefix_cost, g: P, G, g float64 [R] (padded rows carry no mass).
      layers: int32 [], the budget M (capped at N // grid; <= height).
      row: int32 [], N, the row to backtrack from.
      grid, height, levels: static -- the grid, the coarse table height (>= M), the search passes of
        the coarse layers and of the final layer (`search_levels`).

    Returns:
      (coarse int32 [height, C], final int32 [R], positions int32 [height] -- descending, 0-padded,
      F_M(row) float64 []).
    """
    rows = prefix_mass.shape[0]
    columns = (rows - 1) // grid
    if columns == 0:
        return (jnp.zeros((height, 0), jnp.int32), jnp.zeros((rows,), jnp.int32),
                jnp.zeros((height,), jnp.int32), prefix_cost[row])
    coarse = slice(grid - 1, grid * columns, grid)  # rows s - 1 for s = grid, 2 grid, ..., C grid
    lines_data = (prefix_cost[coarse], prefix_mass[coarse], g[grid: grid * columns + 1: grid])
    coarse_limit = jnp.arange(columns, dtype=jnp.int32) - 1
    coarse_levels, final_levels = levels

    def coarse_layer(m, carry):
        values, tables = carry
        values, found = _layer(values, lines_data, lines_data[1], lines_data[0], coarse_limit, values,
                               grid, coarse_levels)
        return values, jax.lax.dynamic_update_slice(tables, found[None, :], (m, jnp.zeros_like(m)))

    tables = jnp.zeros((height, columns), jnp.int32)
    values, tables = jax.lax.fori_loop(0, layers - 1, coarse_layer, (lines_data[0], tables))
    searched = slice(1, rows)  # row 0 never has a candidate
    limit = jnp.arange(1, rows, dtype=jnp.int32) // grid - 1
    best, final = _layer(values, lines_data, prefix_mass[searched], prefix_cost[searched], limit,
                         prefix_cost[searched], grid, final_levels)
    final = jnp.where(layers > 0, jnp.concatenate([jnp.zeros((1,), jnp.int32), final]), 0)
    best = jnp.concatenate([prefix_cost[:1], best])
    optimum = jnp.where(layers > 0, best[row], prefix_cost[row])

    def step_back(i, carry):
        s, found = carry
        previous = jnp.where(s > 0, tables[layers - 1 - i, jnp.maximum(s // grid - 1, 0)], 0)
        return previous, found.at[i].set(previous)

    start = final[row]
    found = jnp.zeros((height,), jnp.int32).at[0].set(start)
    _, found = jax.lax.fori_loop(1, layers, step_back, (start, found))
    return tables, final, found, optimum


@functools.partial(jax.jit, static_argnames=("grid", "height", "levels"))
def solve_one(prefix_mass, prefix_cost, g, layers, row, *, grid, height, levels):
    """Jitted `solve_tables` for one pmf."""
    return solve_tables(prefix_mass, prefix_cost, g, layers, row, grid=grid, height=height,
                        levels=levels)


@functools.partial(jax.jit, static_argnames=("grid", "height", "levels", "batching"))
def solve_many(prefix_mass, prefix_cost, g, layers, row, *, grid, height, levels, batching):
    """Jitted `solve_tables` over a leading batch axis of P, G, g [B, R].

    `batching` "vmap" runs the rows in parallel (accelerators); "map" runs them one after the other
    with the unbatched kernels (faster on CPU, where batched scatters are slow).
    """
    one = functools.partial(solve_tables, layers=layers, row=row, grid=grid, height=height,
                            levels=levels)
    if batching == "vmap":
        return jax.vmap(one)(prefix_mass, prefix_cost, g)
    return jax.lax.map(lambda args: one(*args), (prefix_mass, prefix_cost, g))
