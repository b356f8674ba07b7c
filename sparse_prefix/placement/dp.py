"""The jitted JAX solver: the DP's layers, each one monotone row-minimum search (device code).

With P(j) = sum_{t<=j} p(t), G(j) = sum_{t<=j} g(t) p(t) and a candidate position s (a multiple of
`grid`), layer m's value at row j (the least cost of depths 0..j with at most m checkpoints) is

    F_m(j) = min_{s <= j} (F_{m-1}(s-1) - G(s-1)) + G(j) - g(s) (P(j) - P(s-1))          (1)

-- the same float64 expression, in the same order, as the NumPy reference -- and F_m(j) = G(j) for
j < grid. Only the rows s - 1 feed the next layer, so layers 1..M-1 run on the C = N // grid
*coarse* rows j = c * grid - 1 (c = 1..C) and only layer M runs on every row 0..N (so that
`positions_for(L)` can start anywhere). Every layer is a row-minimum search over C lines
(search.py). Per layer: O(L K (C + rows)) work for the search's K^L ~ rows, L dependent passes.

Tables: coarse int32 [height-1, C] -- entry [m-1, c-1] is the last position of layer m's optimum at
row c * grid - 1 (0: none) -- and final int32 [R], layer M's at every row. One compilation serves
every budget M <= height (the budget is a runtime value); the coarse layers run on one of three
schedules (`layer_schedule`): a while loop up to M (CPU), or all height - 1 layers with those past M
masked to identities, as a loop of static trip count or unrolled (GPU: no device-to-host predicate
per layer). All arithmetic is float64: call inside `jax.enable_x64(True)`.

A call takes one `pack`ed float64 buffer and returns one array to fetch: the optimum's positions
(backtracked on the device: carried paths or a walk), or, for small tables (`host_backtrack`), the
tables themselves, flat, for the host to backtrack (then the device runs the layers and nothing else).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.placement.search import Lines, dense_min, row_argmin

Array = jax.Array

# "auto" per platform: (dense up to this many rows, else one search pass per factor of ~radix rows).
# CPU measured (BENCHMARKS.md). GPU, untuned: dense is one fused reduction and kernel launches
# dominate, so dense much further and fewer, wider passes.
AUTO = {"cpu": (64, 32), "gpu": (4096, 128)}

SCHEDULES = ("dynamic", "scan", "unroll")
UNROLL_MAX_HEIGHT = 32  # "auto" unrolls dense coarse layers up to this table height (compile time)
# Static schedules carry every coarse row's path ([C, height-1] int32, read and written per layer) up
# to this size; above it they walk the tables back in a loop of static trip count height - 1.
PATHS_MAX_ELEMENTS = 1 << 22
# Up to this many table entries ((height-1) C + R), the tables come back to the host in the one
# array a call fetches and the backtrack runs there (M scalar steps of NumPy): the device then runs
# the layers only (no path carried per layer, no walk), the fewest kernels a call can launch.
HOST_BACKTRACK_MAX_ELEMENTS = 1 << 16

CoarseLayer = Callable[[Array], tuple[Array, Array]]


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


def layer_schedule(schedule: str, height: int, coarse_levels: int, platform: str | None = None) -> str:
    """How the coarse layers run: "dynamic", "scan" or "unroll" ("auto": by platform and size).

    "dynamic": a while loop up to the runtime budget, then a backtrack loop (CPU: no wasted layer,
    and a loop predicate costs nothing there). "scan": a loop of static trip count height - 1, the
    layers past the budget masked to identities, the backtrack done in advance by carried paths (up
    to `PATHS_MAX_ELEMENTS`; else a backtrack loop of static trip count); XLA knows every trip count,
    so a GPU runs them without reading a predicate back to the host every iteration. "unroll": the
    same as straight-line code (no loop: a GPU can replay it as one command buffer); "auto" picks it
    for dense coarse layers up to `UNROLL_MAX_HEIGHT` (compile time grows with the height).

    Args:
      schedule: "auto", "dynamic", "scan" or "unroll".
      height: the coarse table height bucket (>= the budget).
      coarse_levels: the search passes of a coarse layer (`search_levels`).
      platform: jax platform for "auto" (default: `current_platform()`).

    Raises:
      TypeError / ValueError: `schedule` is not one of the names above.
    """
    if not isinstance(schedule, str):
        raise TypeError(f"schedule must be a string, got {schedule!r}")
    if schedule in SCHEDULES:
        return schedule
    if schedule != "auto":
        raise ValueError(f"schedule must be 'auto', 'dynamic', 'scan' or 'unroll', got {schedule!r}")
    if (platform or current_platform()) == "cpu":
        return "dynamic"
    return "unroll" if coarse_levels == 1 and height <= UNROLL_MAX_HEIGHT else "scan"


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
    if levels == 1:  # one reduction gives the minimum together with its column
        best, arg = dense_min(lines, row_mass, row_cost, limit)
    else:
        arg = row_argmin(lines, row_mass, row_cost, limit, levels)
        best = lines.at(jnp.maximum(arg, 0), row_mass, row_cost)
    best = jnp.where(arg >= 0, best, fallback)
    return best, jnp.where(arg >= 0, grid * (arg + 1), 0).astype(jnp.int32)


def _dynamic_layers(coarse_layer: CoarseLayer, values: Array, layers: Array, height: int
                    ) -> tuple[Array, Array]:
    """Coarse layers 1..M-1 in a while loop of runtime trip count M - 1.

    Returns:
      (F_{M-1} at the coarse rows [C], tables int32 [height-1, C]).
    """

    def body(m, carry):
        values, tables = carry
        values, found = coarse_layer(values)
        return values, jax.lax.dynamic_update_slice(tables, found[None, :], (m, jnp.zeros_like(m)))

    tables = jnp.zeros((height - 1, values.shape[0]), jnp.int32)
    return jax.lax.fori_loop(0, layers - 1, body, (values, tables))


def _static_layers(coarse_layer: CoarseLayer, values: Array, layers: Array, height: int, grid: int,
                   unroll: bool, carry_paths: bool) -> tuple[Array, Array, Array | None]:
    """Coarse layers 1..height-1 (those past M-1 masked to identities), carrying the paths.

    paths[c] lists the positions of the optimum with at most m checkpoints for the depths
    0..(c+1) grid - 1, last first, 0-padded: the backtrack from every coarse row, done in advance.
    Layer m's row c takes the path of the row its position s continues (s / grid - 1) and puts s in
    front (the path it takes has at most m - 1 <= height - 2 entries, so the last slot it drops is 0).
    Every layer is the same code (no per-layer constant but the masking), so an unrolled program
    repeats identical kernels.

    Args:
      coarse_layer: F_{m-1} [C] -> (F_m [C], last positions int32 [C]).
      values: F_0 at the coarse rows [C].
      layers: int32 [], M.
      height, grid: static.
      unroll: straight-line code instead of a loop.
      carry_paths: carry the paths (else return None for them).

    Returns:
      (F_{M-1} [C], tables int32 [height-1, C] -- rows from M-1 on are zero, paths int32 [C, height-1]
      -- positions descending, 0-padded -- or None).
    """
    columns = values.shape[0]

    def step(carry, index):
        values, paths = carry
        best, found = coarse_layer(values)
        found = jnp.where(index < layers - 1, found, 0)  # 0: masked, or no position (best == values)
        if paths is not None:
            previous = paths[jnp.maximum(found // grid - 1, 0), :-1]
            paths = jnp.where(found[:, None] > 0, jnp.concatenate([found[:, None], previous], axis=1),
                              paths)
        return (jnp.where(found > 0, best, values), paths), found

    carry = (values, jnp.zeros((columns, height - 1), jnp.int32) if carry_paths else None)
    if unroll:
        rows = []
        for index in range(height - 1):
            carry, found = step(carry, index)
            rows.append(found)
        tables = jnp.stack(rows)
    else:
        carry, tables = jax.lax.scan(step, carry, jnp.arange(height - 1, dtype=jnp.int32))
    return carry[0], tables, carry[1]


def _walk_back(tables: Array, start: Array, layers: Array, grid: int, height: int, static: bool
               ) -> Array:
    """Backtrack from the last position `start` through `tables`: int32 [height], descending, 0-padded.

    A loop of M - 1 steps, or with `static` of height - 1 steps (a trip count XLA knows), those past
    M - 1 finding nothing.
    """

    def step_back(i, carry):
        s, found = carry
        at = (jnp.maximum(layers - 1 - i, 0), jnp.maximum(s // grid - 1, 0))
        previous = jnp.where((s > 0) & (i < layers), tables[at], 0)
        return previous, found.at[i].set(previous)

    found = jnp.zeros((height,), jnp.int32).at[0].set(start)
    return jax.lax.fori_loop(1, height if static else layers, step_back, (start, found))[1]


def solve_tables(prefix_mass: Array, prefix_cost: Array, g: Array, layers: Array, row: Array, *,
                 grid: int, height: int, levels: tuple[int, int], schedule: str,
                 backtrack: str = "device") -> tuple[Array, Array, Array | None, Array]:
    """All layers of one pmf and the backtrack from `row` (vmap or map it for a batch).

    Args:
      prefix_mass, prefix_cost, g: P, G, g float64 [R] (padded rows carry no mass).
      layers: int32 [], the budget M (capped at N // grid; <= height).
      row: int32 [], N, the row to backtrack from.
      grid, height, levels, schedule: static -- the grid, the table height bucket (>= M, >= 2), the
        search passes of the coarse layers and of the final layer (`search_levels`),
        "dynamic", "scan" or "unroll" (`layer_schedule`), and "device" (backtrack here) or "host"
        (the caller backtracks the tables: no paths carried, no walk; positions come back None).

    Returns:
      (coarse int32 [height-1, C], final int32 [R], positions int32 [height] -- the optimum's
      positions in no particular order, 0 = none -- or None, F_M(row) float64 []).
    """
    rows = prefix_mass.shape[0]
    columns = (rows - 1) // grid
    if columns == 0:
        found = jnp.zeros((height,), jnp.int32) if backtrack == "device" else None
        return (jnp.zeros((height - 1, 0), jnp.int32), jnp.zeros((rows,), jnp.int32), found,
                prefix_cost[row])
    coarse = slice(grid - 1, grid * columns, grid)  # rows s - 1 for s = grid, 2 grid, ..., C grid
    lines_data = (prefix_cost[coarse], prefix_mass[coarse], g[grid: grid * columns + 1: grid])
    coarse_limit = jnp.arange(columns, dtype=jnp.int32) - 1
    coarse_levels, final_levels = levels

    def coarse_layer(values):
        return _layer(values, lines_data, lines_data[1], lines_data[0], coarse_limit, values, grid,
                      coarse_levels)

    if schedule == "dynamic":
        values, tables = _dynamic_layers(coarse_layer, lines_data[0], layers, height)
        paths = None
    else:
        values, tables, paths = _static_layers(
            coarse_layer, lines_data[0], layers, height, grid, unroll=schedule == "unroll",
            carry_paths=backtrack == "device" and columns * (height - 1) <= PATHS_MAX_ELEMENTS)
    searched = slice(1, rows)  # row 0 never has a candidate
    limit = jnp.arange(1, rows, dtype=jnp.int32) // grid - 1
    best, final = _layer(values, lines_data, prefix_mass[searched], prefix_cost[searched], limit,
                         prefix_cost[searched], grid, final_levels)
    final = jnp.where(layers > 0, jnp.concatenate([jnp.zeros((1,), jnp.int32), final]), 0)
    best = jnp.concatenate([prefix_cost[:1], best])
    optimum = jnp.where(layers > 0, best[row], prefix_cost[row])
    start = final[row]
    if backtrack == "host":
        found = None
    elif paths is None:
        found = _walk_back(tables, start, layers, grid, height, static=schedule != "dynamic")
    else:
        earlier = jnp.where(start > 0, paths[jnp.maximum(start // grid - 1, 0)], 0)
        found = jnp.concatenate([earlier, start[None]])
    return tables, final, found, optimum


def pack(sums: np.ndarray, layers: int, row: int) -> np.ndarray:
    """The one host-to-device array of a call: float64 [..., 3 R + 2] = (P, G, g, M, row).

    M and row are small integers, exact in float64, so one copy carries every input.

    Args:
      sums: float64 [..., 3, R], (P, G, g) per pmf.
      layers, row: the budget M (capped) and the row N to backtrack from.
    """
    lead, rows = sums.shape[:-2], sums.shape[-1]
    buffer = np.empty(lead + (3 * rows + 2,))
    buffer[..., : 3 * rows] = sums.reshape(lead + (3 * rows,))
    buffer[..., -2], buffer[..., -1] = layers, row
    return buffer


def unpack(buffer: Array) -> tuple[Array, Array, Array, Array, Array]:
    """(P, G, g) float64 [..., R] and (M, row) int32 [] from a `pack`ed buffer [..., 3 R + 2]."""
    rows = (buffer.shape[-1] - 2) // 3
    sums = buffer[..., : 3 * rows].reshape(buffer.shape[:-1] + (3, rows))
    scalars = buffer.reshape(-1, buffer.shape[-1])[0, -2:].astype(jnp.int32)
    return sums[..., 0, :], sums[..., 1, :], sums[..., 2, :], scalars[0], scalars[1]


def host_backtrack(rows: int, columns: int, height: int) -> bool:
    """Whether a call returns its tables for a host backtrack (`HOST_BACKTRACK_MAX_ELEMENTS`)."""
    return (height - 1) * columns + rows <= HOST_BACKTRACK_MAX_ELEMENTS


def _fetched(coarse: Array, final: Array, found: Array | None) -> Array:
    """The array a call fetches: positions [..., height], or the tables flat [..., (height-1) C + R]."""
    if found is not None:
        return found
    lead = coarse.shape[:-2]
    return jnp.concatenate([coarse.reshape(lead + (-1,)), final], axis=-1)


def split_tables(fetched: np.ndarray, height: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(coarse [..., height-1, C], final [..., R]) views of a host-backtrack call's fetched array."""
    columns = (fetched.shape[-1] - rows) // (height - 1)
    lead = fetched.shape[:-1]
    coarse = fetched[..., : (height - 1) * columns].reshape(lead + (height - 1, columns))
    return coarse, fetched[..., (height - 1) * columns:]


STATIC = ("grid", "height", "levels", "schedule", "backtrack")


@functools.partial(jax.jit, static_argnames=STATIC)
def solve_one(buffer, *, grid, height, levels, schedule, backtrack):
    """Jitted `solve_tables` for one pmf from a `pack`ed buffer float64 [3 R + 2].

    One array in, one array to fetch: a small solve pays one transfer each way.

    Returns:
      (fetched -- positions int32 [height] for backtrack "device", else the tables flat
      (`split_tables`) --, (coarse, final) tables, F_M(row) float64 []).
    """
    coarse, final, found, optimum = solve_tables(*unpack(buffer), grid=grid, height=height,
                                                 levels=levels, schedule=schedule, backtrack=backtrack)
    return _fetched(coarse, final, found), (coarse, final), optimum


@functools.partial(jax.jit, static_argnames=STATIC + ("batching",))
def solve_many(buffer, *, grid, height, levels, schedule, backtrack, batching):
    """`solve_one` over a leading batch axis: buffer float64 [B, 3 R + 2] (every row's M, row alike).

    `batching` "vmap" runs the rows in parallel (accelerators); "map" runs them one after the other
    with the unbatched kernels (faster on CPU, where batched scatters are slow).
    """
    prefix_mass, prefix_cost, g, layers, row = unpack(buffer)
    one = functools.partial(solve_tables, layers=layers, row=row, grid=grid, height=height,
                            levels=levels, schedule=schedule, backtrack=backtrack)
    if batching == "vmap":
        coarse, final, found, optimum = jax.vmap(one)(prefix_mass, prefix_cost, g)
    else:
        coarse, final, found, optimum = jax.lax.map(lambda args: one(*args),
                                                    (prefix_mass, prefix_cost, g))
    return _fetched(coarse, final, found), (coarse, final), optimum
