"""A Pallas (Triton) kernel for the GPU path of the Gated DeltaNet state recursion (`gated_deltanet`).

After the batched intra-chunk work, `gated_deltanet._delta_rule_blocks` passes the state through the
n = T / c sub-chunks in order, two small matmuls per step:
    V'_i = U_i - W_i S_i,   S_{i+1} = keep_i ? e_i S_i + K_i^T V'_i : S_i
(e_i the sub-chunk's end decay, K_i its keys decayed to its end). As an XLA `lax.scan` every step is
a few separate kernels with a launch (and on a GPU a loop-condition round trip) each. Here the whole
recursion is one kernel: each program owns one (row b, head h, block of `block_v` value columns),
keeps its [Dk, block_v] slice of the state in registers, and loops over the n sub-chunks on the
device (`lax.fori_loop`), writing the entering state and V' slices as it goes. The value columns of
S never mix (S' columns depend on the same S columns only), so the blocks over Dv are independent.
A sub-chunk's c rows are read in pieces of `block_c` (a [c, Dk] float32 tile at c = 256, Dk = 128
would not fit shared memory): V' rows of a piece need only S, and the pieces' K^T V' contributions
are summed in the fixed order 0, 1, ... before S' = e S + sum.

Shapes: n sub-chunks, B batch rows, H value heads, c sub-chunk length, Dk / Dv key / value head
dims; everything float32.

Exactness: a program's numbers depend only on its own inputs (its row, head and column block of the
state and of every sub-chunk's U, W, K, decay and keep), visited in the fixed order 0 .. n-1 with
the same operations at every step; a sub-chunk with keep false leaves the state bit for bit (an
explicit select). So a sub-chunk's results do not depend on where it sits in the call, and a resume
on the chunk grid stays bitwise (same kernel, same blocks). The numbers differ from the XLA scan by
rounding only (other matmul blocking and summation order; `precision` HIGHEST is IEEE float32 in
Triton, DEFAULT / HIGH TF32, as in XLA's GPU matmuls).

Speed (H200, jax 0.11.2; B = 1, H = 16, Dk = Dv = 128): with `precision` DEFAULT (TF32, bf16
models) the kernel beat the XLA scan (0.08 vs 0.12 ms at n = 4, c = 256; 0.17 vs 0.57 ms at n = 32,
c = 64); with HIGHEST (IEEE float32 dots on the CUDA cores, float32 models) it was ~11x slower
(1.55 vs 0.14 ms at n = 4, c = 256).

Emission (`exits`): a prefill that emits checkpoints passes the layer-stacked checkpoint buffers
[B, K, R, H, Dk, Dv] (aliased to an output), the slot of each of the call's G chunks and the layer's
index R; the kernel then loops over chunks and, after a chunk's sub-chunks, writes its state slice
to the chunk's slot where it is emitted. The bytes are those of the state the next sub-chunk starts
from, so emitted checkpoints are bitwise the states a call stopping there ends with.

On a machine without a GPU the kernel runs in Pallas' interpreter (the tests compare it there with
the XLA scan). Block dimensions must be powers of two >= 16 for Triton: `supported` tells whether a
shape qualifies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .pallas_common import dot_f32, interpret

Array = jax.Array

BLOCK_C = 64     # sub-chunk rows per piece: [64, 128] float32 tiles of W and K
BLOCK_V = 16     # value columns per program: a [128, 16] float32 state slice in registers; 16 beat
                 # 32 on an H200 (TF32, B = 1, H = 16, Dk = Dv = 128: more programs in flight)


def _pow2_at_least_16(value: int) -> bool:
    return value >= 16 and value & (value - 1) == 0


def supported(sub_chunk: int, head_k_dim: int, head_v_dim: int) -> bool:
    """Whether the kernel takes these shapes (Triton blocks are powers of two, dots need >= 16)."""
    return all(_pow2_at_least_16(v) for v in (sub_chunk, head_k_dim, head_v_dim))


def _kernel(end_ref, keep_ref, state_ref, u_ref, w_ref, k_ref, *refs, steps: int, sub_chunk: int,
            block_c: int, block_v: int, precision, exits: tuple[int, int] | None):
    if exits is None:
        final_ref, entering_ref, v_new_ref = refs
    else:   # slot int32[B, G], layer int32[1], the buffers (input, aliased to the last output)
        slot_ref, layer_ref, _, final_ref, entering_ref, v_new_ref, exits_ref = refs
    b = pl.program_id(0)
    h = pl.program_id(1)
    cols = pl.ds(pl.multiple_of(pl.program_id(2) * block_v, block_v), block_v)

    def step(i, s):                                                          # s: [Dk, bv]
        entering_ref[i, b, h, :, cols] = s
        update = None
        for piece in range(sub_chunk // block_c):                           # fixed order
            rows = pl.ds(piece * block_c, block_c)
            v_new = u_ref[i, b, h, rows, cols] - dot_f32(w_ref[i, b, h, rows, :], s, precision)
            v_new_ref[i, b, h, rows, cols] = v_new                          # [bc, bv]
            part = dot_f32(k_ref[i, b, h, rows, :], v_new, precision, contract_a=0)    # [Dk, bv]
            update = part if update is None else update + part
        s_new = end_ref[i, b, h] * s + update
        return jnp.where(keep_ref[i, b] != 0, s_new, s)

    if exits is None:
        final_ref[...] = jax.lax.fori_loop(0, steps, step, state_ref[...])
        return
    subs, slots = exits

    def chunk(g, s):                        # the chunk's sub-chunks, then its exit where emitted
        s = jax.lax.fori_loop(0, subs, lambda j, s: step(g * subs + j, s), s)
        target = slot_ref[b, g]

        @pl.when(target < slots)
        def _():
            exits_ref[b, target, layer_ref[0], h, :, cols] = s

        return s

    final_ref[...] = jax.lax.fori_loop(0, steps // subs, chunk, state_ref[...])


def delta_recurrence_pallas(u: Array, w: Array, k_to_end: Array, end_decay: Array, keep: Array,
                            state: Array, precision, *, block_v: int = BLOCK_V,
                            block_c: int = BLOCK_C, exits: tuple | None = None) -> tuple:
    """The state recursion of `gated_deltanet._delta_rule_blocks` as one kernel (same semantics).

    Args:
      u: f32[n, B, H, c, Dv].  w, k_to_end: f32[n, B, H, c, Dk].  end_decay: f32[n, B, H, 1, 1].
      keep: bool[n, B, 1, 1, 1], sub-chunks that update the state (false: the state passes bitwise).
      state: f32[B, H, Dk, Dv], the state before sub-chunk 0.
      precision: of the matmuls (`gated_deltanet.rule_precision`).
      block_v: value columns per program (clipped to Dv).  block_c: sub-chunk rows per piece
        (clipped to c). Both powers of two >= 16 dividing Dv, c.
      exits: None, or (buffers f32[B, K, R, H, Dk, Dv], slot int32[B, G], layer int32 scalar): the
        n sub-chunks form G chunks of n / G; the state after chunk g of row b is written to
        buffers[b, slot[b, g], layer] where slot[b, g] < K (the in-place emission of a layer-stacked
        prefill: `sparse_prefix.chunking.write_emitted` semantics, no other byte of the buffers is
        touched; the buffers are aliased to the last output).

    Returns:
      (final state f32[B, H, Dk, Dv], entering f32[n, B, H, Dk, Dv] (entering[i]: the state before
      sub-chunk i), v_new f32[n, B, H, c, Dv]), and the written buffers last when `exits` is given.
    """
    steps, batch, heads, sub_chunk, dv = u.shape
    dk = w.shape[-1]
    if not supported(sub_chunk, dk, dv):
        raise ValueError(f"delta_recurrence_pallas needs power-of-two sub_chunk, head_k_dim and "
                         f"head_v_dim >= 16, got {sub_chunk}, {dk}, {dv}")
    block_v, block_c = min(block_v, dv), min(block_c, sub_chunk)
    if not (_pow2_at_least_16(block_v) and _pow2_at_least_16(block_c)):
        raise ValueError(f"block_v and block_c must be powers of two >= 16, got {block_v}, {block_c}")
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((batch, heads, dk, dv), f32),
                 jax.ShapeDtypeStruct((steps, batch, heads, dk, dv), f32),
                 jax.ShapeDtypeStruct((steps, batch, heads, sub_chunk, dv), f32)]
    per_state = pl.BlockSpec((None, None, dk, block_v), lambda b, h, j: (b, h, 0, j))
    in_specs = [pl.no_block_spec, pl.no_block_spec, per_state,
                pl.no_block_spec, pl.no_block_spec, pl.no_block_spec]
    out_specs = [per_state, pl.no_block_spec, pl.no_block_spec]
    operands = [end_decay.reshape(steps, batch, heads).astype(f32),
                keep.reshape(steps, batch).astype(jnp.int32),
                state.astype(f32), u.astype(f32), w.astype(f32), k_to_end.astype(f32)]
    aliases, static_exits = {}, None
    if exits is not None:
        buffers, slot, layer = exits
        groups = slot.shape[1]
        if (buffers.ndim != 6 or buffers.shape[0] != batch or buffers.shape[3:] != (heads, dk, dv)
                or buffers.dtype != f32 or slot.shape[0] != batch or steps % groups):
            raise ValueError(f"exits needs f32 buffers [B={batch}, K, R, {heads}, {dk}, {dv}] and a "
                             f"slot [B, G] with G dividing the {steps} sub-chunks, got "
                             f"{buffers.dtype}{list(buffers.shape)} and slot {list(slot.shape)}")
        static_exits = (steps // groups, buffers.shape[1])
        in_specs += [pl.no_block_spec] * 3
        out_specs.append(pl.no_block_spec)
        out_shape.append(jax.ShapeDtypeStruct(buffers.shape, f32))
        operands += [slot.astype(jnp.int32), jnp.reshape(layer, (1,)).astype(jnp.int32), buffers]
        aliases = {len(operands) - 1: len(out_shape) - 1}
    kernel = functools.partial(_kernel, steps=steps, sub_chunk=sub_chunk, block_c=block_c,
                               block_v=block_v, precision=precision, exits=static_exits)
    return tuple(pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, heads, dv // block_v),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases=aliases,
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="gdn_delta_recurrence",
    )(*operands))
