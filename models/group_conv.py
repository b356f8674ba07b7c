"""The depthwise causal conv over G consecutive chunks at once, each chunk with its own window.

A group step runs G chunks of one prefill layout together. Each chunk's conv must read the last W-1
REAL inputs before it -- the conv window after the previous chunk -- so that the chunk's numbers are
the same wherever it sits in a group (the exactness grid of `sparse_prefix.chunking`). The windows are
pure data movement (a gather of W-1 rows per chunk), so the sequential pass over G that computes them
is exact whatever XLA fuses; the conv itself is one batched elementwise pass over all G chunks.

Shape legend: B batch rows, G chunks per step, C chunk size, W conv width, Dc channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def next_window(window: Array, x: Array, n_valid: Array) -> Array:
    """The last W-1 real inputs after a chunk whose first `n_valid` slots are real.

    Args:
      window: [B, W-1, Dc] the last W-1 real inputs before the chunk, oldest first.
      x: [B, C, Dc] the chunk's inputs. n_valid: int32[B] (0 = an all-padding chunk: unchanged).

    Returns:
      [B, W-1, Dc] in window.dtype: positions n_valid .. n_valid + W-2 of concat(window, x).
    """
    keep = window.shape[1]
    index = n_valid.astype(jnp.int32)[:, None] + jnp.arange(keep, dtype=jnp.int32)[None, :]  # [B, W-1]
    from_x = jnp.take_along_axis(x, jnp.clip(index - keep, 0, x.shape[1] - 1)[..., None], axis=1)
    from_window = jnp.take_along_axis(window, jnp.clip(index, 0, keep - 1)[..., None], axis=1)
    return jnp.where((index < keep)[..., None], from_window, from_x.astype(window.dtype))


def group_windows(window: Array, x: Array, n_valid: Array) -> tuple[Array, Array]:
    """Every chunk's entering window, by a sequential pass over the G chunks (data movement only).

    Args:
      window: [B, W-1, Dc] the window before the first chunk.
      x: [B, G, C, Dc] the chunks' inputs. n_valid: int32[B, G] real slots per chunk (a prefix).

    Returns:
      (entering [B, G, W-1, Dc]: the window before each chunk, exits [B, G, W-1, Dc]: after each).
    """
    entering, exits = [], []
    for g in range(x.shape[1]):
        entering.append(window)
        window = next_window(window, x[:, g], n_valid[:, g])
        exits.append(window)
    return jnp.stack(entering, axis=1), jnp.stack(exits, axis=1)


def causal_conv_group(x: Array, window: Array, weight: Array, bias: Array | None, n_valid: Array
                      ) -> tuple[Array, Array]:
    """Depthwise causal conv over G chunks, each reading its own entering window.

    Args:
      x: [B, G, C, Dc] inputs (slots >= n_valid[b, g] are padding; their outputs are garbage).
      window: [B, W-1, Dc] the last W-1 real inputs before the first chunk, oldest first.
      weight: [W, Dc] taps, weight[W-1] multiplies the current input. bias: [Dc] or None.
      n_valid: int32[B, G] real slots per chunk.

    Returns:
      (y float32[B, G, C, Dc] before any activation, windows [B, G, W-1, Dc] after each chunk).
    """
    width, chunk = weight.shape[0], x.shape[2]
    entering, exits = group_windows(window, x, n_valid)
    full = jnp.concatenate([entering.astype(x.dtype), x], axis=2).astype(jnp.float32)
    w32 = weight.astype(jnp.float32)
    y = sum(full[:, :, i:i + chunk] * w32[i] for i in range(width))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y, exits
