"""Small building blocks shared by every model family: norms, the causal conv, initialisers.

Shapes follow `sparse_prefix.protocol` (B batch, C chunk, Dc conv channels, W conv width).
Every function is pure; float32 is used for reductions and accumulation whatever the input dtype.
"""

from __future__ import annotations

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


def normal_init(key: Array, shape: tuple[int, ...], std: float, dtype) -> Array:
    """Truncated-free normal initialiser N(0, std^2) in `dtype`."""
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
