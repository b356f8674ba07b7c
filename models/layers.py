"""Small building blocks shared by every model family: norms, the causal conv, the LM head,
initialisers.

Shapes follow `sparse_prefix.protocol` (B batch, C chunk, Dc conv channels, W conv width).
Every function is pure; float32 is used for reductions and accumulation whatever the input dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def rms_norm(x: Array, weight: Array, eps: float, *, offset: float = 0.0) -> Array:
    """RMSNorm over the last axis in float32, cast back to x.dtype.

    `offset` = 1.0 gives the (1 + w) parameterisation (Qwen3.5 / Gemma norms store w - 1).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * (weight.astype(jnp.float32) + offset)).astype(x.dtype)


def causal_conv_chunk(x: Array, window: Array, weight: Array, bias: Array | None,
                      n_valid: Array) -> tuple[Array, Array]:
    """Depthwise causal conv over one chunk whose valid slots are a prefix.

    Args:
      x: [B, C, Dc] the chunk's inputs (slots >= n_valid are padding; their outputs are garbage).
      window: [B, W-1, Dc] the last W-1 real inputs before the chunk, oldest first.
      weight: [W, Dc] taps, weight[W-1] multiplies the current input. bias: [Dc] or None.
      n_valid: int32[B] real slots in this chunk.

    Returns:
      (y float32[B, C, Dc] before any activation, new window [B, W-1, Dc] = last W-1 real inputs).
    """
    width = weight.shape[0]
    full = jnp.concatenate([window.astype(x.dtype), x], axis=1)
    full32 = full.astype(jnp.float32)
    w32 = weight.astype(jnp.float32)
    chunk = x.shape[1]
    y = sum(full32[:, i:i + chunk] * w32[i] for i in range(width))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    new_window = jax.vmap(
        lambda row, start: jax.lax.dynamic_slice_in_dim(row, start, width - 1, axis=0)
    )(full, n_valid.astype(jnp.int32))
    return y, new_window.astype(window.dtype)


def causal_conv_step(x: Array, window: Array, weight: Array, bias: Array | None
                     ) -> tuple[Array, Array]:
    """One-token causal conv: x [B, Dc], window [B, W-1, Dc] -> (y float32[B, Dc], new window)."""
    full = jnp.concatenate([window.astype(x.dtype), x[:, None, :]], axis=1)
    y = jnp.einsum("bwd,wd->bd", full.astype(jnp.float32), weight.astype(jnp.float32))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y, full[:, 1:].astype(window.dtype)


def embed_lookup(table: Array, tokens: Array, *, view: bool | None = None) -> Array:
    """Rows of an embedding: table [V, d], tokens int[...] -> [..., d] in the table's dtype, bit for bit.

    view: gather a 16- or 32-bit float table through an unsigned-integer view of the same bits.
      None (default): on the CPU backend only, where XLA gathers a bfloat16 table inside the models'
      step loop from a float32 copy of all of it, made in every call (qwen3.5's 248320 x 1024
      table: 1 GB written per prefill; the group preset's 1024-token prefill on a 2-core CPU ~0.1 s
      faster with the view). GPUs gather bfloat16 as stored; the view there is unmeasured
      (`experiments/bench_head.py` times both).
    """
    if view is None:
        view = jax.default_backend() == "cpu"
    bits = {2: jnp.uint16, 4: jnp.uint32}.get(table.dtype.itemsize)
    if not view or bits is None or not jnp.issubdtype(table.dtype, jnp.floating):
        return jnp.take(table, tokens, axis=0)
    rows = jnp.take(jax.lax.bitcast_convert_type(table, bits), tokens, axis=0)
    return jax.lax.bitcast_convert_type(rows, table.dtype)


def head_logits(hidden: Array, weight: Array, *, vocab_major: bool, precision=None) -> Array:
    """The LM head: hidden [..., d] (the compute dtype) -> float32 logits [..., V].

    weight: [V, d] when `vocab_major` (an embedding tied to the head), else [d, V].  Products of the
    operands' dtype, accumulated in float32.  A single row (batch 1 at its last token, every prefill
    and decode step the Engine runs) is computed as two -- the second zero -- and the first kept: XLA
    lowers a one-row product with float32 output as a matrix-vector product on a float32 copy of the
    whole head (CPU and GPU alike; on an H200, qwen3.5's 248320 x 1024 head: a 364 us convert and a
    240 us float32 gemv in every prefill call), and a two-row one as a matrix product on the weights
    as stored.  The same values up to the float32 summation order.
    """
    spec = "...d,vd->...v" if vocab_major else "...d,dv->...v"
    if math.prod(hidden.shape[:-1]) != 1:
        return jnp.einsum(spec, hidden, weight, precision=precision, preferred_element_type=jnp.float32)
    row = hidden.reshape(1, hidden.shape[-1])
    rows = jnp.concatenate([row, jnp.zeros_like(row)])
    logits = jnp.einsum(spec, rows, weight, precision=precision, preferred_element_type=jnp.float32)
    return logits[:1].reshape(*hidden.shape[:-1], logits.shape[-1])


def normal_init(key: Array, shape: tuple[int, ...], std: float, dtype) -> Array:
    """Truncated-free normal initialiser N(0, std^2) in `dtype`."""
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
