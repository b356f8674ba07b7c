"""Pallas (Triton) kernels for the GPU path of Mamba2's SSD, beside the pure-JAX `ssd.ssd_chunks`.

Three kernels replace the memory-bound parts of the XLA path (issue 7's profile: per 2048-token step
and layer of mamba2-1.3b, XLA materialises the decayed C B^T weights [Q, H, L, S] (67 MB), a
transposed copy of x, the float32 y_diag and y_off, and recomputes the inter-chunk chain per chunk):

  * `state_contributions_pallas` -- each chunk's state contribution (x * decay-to-end)^T B per
    (chunk, head), reading x and B from the conv output as laid out (an XLA dot over the token
    axis made XLA lay out the whole conv token-minor: four transposed float32 passes per layer);
  * `pass_states_pallas` -- the inter-chunk recurrence s_{q+1} = decay_q s_q + contrib_q, one pass
    over the chunks per block of state elements (each contribution read once, each entering state
    written once in the matmul dtype, the exits only when asked);
  * `chunk_scan_pallas` -- each chunk's output y = (intra-chunk decayed C B^T weights) x +
    exp(cum) C . entering + D x, computed per (chunk, head, block of L rows) with the weights
    built in registers from C, B, the cumulative log decay and dt (never in memory), written once
    in the compute dtype (what state-spaces' `_chunk_scan_fwd` computes).

All three compute every chunk from its own inputs and its entering state with the same operations
wherever the chunk sits in the group, so a resume on the chunk grid stays bitwise (one program per
chunk and head; the loops run in a fixed order). On a machine without a GPU they run in Pallas'
interpreter (the tests compare them there with the pure-JAX path). Block dimensions must be powers
of two for Triton: `supported` tells whether a shape qualifies.

Shape legend: see `ssd.py` (B, Q chunks, L chunk length, H heads, P head dim, G groups, N state).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .pallas_common import dot_precision, interpret, is_pow2
from .ssd import matmul_fn


Array = jax.Array


def supported(chunks: int, length: int, heads: int, head_dim: int, groups: int, state_size: int,
              d_inner: int) -> bool:
    """Whether the kernels take these shapes (power-of-two blocks, B and C on N-aligned channels)."""
    return (all(is_pow2(v) for v in (chunks, length, head_dim, state_size))
            and heads % groups == 0 and d_inner % state_size == 0 and length >= 16
            and head_dim >= 16 and state_size >= 16)


def _dot(a: Array, b: Array, precision, trans_b: bool = False) -> Array:
    """a [M, K] @ b [K, N] (b [N, K] with trans_b) with float32 accumulation."""
    contract = 1 if trans_b else 0
    return jax.lax.dot_general(a, b, (((1,), (contract,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- the chain


def _chain_kernel(*refs, chunks: int, length: int, want_exits: bool, emit_slots: int):
    cum_ref, state_ref, contrib_ref = refs[:3]
    slot_ref = refs[3] if emit_slots else None
    outs = refs[5:] if emit_slots else refs[3:]     # (the buffer input, aliased, is refs[4])
    entering_ref, final_ref = outs[0], outs[-1]
    exits_ref = outs[1] if want_exits else None
    emitted_ref = outs[-2] if emit_slots else None
    current = state_ref[...]
    for q in range(chunks):
        entering_ref[q, :] = current.astype(entering_ref.dtype)
        current = jnp.exp(cum_ref[q, length - 1]) * current + contrib_ref[q, :]
        if want_exits:
            exits_ref[q, :] = current
        if emit_slots:
            slot = slot_ref[q]
            exit_state = current

            @pl.when(slot < emit_slots)
            def _write():
                emitted_ref[slot, :] = exit_state
    final_ref[...] = current


def pass_states_pallas(state: Array, cum_t: Array, contrib: Array, entering_dtype,
                       want_exits: bool, block: int = 1024, emit: tuple[Array, Array] | None = None
                       ) -> tuple[Array, Array | None, Array, Array | None]:
    """`ssd.pass_states` as one kernel, each chunk's decay exp(cum_last) taken in the kernel.

    Args:
      state: float32[B, H, P, N]. cum_t: float32[B, Q, H, L] the within-chunk cumulative log decay
        (head-major, as the other kernels read it). contrib: float32[B, Q, H, P, N].
      entering_dtype: dtype of the entering states. want_exits: also return every chunk's exit.
      block: state elements per program (a power of two; clipped to P N).
      emit: None, or (buffer float32[B, K, H, P, N], slot int32[B, Q]): write the state after
        chunk q into buffer[b, slot[b, q]] where slot < K (K a power of two), in place -- the
        checkpoint emission of `chunking.write_emitted` without materialising every exit.

    Returns:
      (entering [B, Q, H, P, N], exits float32[B, Q, H, P, N] or None, final float32[B, H, P, N],
      the emission buffer with the emitted states written in, or None).
    """
    batch, chunks, heads, head_dim, size = contrib.shape
    length = cum_t.shape[-1]
    flat = head_dim * size
    block = min(block, flat)
    per_chunk = pl.BlockSpec((None, chunks, None, block), lambda b, h, i: (b, 0, h, i))
    per_state = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))
    out_shape = [jax.ShapeDtypeStruct((batch, chunks, heads, flat), entering_dtype)]
    out_specs = [per_chunk]
    if want_exits:
        out_shape.append(jax.ShapeDtypeStruct((batch, chunks, heads, flat), jnp.float32))
        out_specs.append(per_chunk)
    inputs = [cum_t, state.reshape(batch, heads, flat), contrib.reshape(batch, chunks, heads, flat)]
    in_specs = [pl.BlockSpec((None, chunks, None, length), lambda b, h, i: (b, 0, h, 0)),
                per_state, per_chunk]
    slots, aliases = 0, {}
    if emit is not None:
        buffer, slot = emit
        slots = buffer.shape[1]
        if slots & (slots - 1):
            raise ValueError(f"in-kernel emission needs a power-of-two slot count, got {slots}")
        per_slot = pl.BlockSpec((None, slots, None, block), lambda b, h, i: (b, 0, h, i))
        inputs += [slot.astype(jnp.int32), buffer.astype(jnp.float32).reshape(batch, slots, heads, flat)]
        in_specs += [pl.BlockSpec((None, chunks), lambda b, h, i: (b, 0)), per_slot]
        aliases = {4: len(out_shape)}
        out_shape.append(jax.ShapeDtypeStruct((batch, slots, heads, flat), jnp.float32))
        out_specs.append(per_slot)
    out_shape.append(jax.ShapeDtypeStruct((batch, heads, flat), jnp.float32))
    out_specs.append(per_state)
    outs = pl.pallas_call(
        functools.partial(_chain_kernel, chunks=chunks, length=length, want_exits=want_exits,
                          emit_slots=slots),
        out_shape=out_shape, grid=(batch, heads, flat // block),
        in_specs=in_specs, out_specs=out_specs, input_output_aliases=aliases,
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="ssd_pass_states",
    )(*inputs)
    shape = (batch, chunks, heads, head_dim, size)
    exits = outs[1].reshape(shape) if want_exits else None
    emitted = outs[-2].reshape(emit[0].shape) if emit is not None else None
    return outs[0].reshape(shape), exits, outs[-1].reshape(state.shape), emitted


# ----------------------------------------------------------------------------- the contributions


def _contrib_kernel(x_ref, b_ref, cum_ref, dt_ref, out_ref, *, length: int, matmul_dtype, precision):
    cum = cum_ref[...]                                                               # [L]
    to_end = jnp.exp(cum_ref[length - 1] - cum) * dt_ref[...]                        # [L]
    xw = (x_ref[...].astype(jnp.float32) * to_end[:, None]).astype(matmul_dtype)     # [L, P]
    out_ref[...] = jax.lax.dot_general(xw, b_ref[...].astype(matmul_dtype), (((0,), (0,)), ((), ())),
                                       precision=precision, preferred_element_type=jnp.float32)


def state_contributions_pallas(xbc: Array, cum_t: Array, dt_t: Array, *, heads: int, head_dim: int,
                               groups: int, state_size: int, matmul_dtype, num_warps: int = 4,
                               num_stages: int = 2) -> Array:
    """`ssd.state_contributions` as one kernel reading x and B straight from the conv output.

    Per (chunk, head): sum_s exp(cum_last - cum_s) dt_s x_s B_s^T = (x * to_end)^T B, one [P, L] x
    [L, N] matmul. Reading x in its natural [L, H P] layout matters: as an XLA dot the contraction
    over the token axis made XLA lay the whole conv out token-minor (a transpose of every conv pass).

    Args:
      xbc: [B, Q, L, Dc] the activated conv output (x | B | C). cum_t, dt_t: float32[B, Q, H, L]
        the within-chunk cumulative log decay and the step sizes, head-major.
      heads, head_dim, groups, state_size: H, P, G, N. matmul_dtype: operand dtype.
      num_warps, num_stages: Triton launch parameters.

    Returns:
      float32[B, Q, H, P, N] each chunk's contribution from a zero state.
    """
    batch, chunks, length, _ = xbc.shape
    per_group = heads // groups
    b_first = heads * head_dim // state_size
    kernel = functools.partial(_contrib_kernel, length=length, matmul_dtype=jnp.dtype(matmul_dtype),
                               precision=dot_precision(matmul_dtype))
    head_row = pl.BlockSpec((None, None, None, length), lambda bq, h: (bq // chunks, bq % chunks, h, 0))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((batch, chunks, heads, head_dim, state_size), jnp.float32),
        grid=(batch * chunks, heads),
        in_specs=[pl.BlockSpec((None, None, length, head_dim),
                               lambda bq, h: (bq // chunks, bq % chunks, 0, h)),
                  pl.BlockSpec((None, None, length, state_size),
                               lambda bq, h: (bq // chunks, bq % chunks, 0, b_first + h // per_group)),
                  head_row, head_row],
        out_specs=pl.BlockSpec((None, None, None, head_dim, state_size),
                               lambda bq, h: (bq // chunks, bq % chunks, h, 0, 0)),
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="ssd_state_contributions",
    )(xbc, xbc, cum_t, dt_t)


# ----------------------------------------------------------------------------- the chunk scan


def _scan_kernel(x_ref, b_ref, c_ref, cum_ref, dt_ref, entering_ref, d_ref, y_ref, *, block: int,
                 matmul_dtype, precision, shared_scores: bool):
    row_block = pl.program_id(2)
    start = pl.multiple_of(row_block * block, block)
    rows = pl.ds(start, block)
    c = c_ref[rows, :].astype(matmul_dtype)                                          # [BL, N]
    cum_rows = cum_ref[rows]                                                         # [BL]
    entering = entering_ref[...].astype(matmul_dtype)                                # [P, N]
    acc = _dot(c, entering, precision, trans_b=True) * jnp.exp(cum_rows)[:, None]    # [BL, P]
    row_ids = start + jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)

    def column_block(index, acc):
        first = pl.multiple_of(index * block, block)
        cols = pl.ds(first, block)
        if shared_scores:   # b_ref holds the group's C B^T [L, L], computed once for all its heads
            scores = b_ref[rows, cols]
        else:
            scores = _dot(c, b_ref[cols, :].astype(matmul_dtype), precision, trans_b=True)  # [BL, BS]
        col_ids = first + jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
        log_decay = jnp.where(row_ids >= col_ids, cum_rows[:, None] - cum_ref[cols][None, :],
                              -jnp.inf)
        weights = scores * jnp.exp(log_decay) * dt_ref[cols][None, :]
        return acc + _dot(weights.astype(matmul_dtype), x_ref[cols, :].astype(matmul_dtype),
                          precision)

    acc = jax.lax.fori_loop(0, row_block + 1, column_block, acc)
    skip = x_ref[rows, :].astype(jnp.float32) * d_ref[0]
    y_ref[...] = (acc + skip).astype(y_ref.dtype)


def chunk_scan_pallas(xbc: Array, cum_t: Array, dt_t: Array, entering: Array, d_skip: Array, *,
                      heads: int, head_dim: int, groups: int, state_size: int, out_dtype,
                      block: int = 64, num_warps: int = 4, num_stages: int = 2,
                      shared_scores: bool = False) -> Array:
    """Every chunk's SSD output with the D skip, from the conv output and the entering states.

    Args:
      xbc: [B, Q, L, Dc] the activated conv output (x | B | C channels, Dc = H P + 2 G N).
      cum_t: float32[B, Q, H, L] the within-chunk cumulative log decay (cumsum of dt A), head-major.
      dt_t: float32[B, Q, H, L] step sizes (0 on padded slots), head-major.
      entering: [B, Q, H, P, N] the state before each chunk (matmul dtype).
      d_skip: float32[H] the D skip. heads, head_dim, groups, state_size: H, P, G, N.
      out_dtype: dtype of y (the matmul operand dtype too). block: rows per program (<= L).
      num_warps, num_stages: Triton launch parameters.
      shared_scores: compute each group's C B^T [L, L] once (one batched XLA matmul, float32)
        and let its H/G heads read it, instead of every head recomputing its tiles in the kernel.

    Returns:
      y [B, Q, L, H P] in out_dtype: y_diag + y_off + D x for every slot (garbage on padding).
    """
    batch, chunks, length, _ = xbc.shape
    block = min(block, length)
    inner, per_group = heads * head_dim, heads // groups
    b_first, c_first = inner // state_size, inner // state_size + groups
    precision = dot_precision(out_dtype)

    def chunk_of(bq):
        return bq // chunks, bq % chunks

    def x_map(bq, h, i):
        return chunk_of(bq) + (0, h)

    def b_map(bq, h, i):
        return chunk_of(bq) + (0, b_first + h // per_group)

    def c_map(bq, h, i):
        return chunk_of(bq) + (0, c_first + h // per_group)

    def per_head_row(bq, h, i):
        return chunk_of(bq) + (h, 0)

    def state_map(bq, h, i):
        return chunk_of(bq) + (h, 0, 0)

    kernel = functools.partial(_scan_kernel, block=block, matmul_dtype=jnp.dtype(out_dtype),
                               precision=precision, shared_scores=shared_scores)
    second, second_spec = xbc, pl.BlockSpec((None, None, length, state_size), b_map)
    if shared_scores:
        split = (inner, inner + groups * state_size, inner + 2 * groups * state_size)
        b = xbc[..., split[0]:split[1]].reshape(batch, chunks, length, groups, state_size)
        c = xbc[..., split[1]:split[2]].reshape(batch, chunks, length, groups, state_size)
        second = matmul_fn(out_dtype)("bqlgn,bqsgn->bqgls", c, b)                  # [B,Q,G,L,S]
        second_spec = pl.BlockSpec((None, None, None, length, length),
                                   lambda bq, h, i: chunk_of(bq) + (h // per_group, 0, 0))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((batch, chunks, length, inner), out_dtype),
        grid=(batch * chunks, heads, length // block),
        in_specs=[pl.BlockSpec((None, None, length, head_dim), x_map),
                  second_spec,
                  pl.BlockSpec((None, None, length, state_size), c_map),
                  pl.BlockSpec((None, None, None, length), per_head_row),
                  pl.BlockSpec((None, None, None, length), per_head_row),
                  pl.BlockSpec((None, None, None, head_dim, state_size), state_map),
                  pl.BlockSpec((1,), lambda bq, h, i: (h,))],
        out_specs=pl.BlockSpec((None, None, block, head_dim),
                               lambda bq, h, i: chunk_of(bq) + (i, h)),
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        name="ssd_chunk_scan",
    )(xbc, second, xbc, cum_t, dt_t, entering, d_skip.astype(jnp.float32))


def ssd_chunks_pallas(xbc: Array, dt_t: Array, cum_t: Array, state: Array, d_skip: Array, *,
                      heads: int, head_dim: int, groups: int, state_size: int, matmul_dtype,
                      want_exits: bool, emit: tuple[Array, Array] | None = None
                      ) -> tuple[Array, Array | None, Array, Array | None]:
    """Q chunks of SSD with the kernels: the GPU counterpart of `ssd.ssd_chunks` plus the D skip.

    Three kernels: the chunk contributions, the chain and the chunk outputs (above). Every kernel
    reads the conv output in its natural layout and dt / cum head-major (`time_steps` makes both).

    Args:
      xbc: [B, Q, L, Dc] the activated conv output (x | B | C). dt_t: float32[B, Q, H, L] step
        sizes (0 on padded slots). cum_t: float32[B, Q, H, L] their cumulative sum times A along
        each chunk. state: float32[B, H, P, N]. d_skip: float32[H].
      heads, head_dim, groups, state_size: H, P, G, N. matmul_dtype: operand dtype (and y's).
      want_exits: return every chunk's exit state.
      emit: None, or (buffer float32[B, K, H, P, N], slot int32[B, Q]) for the chain kernel to
        write the emitted exit states into (`pass_states_pallas`).

    Returns:
      (y [B, Q, L, H P] in matmul_dtype with the D skip, exits float32[B, Q, H, P, N] or None,
      final float32[B, H, P, N], the emission buffer or None).
    """
    contrib = state_contributions_pallas(xbc, cum_t, dt_t, heads=heads, head_dim=head_dim,
                                         groups=groups, state_size=state_size,
                                         matmul_dtype=matmul_dtype)
    entering, exits, final, emitted = pass_states_pallas(state, cum_t, contrib, matmul_dtype,
                                                         want_exits, emit=emit)
    y = chunk_scan_pallas(xbc, cum_t, dt_t, entering, d_skip, heads=heads, head_dim=head_dim,
                          groups=groups, state_size=state_size, out_dtype=matmul_dtype,
                          num_stages=3)
    return y, exits, final, emitted


def time_steps(dt: Array, a: Array) -> tuple[Array, Array]:
    """XLA's (dt_t, cum_t) [B, Q, H, L] from dt float32[B, Q, L, H] and A [H]: the kernels' inputs
    where `mixer_pallas.time_steps_pallas` does not apply."""
    return jnp.swapaxes(dt, 2, 3), jnp.swapaxes(jnp.cumsum(dt * a, axis=2), 2, 3)
