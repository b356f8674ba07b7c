"""A Pallas (Triton) kernel for the GPU path of `attention.attend`: the blocked read without host syncs.

The XLA blocked read (`attention._attend_blocked`) walks key blocks 0 .. (last position) // Bk in a
`lax.while_loop` whose trip count depends on the data. On a GPU every iteration of such a loop copies
its predicate to the host and waits for it (issue 7's profile: a deep, short resumed suffix of
qwen3.5-0.8b spends ~0.15 ms per iteration, 6 attention layers x 8 blocks per step). Here the same
online softmax runs inside one kernel: each program owns one query head and `block_q` query rows,
reads its rows' positions and loops over key blocks 0 .. max(position) // block_k on the device.

Exactness: a program visits key blocks in the fixed order 0, 1, ...; a block wholly beyond a row's
position is an exact no-op for that row (scores -inf, probabilities 0, V zeroed past the tile's last
position, the running max unchanged), and every row's dot products do not depend on the other rows of
its tile. So a row's output depends only on its query, its position and the buffer, not on where it
sits in the call: a resume on the chunk grid stays bitwise (same kernel, same blocks). The numbers
differ from the XLA path by rounding (probabilities enter the V product in the compute dtype, as in
the XLA path, but the running sums are per key block of `block_k`).

On a machine without a GPU the kernel runs in Pallas' interpreter (the tests compare it there with
the XLA path). Shapes: B batch, T query slots, Hkv KV heads, G query heads per KV head, D head dim,
S the buffer length (a multiple of `block_k`), R stacked layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .pallas_common import interpret

Array = jax.Array


def _pow2_at_least(value: int, floor: int) -> int:
    size = floor
    while size < value:
        size *= 2
    return size


def supported(head_dim: int, max_length: int, block_k: int) -> bool:
    """Whether the kernel takes these shapes (Triton blocks are powers of two, dots need >= 16)."""
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_k >= 16
            and block_k & (block_k - 1) == 0 and max_length % block_k == 0)


def _kernel(layer_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, *, group: int, block_k: int):
    b = pl.program_id(0)
    head = pl.program_id(1)
    kv_head = head // group
    layer = layer_ref[0]
    positions = pos_ref[...]                                               # int32[bq]
    last = jnp.max(positions)
    q = q_ref[...]                                                         # [bq, D]
    rows, dim = q.shape
    scale = dim ** -0.5

    def body(index, carry):
        top, total, acc = carry
        start = pl.multiple_of(index * block_k, block_k)
        keys = k_ref[layer, b, pl.ds(start, block_k), kv_head, :].astype(q.dtype)    # [bk, D]
        values = v_ref[layer, b, pl.ds(start, block_k), kv_head, :].astype(q.dtype)
        scores = jax.lax.dot_general(q, keys, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * scale       # [bq, bk]
        key_pos = start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
        scores = jnp.where(key_pos <= positions[:, None], scores, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        safe_top = jnp.where(new_top > -jnp.inf, new_top, 0.0)
        rescale = jnp.exp(jnp.where(top > -jnp.inf, top - safe_top, -jnp.inf))
        weights = jnp.exp(scores - safe_top[:, None])
        total = total * rescale + jnp.sum(weights, axis=1)
        value_pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_k, dim), 0)
        values = jnp.where(value_pos <= last, values, jnp.zeros_like(values))
        acc = acc * rescale[:, None] + jax.lax.dot_general(
            weights.astype(q.dtype), values, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)
        return new_top, total, acc

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, dim), jnp.float32))
    # blocks 0 .. last // block_k; none for a block of rows that all read nothing (last = -1)
    _, total, acc = jax.lax.fori_loop(0, (last + block_k) // block_k, body, init)
    o_ref[...] = (acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[:, None]).astype(o_ref.dtype)


def attend_pallas(q: Array, k: Array, v: Array, positions: Array, layer: Array | None = None, *,
                  block_k: int = 64, block_q: int = 64) -> Array:
    """Causal attention of q against a KV buffer, keys at positions <= each query's own.

    Args:
      q: [B, T, Hkv, G, D] (grouped query heads, compute dtype).
      k, v: the buffer, [B, S, Hkv, D], or [R, B, S, Hkv, D] read at `layer` (int32[]).
      positions: int32[B, T], the absolute position of every query slot; -1 for a slot that
        reads nothing (its row is zeros; a block of such rows runs no loop step at all). Padding
        slots may carry -1 or any position in 0..S-1 (their rows are garbage either way).
      block_k: keys per loop step (power of two >= 16, divides S). block_q: query rows per program
        (clipped to a power of two >= 16 covering T).

    Returns:
      float32-accurate attention output [B, T, Hkv, G, D] in q.dtype.
    """
    batch, length, kv_heads, group, dim = q.shape
    if layer is None:
        k, v = k[None], v[None]
        layer = jnp.zeros((), jnp.int32)
    buffer_length = k.shape[2]
    if not supported(dim, buffer_length, block_k):
        raise ValueError(f"attend_pallas needs a power-of-two head_dim >= 16 and block_k dividing the "
                         f"buffer length, got head_dim {dim}, block_k {block_k}, S {buffer_length}")
    block_q = min(block_q, _pow2_at_least(length, 16))
    padded = -(-length // block_q) * block_q
    heads = kv_heads * group
    q_heads = q.reshape(batch, length, heads, dim)
    if padded != length:
        q_heads = jnp.pad(q_heads, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
        positions = jnp.pad(positions, ((0, 0), (0, padded - length)), mode="edge")
    kernel = functools.partial(_kernel, group=group, block_k=block_k)
    per_rows = pl.BlockSpec((None, block_q, None, dim), lambda b, h, i: (b, i, h, 0))
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((batch, padded, heads, dim), q.dtype),
        grid=(batch, heads, padded // block_q),
        in_specs=[pl.BlockSpec((1,), lambda b, h, i: (0,)),
                  pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
                  per_rows, pl.no_block_spec, pl.no_block_spec],
        out_specs=per_rows, interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=8 if dim >= 128 else 4, num_stages=2),
        name="attend_blocked",
    )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), positions.astype(jnp.int32), q_heads, k, v)
    return out[:, :length].reshape(batch, length, kv_heads, group, dim)
