"""Row minima of a totally monotone matrix of lines, by a tiled monotone search (device code).

The matrix: A[r, c] = intercept[c] + row_cost[r] - slope[c] * (row_mass[r] - mass_before[c]) for
c <= limit[r] (else +inf), with row_mass and limit non-decreasing in r and slope increasing in c. For
c1 < c2, A[r, c2] - A[r, c1] = const - (slope[c2] - slope[c1]) row_mass[r] is non-increasing in r and
the valid columns grow with r, so the leftmost argmin c*(r) is non-decreasing: a row between two
solved rows a < r < b needs only the columns c*(a)..c*(b).

Tiled search -- a divide and conquer with branching factor K instead of 2. The rows are padded to a
size with small factors and indexed in a mixed radix (K_0, ..., K_{L-1}). Pass 0 solves the K_0 rows
at spacing S_0 = prod_{l>0} K_l against all columns. Pass l solves, between every two consecutive rows
solved so far, the K_l - 1 rows at spacing S_l; such a group shares one column window
[c*(left), c*(right)], covered by tiles of W columns. Windows of consecutive groups overlap only at
their ends, so all tiles of a pass fit a static bound (groups + ceil(C / W) - 1) and a pass is a few
dense fixed-shape ops: values [tiles, K_l - 1, W], a min over W, a segment min over each group's
tiles. Row indices come from iota arithmetic, never from large baked-in constants.

Work ~ sum_l K_l (C + groups_l W_l) element evaluations in L dependent passes: L = 1 is the dense
O(R C) search, K = 2 the classic O(R + C log R) divide and conquer; with K ~ R^(1/L) it is
O(L R^(1/L) (R + C)). Exact: every value is the same float64 expression; ties go to the leftmost column.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Lines(NamedTuple):
    """Columns of the matrix, float64 [C] each: A[r, c] = intercept + row_cost - slope (row_mass - mass_before)."""

    intercept: Array
    slope: Array
    mass_before: Array

    def at(self, col: Array, row_mass: Array, row_cost: Array) -> Array:
        """A at broadcastable (columns, rows' mass, rows' cost)."""
        return self.intercept[col] + row_cost - self.slope[col] * (row_mass - self.mass_before[col])

    def dense(self, row_mass: Array, row_cost: Array) -> Array:
        """A at every (row, column) [R, C]: `at` for all columns, without indexing (no gathers)."""
        return (self.intercept[None, :] + row_cost[:, None]
                - self.slope[None, :] * (row_mass[:, None] - self.mass_before[None, :]))


def padded_rows(rows: int) -> int:
    """The smallest 2^k or 3 * 2^k >= rows (sizes that factor into small radices)."""
    value = 1
    while True:
        if value >= rows:
            return value
        if value * 3 // 2 >= rows and value >= 2:
            return value * 3 // 2
        value *= 2


def radices(rows: int, levels: int) -> tuple[int, ...]:
    """Factor `rows` into at most `levels` radices >= 2, as even as possible (() for one row).

    Greedy: each radix is the divisor of what is left closest to the remaining geometric mean.
    """
    left, out = rows, []
    for remaining in range(levels, 0, -1):
        if left == 1:
            break
        if remaining == 1:
            out.append(left)
            break
        target = left ** (1.0 / remaining)
        divisors = [d for d in range(2, left + 1) if left % d == 0]
        best = min(divisors, key=lambda d: (abs(np.log(d / target)), d))
        out.append(best)
        left //= best
    return tuple(out)


def _search_pass(arg: Array, lines: Lines, row_mass: Array, row_cost: Array, limit: Array,
                 groups: int, parent: int, spacing: int, first: int, count: int, width: int
                 ) -> Array:
    """Solve rows r = q * parent + i * spacing (q < groups, first <= i < first + count).

    Group q's window is [c*(q * parent), c*((q + 1) * parent)] (open ends where that row does not
    exist; pass 0, first == 0, has none), capped at the limit of its last row.

    Returns:
      `arg` int32 [R] with these rows' leftmost argmin columns filled in (-1: no valid column).
    """
    rows, columns = row_mass.shape[0], lines.intercept.shape[0]
    q = jnp.arange(groups, dtype=jnp.int32)
    r = q[:, None] * parent + (first + jnp.arange(count, dtype=jnp.int32))[None, :] * spacing
    if first == 0:
        lo = jnp.zeros((groups,), jnp.int32)
        hi = jnp.full((groups,), columns - 1, jnp.int32)
    else:
        lo = jnp.maximum(arg[q * parent], 0)
        right = (q + 1) * parent
        hi = jnp.where(right < rows, arg[jnp.minimum(right, rows - 1)], columns - 1)
    hi = jnp.minimum(hi, limit[r[:, -1]])
    tiles = groups + -(-columns // width) - 1
    first_tile = lo // width
    tile_count = jnp.maximum(hi // width - first_tile + 1, 0)
    ends = jnp.cumsum(tile_count)
    starts = ends - tile_count
    tile = jnp.arange(tiles, dtype=jnp.int32)
    group = jnp.cumsum(jnp.zeros((tiles,), jnp.int32).at[starts].add(1, mode="drop")) - 1
    tile_ok = tile < ends[-1]
    col = (first_tile[group] + tile - starts[group])[:, None] * width + jnp.arange(width, dtype=jnp.int32)
    col_ok = tile_ok[:, None] & (col < columns)
    col = jnp.minimum(col, columns - 1)                                       # [tiles, width]
    row = r[group]                                                            # [tiles, count]
    values = lines.at(col[:, None, :], row_mass[row][:, :, None], row_cost[row][:, :, None])
    ok = col_ok[:, None, :] & (col[:, None, :] <= limit[row][:, :, None])
    values = jnp.where(ok, values, jnp.inf)                                   # [tiles, count, width]
    tile_best = jnp.min(values, axis=2)
    tile_col = jnp.min(jnp.where(values == tile_best[:, :, None], col[:, None, :], columns), axis=2)
    best = jax.ops.segment_min(tile_best, group, groups, indices_are_sorted=True)
    at_best = jnp.where(tile_ok[:, None] & (tile_best == best[group]), tile_col, columns)
    best_col = jax.ops.segment_min(at_best, group, groups, indices_are_sorted=True)
    found = jnp.where(best < jnp.inf, best_col, -1).astype(jnp.int32)        # [groups, count]
    return arg.at[r.reshape(-1)].set(found.reshape(-1))


def row_argmin(lines: Lines, row_mass: Array, row_cost: Array, limit: Array, levels: int) -> Array:
    """Leftmost argmin column of every row, int32 [R] (-1: no column <= limit[r]).

    Args:
      lines: the C columns (C >= 1).
      row_mass, row_cost: float64 [R]; row_mass non-decreasing.
      limit: int32 [R], the last valid column of each row, non-decreasing (may be < 0).
      levels: static, the number of passes (1 = dense: `dense_argmin`).
    """
    rows, columns = row_mass.shape[0], lines.intercept.shape[0]
    if levels == 1:
        return dense_argmin(lines, row_mass, row_cost, limit)
    size = padded_rows(rows)
    if size > rows:  # padding rows repeat the last row: same answer, monotonicity kept
        keep = jnp.minimum(jnp.arange(size), rows - 1)
        row_mass, row_cost, limit = row_mass[keep], row_cost[keep], limit[keep]
    factors = radices(size, levels)
    arg = jnp.full((size,), -1, jnp.int32)
    solved = 1  # rows solved so far = the groups of the next pass
    for level, radix in enumerate(factors):
        spacing = int(np.prod(factors[level + 1:], dtype=np.int64))
        if level == 0:
            arg = _search_pass(arg, lines, row_mass, row_cost, limit, 1, spacing * radix, spacing, 0,
                               radix, columns)
        else:
            width = int(min(columns, max(8, -(-columns // solved))))
            arg = _search_pass(arg, lines, row_mass, row_cost, limit, solved, spacing * radix,
                               spacing, 1, radix - 1, width)
        solved *= radix
    if not factors:  # a single row
        return dense_argmin(lines, row_mass, row_cost, limit)
    return arg[:rows]


def dense_argmin(lines: Lines, row_mass: Array, row_cost: Array, limit: Array) -> Array:
    """`row_argmin` over all (row, column) pairs at once (`dense_min`'s argmin)."""
    return dense_min(lines, row_mass, row_cost, limit)[1]


def _leftmost_min(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
    """Reducer of (value, column) pairs: the smaller value, on equal values the smaller column.

    A total order on pairs, so the reduction is associative and commutative: any reduction tree (CPU,
    GPU) returns the same pair, the leftmost minimum.
    """
    (left_value, left_col), (right_value, right_col) = left, right
    take_right = (right_value < left_value) | ((right_value == left_value) & (right_col < left_col))
    return (jnp.where(take_right, right_value, left_value),
            jnp.where(take_right, right_col, left_col))


def dense_min(lines: Lines, row_mass: Array, row_cost: Array, limit: Array) -> tuple[Array, Array]:
    """Row minima and their leftmost columns over all (row, column) pairs in one reduction pass.

    The values [R, C] are never stored: they are computed inside one variadic (value, column)
    reduction, so a dense layer is one kernel on an accelerator.

    Args:
      lines: the C columns (C >= 1).
      row_mass, row_cost: float64 [R].
      limit: int32 [R], the last valid column of each row (< C; may be < 0).

    Returns:
      (best float64 [R] -- the minimum, +inf where no column is valid; arg int32 [R] -- its leftmost
      column, -1 where no column is valid).
    """
    columns = lines.intercept.shape[0]
    values = lines.dense(row_mass, row_cost)
    cols = jax.lax.broadcasted_iota(jnp.int32, values.shape, 1)
    values = jnp.where(cols <= limit[:, None], values, jnp.inf)
    start = (jnp.array(jnp.inf, values.dtype), jnp.int32(columns))
    best, best_col = jax.lax.reduce((values, cols), start, _leftmost_min, (1,))
    return best, jnp.where(limit >= 0, best_col, -1).astype(jnp.int32)
