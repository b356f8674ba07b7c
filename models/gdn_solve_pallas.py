"""A Pallas (Triton) kernel for the Gated DeltaNet's UT solve on the GPU: X = (I + L)^-1 R.

`gated_deltanet._delta_rule_blocks` needs, for every sub-chunk of every row and head, the unit
lower-triangular system (I + L) X = R with L [c, c] strictly lower and R = [beta v | beta exp(G) k]
[c, Dv + Dk]. In XLA (`unit_lower_inverse`, "doubling") that is log2(c) levels of batched matmuls
plus the gathers and concatenations between them -- about 35 kernels per GDN layer and step, more
than half of the kernels a short prefill call launches. Here it is one kernel.

Each program owns one matrix (a row, head and sub-chunk) and `block_v` columns of R, and solves by
blocked forward substitution in row blocks of `block` rows, in the fixed order 0, 1, ...:
    A_i = R_i - L_i0 X_0 - L_i1 X_1 - ... - L_i,i-1 X_i-1          (dots summed in that order)
    X_i = (I + N)^-1 A_i,  N = L_ii strictly lower, nilpotent (N^block = 0), so
    (I + N)^-1 = (I - N)(I + N^2)(I + N^4) ... (I + N^(block/2))   (log2(block) - 1 squarings)
The solved row blocks stay in registers ([c, block_v] float32); the columns of X never mix, so the
column blocks are independent programs.

Exactness: a program's numbers depend only on its own matrix and column block, computed with the
same operations in the same order whatever the grid, so a sub-chunk's solve does not depend on
where it sits in a call (resumes on the chunk grid stay bitwise). The numbers differ from the
doubling's by rounding only. `precision` as in `gdn_pallas`: DEFAULT is TF32 on the tensor cores
(bf16 models), HIGHEST IEEE float32.

Off the GPU the kernel runs in Pallas' interpreter (the tests). Triton needs power-of-two blocks of
at least 16: `supported` says whether a shape qualifies.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .pallas_common import _largest_pow2_divisor, dot_f32, interpret, is_pow2

Array = jax.Array

BLOCK = 32       # rows per forward-substitution block (the nilpotent inverse's size)
BLOCK_V = 64     # columns of R per program. H200 (jax 0.11.2, 64 systems of 256 x 256, TF32):
                 # block 32 / 64 columns 184 us, 32 / 32 344 us, 16 / 16 406 us; XLA's doubling
                 # and product 211 us (one jitted call each, median of 20)


def _fits(value: int) -> bool:
    return value >= 16 and is_pow2(value)


def _column_block(width: int, block_v: int) -> int:
    """The largest power of two <= block_v dividing width (the columns one program solves)."""
    return _largest_pow2_divisor(width, block_v)


def supported(size: int, width: int, block: int = BLOCK, block_v: int = BLOCK_V) -> bool:
    """Whether the kernel takes a [size, size] system with `width` right-hand columns: size a power
    of two >= 16, and the row block (clipped to size) and column block (`block_v` cut to a power of
    two dividing width) powers of two >= 16."""
    return _fits(size) and _fits(min(block, size)) and _fits(_column_block(width, block_v))


def _kernel(lower_ref, rhs_ref, out_ref, *, size: int, block: int, precision):
    strict = (jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
              > jax.lax.broadcasted_iota(jnp.int32, (block, block), 1))
    solved = []
    for i in range(size // block):
        rows = pl.ds(i * block, block)
        acc = rhs_ref[rows, :]                                                # [block, bv]
        for j in range(i):                                                    # fixed order
            acc = acc - dot_f32(lower_ref[rows, pl.ds(j * block, block)], solved[j], precision)
        power = jnp.where(strict, lower_ref[rows, rows], 0.0)                 # N, nilpotent
        x = acc - dot_f32(power, acc, precision)                                 # (I - N) A
        span = 2
        while span < block:                                                   # (I + N^span)
            power = dot_f32(power, power, precision)
            x = x + dot_f32(power, x, precision)
            span *= 2
        out_ref[rows, :] = x
        solved.append(x)


def unit_lower_solve_pallas(lower: Array, rhs: Array, precision, *, block: int = BLOCK,
                            block_v: int = BLOCK_V) -> Array:
    """(I + lower)^-1 rhs for strictly lower-triangular `lower`, by blocked forward substitution.

    Args:
      lower: f32[..., n, n]; only its strictly lower triangle is read inside the diagonal blocks,
        and the blocks below them are read whole (they lie below the diagonal).
      rhs: f32[..., n, w] (the same leading dims).
      precision: of the matmuls (`gated_deltanet.rule_precision`).
      block: rows per substitution block (clipped to n); block_v: right-hand columns per program
        (cut to the largest power of two dividing w); `supported` must hold.

    Returns:
      f32[..., n, w].
    """
    size, width = lower.shape[-1], rhs.shape[-1]
    lead = lower.shape[:-2]
    if rhs.shape[:-1] != lead + (size,) or lower.shape[-2] != size:
        raise ValueError(f"lower must be [..., n, n] and rhs [..., n, w] with the same leading dims, "
                         f"got {lower.shape} and {rhs.shape}")
    if not supported(size, width, block, block_v):
        raise ValueError(f"unit_lower_solve_pallas needs a power-of-two n >= 16 and blocks of >= 16 "
                         f"(`supported`), got n={size}, w={width}, block={block}, block_v={block_v}")
    block, block_v = min(block, size), _column_block(width, block_v)
    count = math.prod(lead)
    kernel = functools.partial(_kernel, size=size, block=block, precision=precision)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((count, size, width), jnp.float32),
        grid=(count, width // block_v),
        in_specs=[pl.BlockSpec((None, size, size), lambda m, j: (m, 0, 0)),
                  pl.BlockSpec((None, size, block_v), lambda m, j: (m, 0, j))],
        out_specs=pl.BlockSpec((None, size, block_v), lambda m, j: (m, 0, j)),
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="gdn_unit_lower_solve",
    )(lower.reshape(count, size, size).astype(jnp.float32),
      rhs.reshape(count, size, width).astype(jnp.float32))
    return out.reshape(lead + (size, width))
