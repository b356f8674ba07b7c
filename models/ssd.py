"""SSD, the state-space recurrence of Mamba2: chunks in quadratic form, one token, a token scan.

Per head h the recurrence is, for every token t (dt_t > 0 its step, A_h < 0 the decay rate):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        S: [P, N]
    y_t = S_t C_t                                       (the D skip is added by the caller)

Shape legend: B batch rows, L tokens of the chunk, H heads, P head dim, G groups (H % G == 0, heads
h in [g H/G, (g+1) H/G) read group g's B and C), N state size, Q consecutive chunks run together
(the chunks per step of `sparse_prefix.chunking`, called G there). x, B and C may come in the
compute dtype (bf16 for a bf16 model); dt, decays, outputs and the state are float32; `ssd_chunks`
runs its matmuls on operands of `matmul_dtype` with float32 accumulation.

Backends (selected by `Mamba2MixerConfig.backend`):
  * `ssd_chunks` -- the chunked (dual, quadratic) form of Q chunks from an incoming state: each
    chunk's intra-chunk part is a masked, decayed C B^T "attention" and its inter-chunk part reads
    the state entering it; every contraction is a matmul batched over the chunks (the GPU path),
    and the state passes from chunk to chunk in order by elementwise updates. `ssd_chunk` is Q = 1.
  * `ssd_scan` -- the sequential reference: `ssd_step` under `lax.scan`, token by token
    (`ssd_scan_chunks` over Q chunks).
A padded slot carries dt = 0: exp(0) = 1 and dt x = 0, so the state passes through it unchanged in
both backends (exactly, not approximately).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def full_precision(dtype) -> jax.lax.Precision:
    """Matmul precision for operands of `dtype`: HIGHEST for float32 (a float32 model is the reference
    on every backend, also on GPUs whose float32 matmuls default to TF32), DEFAULT otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def _matmul(spec: str, left: Array, right: Array, dtype) -> Array:
    """einsum with operands cast to `dtype` and float32 accumulation."""
    return jnp.einsum(spec, left.astype(dtype), right.astype(dtype), precision=full_precision(dtype),
                      preferred_element_type=jnp.float32)


def _chunk_terms(x: Array, dt: Array, a: Array, b: Array, c: Array, mm) -> tuple:
    """The parts of SSD that each chunk computes alone, batched over every leading axis.

    Args:
      x: float32[..., L, H, P]. dt: float32[..., L, H]. a: float32[H]. b, c: float32[..., L, G, N].
      mm: the matmul (operand dtype, float32 accumulation).

    Returns:
      (y_diag float32[..., L, G, J, P] the intra-chunk output, contrib float32[..., G, J, P, N] the
      chunk's state contribution from a zero state, log_decay float32[..., L, G, J] the within-chunk
      cumulative log decay; J = H / G heads per group).
    """
    lead, (length, heads, head_dim) = x.shape[:-3], x.shape[-3:]
    groups = b.shape[-2]
    per_group = heads // groups
    log_decay = jnp.cumsum(dt * a, axis=-2).reshape(lead + (length, groups, per_group))
    x_dt = (x * dt[..., None]).reshape(lead + (length, groups, per_group, head_dim))

    # Intra-chunk: y_l += sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s.
    cum = jnp.moveaxis(log_decay, -3, -1)                                          # [...,G,J,L]
    causal = jnp.tril(jnp.ones((length, length), bool))
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    scores = mm("...lgn,...sgn->...gls", c, b)                                     # [...,G,L,S]
    y_diag = mm("...gjls,...sgjp->...lgjp", scores[..., :, None, :, :] * decay, x_dt)

    # The chunk's own contribution: sum_s exp(cum_last - cum_s) dt_s x_s B_s^T.
    to_end = jnp.exp(log_decay[..., -1:, :, :] - log_decay)                        # [...,L,G,J]
    contrib = mm("...sgn,...sgjp->...gjpn", b, x_dt * to_end[..., None])
    return y_diag, contrib, log_decay


def ssd_chunks(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array, *,
               matmul_dtype=jnp.float32) -> tuple[Array, Array]:
    """Q consecutive chunks of SSD in quadratic form, starting from `state`.

    Each chunk's intra-chunk output, state contribution and total decay are batched over the Q
    chunks; the state then passes from chunk to chunk IN ORDER, s_{g+1} = exp(last_g) s_g +
    contrib_g, by Q elementwise updates (never a matmul over the chunk axis), and each chunk reads
    its entering state in one batched matmul. So a chunk's numbers do not depend on where it sits
    in the group: a resume at any chunk boundary is bitwise. The decays, the state and every
    accumulation are float32; only matmul operands are cast to `matmul_dtype` (bf16 for a bf16
    model, as the state-spaces kernels do).

    Args:
      x: [B, Q, L, H, P] inputs (after the conv and SiLU; float32 or the compute dtype).
      dt: float32[B, Q, L, H] step sizes after softplus; 0 on padded slots (an all-padding chunk
        passes the state through exactly).
      a: float32[H] the (negative) decay rates A = -exp(A_log).
      b, c: [B, Q, L, G, N] input and output projections of the state (like x).
      state: float32[B, H, P, N] the state before the first chunk.
      matmul_dtype: the operand dtype of the matmuls.

    Returns:
      (y float32[B, Q, L, H, P] without the D skip, exits float32[B, Q, H, P, N]: the state after
      each chunk; exits[:, -1] is the final state).
    """
    mm = functools.partial(_matmul, dtype=jnp.dtype(matmul_dtype))
    batch, chunks, length, heads, head_dim = x.shape
    groups, size = b.shape[-2], b.shape[-1]
    per_group = heads // groups
    y_diag, contrib, log_decay = _chunk_terms(x, dt, a, b, c, mm)
    chunk_decay = jnp.exp(log_decay[:, :, -1])[..., None, None]                     # [B,Q,G,J,1,1]

    # Inter-chunk: the state entering each chunk, passed in order by elementwise updates only.
    current = state.reshape(batch, groups, per_group, head_dim, size)
    entering, exits = [], []
    for q in range(chunks):
        entering.append(current)
        current = chunk_decay[:, q] * current + contrib[:, q]
        exits.append(current)
    entering = jnp.stack(entering, axis=1)                                          # [B,Q,G,J,P,N]

    # Off-diagonal: y_l += exp(cum_l) C_l . entering state, batched over the chunks.
    y_off = mm("bclgn,bcgjpn->bclgjp", c, entering) * jnp.exp(log_decay)[..., None]
    y = (y_diag + y_off).reshape(batch, chunks, length, heads, head_dim)
    return y, jnp.stack(exits, axis=1).reshape(batch, chunks, heads, head_dim, size)


def ssd_chunk(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array, *,
              matmul_dtype=jnp.float32) -> tuple[Array, Array]:
    """One chunk of SSD in quadratic form (`ssd_chunks` with Q = 1).

    Args:
      x: float32[B, L, H, P]. dt: float32[B, L, H] (0 on padded slots). a: float32[H].
      b, c: float32[B, L, G, N]. state: float32[B, H, P, N]. matmul_dtype: matmul operand dtype.

    Returns:
      (y float32[B, L, H, P] without the D skip, state float32[B, H, P, N] after the chunk).
    """
    y, exits = ssd_chunks(x[:, None], dt[:, None], a, b[:, None], c[:, None], state,
                          matmul_dtype=matmul_dtype)
    return y[:, 0], exits[:, 0]


def _per_head(groups_array: Array, heads: int) -> Array:
    """[B, G, N] -> [B, H, N]: each head reads its group's row."""
    return jnp.repeat(groups_array, heads // groups_array.shape[1], axis=1)


def ssd_step(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array) -> tuple[Array, Array]:
    """One token of SSD (the closed-form update used by decode and by the sequential backend).

    Args:
      x: float32[B, H, P]. dt: float32[B, H] (0 = padded slot). a: float32[H].
      b, c: float32[B, G, N]. state: float32[B, H, P, N].

    Returns:
      (y float32[B, H, P] without the D skip, state float32[B, H, P, N]).
    """
    heads = x.shape[1]
    decay = jnp.exp(dt * a)[..., None, None]
    update = (x * dt[..., None])[..., None] * _per_head(b, heads)[:, :, None, :]
    new_state = state * decay + update
    y = jnp.einsum("bhpn,bhn->bhp", new_state, _per_head(c, heads),
                   precision=full_precision(jnp.float32))
    return y, new_state


def ssd_scan(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array) -> tuple[Array, Array]:
    """The sequential reference backend: `ssd_step` token by token. Same contract as `ssd_chunk`."""

    def step(current, inputs):
        x_t, dt_t, b_t, c_t = inputs
        y_t, current = ssd_step(x_t, dt_t, a, b_t, c_t, current)
        return current, y_t

    inputs = tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, b, c))
    final, ys = jax.lax.scan(step, state, inputs)
    return jnp.moveaxis(ys, 0, 1), final


def ssd_scan_chunks(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array
                    ) -> tuple[Array, Array]:
    """The sequential reference over Q chunks: `ssd_scan` chunk after chunk. Same contract as
    `ssd_chunks` (x [B, Q, L, H, P] ... -> y [B, Q, L, H, P], exits [B, Q, H, P, N])."""

    def chunk(current, inputs):
        x_g, dt_g, b_g, c_g = inputs
        y_g, current = ssd_scan(x_g, dt_g, a, b_g, c_g, current)
        return current, (y_g, current)

    inputs = tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, b, c))
    _, (ys, exits) = jax.lax.scan(chunk, state, inputs)
    return jnp.moveaxis(ys, 0, 1), jnp.moveaxis(exits, 0, 1)
