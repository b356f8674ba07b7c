"""The depthwise causal conv over G consecutive chunks at once, each chunk with its own window.

A group step runs G chunks of one prefill layout together. Each chunk's conv must read the last W-1
REAL inputs before it -- the conv window after the previous chunk -- so that the chunk's numbers are
the same wherever it sits in a group (the exactness grid of `sparse_prefix.chunking`). Every chunk's
window is found directly, without a sequential pass over the chunks: within a chunk the real slots
are a prefix, so the real inputs form a stream (the incoming window, then each chunk's real slots in
order) and the window before chunk g is the W-1 stream entries ending where chunk g's real slots
begin -- a gather of W-1 rows per chunk located by a cumulative count (pure data movement, exact
whatever XLA fuses). The conv itself is one elementwise pass over all G chunks: each tap reads its
shifted input from the chunk or, for the first W-1 slots, from the chunk's window, so no
[G, C + W - 1, Dc] concatenation is materialised.

Shape legend: B batch rows, G chunks per step, C chunk size, W conv width, Dc channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def group_windows(window: Array, x: Array, n_valid: Array) -> tuple[Array, Array]:
    """Every chunk's entering and exiting window, gathered directly (no pass over the chunks).

    The real-input stream is `window` (W-1 rows) followed by the real slots of chunks 0..G-1; the
    window before chunk g is stream rows R_g .. R_g + W-2 with R_g the real slots before chunk g.

    Args:
      window: [B, W-1, Dc] the window before the first chunk.
      x: [B, G, C, Dc] the chunks' inputs. n_valid: int32[B, G] real slots per chunk (a prefix).

    Returns:
      (entering [B, G, W-1, Dc]: the window before each chunk, exits [B, G, W-1, Dc]: after each),
      in window.dtype.
    """
    batch, groups, chunk = x.shape[:3]
    keep = window.shape[1]
    n_valid = n_valid.astype(jnp.int32)
    ends = jnp.cumsum(n_valid, axis=1)                                              # [B, G]
    starts = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), ends], axis=1)      # [B, G+1]
    stream = starts[:, :, None] + jnp.arange(keep, dtype=jnp.int32)                 # [B, G+1, W-1]
    real = stream - keep                                   # index among the real slots; < 0: window
    # The chunk holding real slot r: the number of chunks whose real slots all come before r.
    owner = jnp.sum(ends[:, None, None, :] <= real[..., None], axis=-1)             # [B, G+1, W-1]
    owner = jnp.minimum(owner, groups - 1)
    owner_start = jnp.take_along_axis(starts, owner.reshape(batch, -1), axis=1).reshape(owner.shape)
    flat = owner * chunk + jnp.clip(real - owner_start, 0, chunk - 1)
    from_x = jnp.take_along_axis(x.reshape(batch, groups * chunk, -1),
                                 jnp.clip(flat, 0, groups * chunk - 1).reshape(batch, -1, 1), axis=1)
    from_window = jnp.take_along_axis(window, jnp.clip(stream, 0, keep - 1).reshape(batch, -1, 1),
                                      axis=1)
    windows = jnp.where((real < 0).reshape(batch, -1, 1), from_window, from_x.astype(window.dtype))
    windows = windows.reshape(batch, groups + 1, keep, -1)
    return windows[:, :-1], windows[:, 1:]


def _shifted(entering: Array, x: Array, shift: int) -> Array:
    """Input `shift` slots back: [B, G, C, Dc] whose slot t is x[t - shift], or the chunk's window
    row W-1 + t - shift for t < shift."""
    if shift == 0:
        return x
    keep, chunk = entering.shape[2], x.shape[2]
    head = entering[:, :, keep - shift:keep - shift + chunk]
    if shift >= chunk:
        return head
    return jnp.concatenate([head, x[:, :, :chunk - shift]], axis=2)


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
    width = weight.shape[0]
    entering, exits = group_windows(window, x, n_valid)
    entering = entering.astype(x.dtype)
    w32 = weight.astype(jnp.float32)
    y = sum(_shifted(entering, x, width - 1 - i).astype(jnp.float32) * w32[i] for i in range(width))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y, exits
