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

Parts (`parts` = P > 1, `AttentionConfig.key_parts`): one program walking all of a deep row's key
blocks is latency-bound when a call has few query blocks (qwen3.5-0.8b's one-chunk suffix: 8 heads x
4 query blocks = 32 programs on an H200's 132 SMs, each looping d / 64 times at depth d). So the key
blocks are dealt by index modulo P: program (.., p) runs the online softmax over blocks p, p + P,
p + 2P, ... and writes its float32 (max, sum, accumulator); a second kernel (`_merge_kernel`)
combines the P parts in the order 0 .. P - 1. Which blocks go to which part depends only on the
block's absolute index and a part that saw no key of a row weighs exactly 0 for it, so a row's
output still depends only on its query, its position and the buffer -- for a fixed P (another P
sums in another order). On an H200 P = 4 reads one deep chunk 3.7x faster but costs ~5% of a
full qwen3.5-0.8b prefill, so models default to P = 1 (BENCHMARKS.md, ninth session).

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


def default_stages(block_k: int, block_q: int, dim: int, itemsize: int = 2,
                   shared_bytes: int = 232_448) -> int:
    """Triton pipelining depth for the read: 3 where 3 stages of K and V tiles plus the query tile
    fit `shared_bytes` (227 KiB per block on an H100/H200: head_dim 256, block_k 64 just fits),
    else 2, else 1. On an H200 3 stages cut the reads of an 8192-token qwen3.5-0.8b prefill by
    8% against 2 (BENCHMARKS.md, ninth session)."""
    query = block_q * dim * itemsize
    per_stage = 2 * block_k * dim * itemsize
    for stages in (3, 2):
        if stages * per_stage + query <= shared_bytes:
            return stages
    return 1


def _shared_bytes() -> int:
    """Shared memory a Triton program may take on the default device (227 KiB from compute
    capability 9.0 on, 163 KiB on 8.0, 99 KiB otherwise; off the GPU the interpreter ignores it)."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    try:
        major, minor = (int(part) for part in str(capability).split(".")[:2])
    except ValueError:
        return 232_448
    if major >= 9:
        return 232_448
    return 166_912 if (major, minor) == (8, 0) else 101_376


def supported(head_dim: int, max_length: int, block_k: int) -> bool:
    """Whether the kernel takes these shapes (Triton blocks are powers of two, dots need >= 16)."""
    return (head_dim >= 16 and head_dim & (head_dim - 1) == 0 and block_k >= 16
            and block_k & (block_k - 1) == 0 and max_length % block_k == 0)


def _kernel(layer_ref, pos_ref, q_ref, k_ref, v_ref, *out_refs, group: int, block_k: int,
            parts: int):
    """One (row, head, query block[, part]) program: the online softmax over the key blocks
    part, part + P, part + 2 P, ... up to the block's deepest row (every block when P = 1).

    With P = 1 it writes the normalised output [bq, D]; with P > 1 the part's (max [bq], sum [bq],
    accumulator [bq, D]) in float32 for `_merge_kernel` (a part with no block to visit writes the
    empty softmax: max -inf, sum 0, accumulator 0)."""
    b = pl.program_id(0)
    head = pl.program_id(1)
    part = pl.program_id(3) if parts > 1 else 0
    kv_head = head // group
    layer = layer_ref[0]
    positions = pos_ref[...]                                               # int32[bq]
    last = jnp.max(positions)
    q = q_ref[...]                                                         # [bq, D]
    rows, dim = q.shape
    scale = dim ** -0.5

    def body(step, carry):
        top, total, acc = carry
        start = pl.multiple_of((part + step * parts) * block_k, block_k)
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
    # blocks part, part + P, ... below (last + block_k) // block_k; none for a block of rows that
    # all read nothing (last = -1)
    blocks = (last + block_k) // block_k
    top, total, acc = jax.lax.fori_loop(0, jnp.maximum(blocks - part + parts - 1, 0) // parts,
                                        body, init)
    if parts == 1:
        out_refs[0][...] = (acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[:, None]
                            ).astype(out_refs[0].dtype)
    else:
        top_ref, total_ref, acc_ref = out_refs
        top_ref[...] = top
        total_ref[...] = total
        acc_ref[...] = acc


def _merge_kernel(top_ref, total_ref, acc_ref, o_ref, *, parts: int, block_q: int):
    """One (row, head, query block) program: the P parts' softmaxes of its rows as one, combined
    in the fixed order 0, 1, ..., P - 1. A part that saw no key of a row (max -inf) weighs exactly
    0 for it, so the merge depends only on the row's own keys. Its own kernel (not XLA ops) so that
    every call runs the same code per row, whatever XLA would fuse around it."""
    b = pl.program_id(0)
    head = pl.program_id(1)
    rows = pl.ds(pl.program_id(2) * block_q, block_q)
    tops = [top_ref[b, part, head, rows] for part in range(parts)]          # [bq] each
    best = tops[0]
    for top in tops[1:]:
        best = jnp.maximum(best, top)                                      # exact
    safe = jnp.where(best > -jnp.inf, best, 0.0)
    total = acc = None
    for part, top in enumerate(tops):
        weight = jnp.exp(jnp.where(top > -jnp.inf, top - safe, -jnp.inf))
        part_total = total_ref[b, part, head, rows] * weight
        part_acc = acc_ref[b, part, rows, head, :] * weight[:, None]       # [bq, D]
        total = part_total if total is None else total + part_total
        acc = part_acc if acc is None else acc + part_acc
    o_ref[...] = (acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[:, None]).astype(o_ref.dtype)


def attend_pallas(q: Array, k: Array, v: Array, positions: Array, layer: Array | None = None, *,
                  block_k: int = 64, block_q: int = 64, parts: int = 1, num_warps: int = 4,
                  num_stages: int | None = None) -> Array:
    """Causal attention of q against a KV buffer, keys at positions <= each query's own.

    Args:
      q: [B, T, Hkv, G, D] (grouped query heads, compute dtype).
      k, v: the buffer, [B, S, Hkv, D], or [R, B, S, Hkv, D] read at `layer` (int32[]).
      positions: int32[B, T], the absolute position of every query slot; -1 for a slot that
        reads nothing (its row is zeros; a block of such rows runs no loop step at all). Padding
        slots may carry -1 or any position in 0..S-1 (their rows are garbage either way).
      block_k: keys per loop step (power of two >= 16, divides S). block_q: query rows per program
        (clipped to a power of two >= 16 covering T).
      parts: P, the key blocks split by block index modulo P over P programs per query block,
        merged in a fixed order (module docstring); 1: one program walks all of a row's keys.
      num_warps: Triton warps per program. num_stages: Triton's software pipelining depth (None:
        `default_stages` for this device's shared memory). On an H200 at qwen3.5-0.8b's shapes, 4
        warps and 3 stages beat 8 warps and 2 stages on both short deep reads and full prefills
        (`experiments/bench_attention.py`); neither changes a bit of the output.

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
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"attend_pallas parts must be an int >= 1, got {parts!r}")
    block_q = min(block_q, _pow2_at_least(length, 16))
    padded = -(-length // block_q) * block_q
    heads = kv_heads * group
    q_heads = q.reshape(batch, length, heads, dim)
    if padded != length:
        q_heads = jnp.pad(q_heads, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
        positions = jnp.pad(positions, ((0, 0), (0, padded - length)), mode="edge")
    kernel = functools.partial(_kernel, group=group, block_k=block_k, parts=parts)
    if num_stages is None:
        num_stages = default_stages(block_k, block_q, dim, max(q.dtype.itemsize, k.dtype.itemsize),
                                    _shared_bytes())
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    args = (jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)), positions.astype(jnp.int32), q_heads, k, v)
    if parts == 1:
        per_rows = pl.BlockSpec((None, block_q, None, dim), lambda b, h, i: (b, i, h, 0))
        out = pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((batch, padded, heads, dim), q.dtype),
            grid=(batch, heads, padded // block_q),
            in_specs=[pl.BlockSpec((1,), lambda b, h, i: (0,)),
                      pl.BlockSpec((None, block_q), lambda b, h, i: (b, i)),
                      per_rows, pl.no_block_spec, pl.no_block_spec],
            out_specs=per_rows, interpret=interpret(), compiler_params=params,
            name="attend_blocked",
        )(*args)
    else:
        stats = jax.ShapeDtypeStruct((batch, parts, heads, padded), jnp.float32)
        stats_spec = pl.BlockSpec((None, None, None, block_q), lambda b, h, i, p: (b, p, h, i))
        top, total, acc = pl.pallas_call(
            kernel,
            out_shape=(stats, stats,
                       jax.ShapeDtypeStruct((batch, parts, padded, heads, dim), jnp.float32)),
            grid=(batch, heads, padded // block_q, parts),
            in_specs=[pl.BlockSpec((1,), lambda b, h, i, p: (0,)),
                      pl.BlockSpec((None, block_q), lambda b, h, i, p: (b, i)),
                      pl.BlockSpec((None, block_q, None, dim), lambda b, h, i, p: (b, i, h, 0)),
                      pl.no_block_spec, pl.no_block_spec],
            out_specs=(stats_spec, stats_spec,
                       pl.BlockSpec((None, None, block_q, None, dim),
                                    lambda b, h, i, p: (b, p, i, h, 0))),
            interpret=interpret(), compiler_params=params, name="attend_parts",
        )(*args)
        out = pl.pallas_call(
            functools.partial(_merge_kernel, parts=parts, block_q=block_q),
            out_shape=jax.ShapeDtypeStruct((batch, padded, heads, dim), q.dtype),
            grid=(batch, heads, padded // block_q),
            in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
            out_specs=pl.BlockSpec((None, block_q, None, dim), lambda b, h, i: (b, i, h, 0)),
            interpret=interpret(), compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
            name="attend_merge",
        )(top, total, acc)
    return out[:, :length].reshape(batch, length, kv_heads, group, dim)
