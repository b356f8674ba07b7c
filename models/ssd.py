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


def pass_states(state: Array, decay: Array, contrib: Array, entering_dtype, want_exits: bool
                ) -> tuple[Array, Array | None, Array]:
    """The inter-chunk recurrence s_{q+1} = decay_q s_q + contrib_q, chunk after chunk IN ORDER.

    One elementwise update per chunk (never a matmul over the chunk axis), so a chunk's numbers do
    not depend on where it sits in the group. Each update is materialised once (an optimisation
    barrier per chunk): fused into one loop kernel, XLA recomputes the whole chain for every chunk
    it outputs (O(Q^2) reads of the contributions).

    Args:
      state: float32[B, H, P, N] the state before chunk 0. decay: float32[B, Q, H] exp of each
        chunk's total log decay. contrib: float32[B, Q, H, P, N] each chunk's contribution from a
        zero state. entering_dtype: dtype of the returned entering states (the matmul operand
        dtype). want_exits: also return the state after every chunk.

    Returns:
      (entering [B, Q, H, P, N] in entering_dtype: the state before each chunk, exits
      float32[B, Q, H, P, N] or None, final float32[B, H, P, N]).
    """
    current, entering, exits = state, [], []
    for q in range(contrib.shape[1]):
        entering.append(current.astype(entering_dtype))
        current = jax.lax.optimization_barrier(decay[:, q, :, None, None] * current + contrib[:, q])
        exits.append(current)
    return (jnp.stack(entering, axis=1), jnp.stack(exits, axis=1) if want_exits else None, current)


def state_contributions(x: Array, dt: Array, cum: Array, b: Array, mm) -> Array:
    """Each chunk's state contribution from a zero state, sum_s exp(cum_last - cum_s) dt_s x_s B_s^T.

    Args:
      x: [B, Q, L, H, P]. dt, cum: float32[B, Q, L, H] (cum: the within-chunk cumulative sum of
        dt A). b: [B, Q, L, G, N]. mm: the matmul (`_matmul` with its operand dtype bound).

    Returns:
      float32[B, Q, H, P, N].
    """
    batch, chunks, length, heads, head_dim = x.shape
    groups = b.shape[-2]
    lead = (batch, chunks, length, groups, heads // groups)
    to_end = (jnp.exp(cum[:, :, -1:] - cum) * dt).reshape(lead)                     # [B,Q,L,G,J]
    contrib = mm("bqsgn,bqsgjp->bqgjpn", b, x.reshape(lead + (head_dim,)) * to_end[..., None])
    return contrib.reshape(batch, chunks, heads, head_dim, -1)


def matmul_fn(dtype):
    """The SSD matmul with operands cast to `dtype` and float32 accumulation (`mm` above)."""
    return functools.partial(_matmul, dtype=jnp.dtype(dtype))


def ssd_chunks(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array, *,
               matmul_dtype=jnp.float32, want_exits: bool = True
               ) -> tuple[Array, Array | None, Array]:
    """Q consecutive chunks of SSD in quadratic form, starting from `state`.

    Each chunk's intra-chunk output and state contribution are batched over the Q chunks; the state
    then passes from chunk to chunk IN ORDER (`pass_states`), and each chunk reads its entering
    state in one batched matmul. So a chunk's numbers do not depend on where it sits in the group:
    a resume at any chunk boundary is bitwise. As in state-spaces' kernels, dt is folded into the
    decayed C B^T weights (intra-chunk) and into x's chunk-end decay (state contribution), so x, B
    and C enter the matmuls as they come; decays, the state and every accumulation are float32;
    matmul operands are cast to `matmul_dtype` (bf16 for a bf16 model).

    Args:
      x: [B, Q, L, H, P] inputs (after the conv and SiLU; float32 or the compute dtype).
      dt: float32[B, Q, L, H] step sizes after softplus; 0 on padded slots (an all-padding chunk
        passes the state through exactly).
      a: float32[H] the (negative) decay rates A = -exp(A_log).
      b, c: [B, Q, L, G, N] input and output projections of the state (like x).
      state: float32[B, H, P, N] the state before the first chunk.
      matmul_dtype: the operand dtype of the matmuls.
      want_exits: return the state after every chunk (else None in its place).

    Returns:
      (y float32[B, Q, L, H, P] without the D skip, exits float32[B, Q, H, P, N] or None,
      final float32[B, H, P, N] the state after the last chunk).
    """
    mm = matmul_fn(matmul_dtype)
    batch, chunks, length, heads, head_dim = x.shape
    groups = b.shape[-2]
    per_group = heads // groups
    cum = jnp.cumsum(dt * a, axis=2)                                                 # [B,Q,L,H]
    lead = (batch, chunks, length, groups, per_group)

    # Intra-chunk: y_l += sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s.
    cum_t = jnp.moveaxis(cum.reshape(lead), 2, -1)                                   # [B,Q,G,J,L]
    dt_t = jnp.moveaxis(dt.reshape(lead), 2, -1)                                     # [B,Q,G,J,S]
    causal = jnp.tril(jnp.ones((length, length), bool))
    decay = jnp.exp(jnp.where(causal, cum_t[..., :, None] - cum_t[..., None, :], -jnp.inf))
    scores = mm("bqlgn,bqsgn->bqgls", c, b)                                         # [B,Q,G,L,S]
    weights = scores[:, :, :, None] * decay * dt_t[..., None, :]                     # [B,Q,G,J,L,S]
    xg = x.reshape(lead + (head_dim,))
    y_diag = mm("bqgjls,bqsgjp->bqlgjp", weights, xg)

    contrib = state_contributions(x, dt, cum, b, mm)
    entering, exits, final = pass_states(state, jnp.exp(cum[:, :, -1]), contrib,
                                         jnp.dtype(matmul_dtype), want_exits)

    # Off-diagonal: y_l += exp(cum_l) C_l . entering state, batched over the chunks.
    entering = entering.reshape(batch, chunks, groups, per_group, head_dim, -1)
    y_off = mm("bqlgn,bqgjpn->bqlgjp", c, entering) * jnp.exp(cum).reshape(lead)[..., None]
    return (y_diag + y_off).reshape(x.shape), exits, final


def ssd_chunk(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array, *,
              matmul_dtype=jnp.float32) -> tuple[Array, Array]:
    """One chunk of SSD in quadratic form (`ssd_chunks` with Q = 1).

    Args:
      x: float32[B, L, H, P]. dt: float32[B, L, H] (0 on padded slots). a: float32[H].
      b, c: float32[B, L, G, N]. state: float32[B, H, P, N]. matmul_dtype: matmul operand dtype.

    Returns:
      (y float32[B, L, H, P] without the D skip, state float32[B, H, P, N] after the chunk).
    """
    y, _, final = ssd_chunks(x[:, None], dt[:, None], a, b[:, None], c[:, None], state,
                             matmul_dtype=matmul_dtype, want_exits=False)
    return y[:, 0], final


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
                    ) -> tuple[Array, Array, Array]:
    """The sequential reference over Q chunks: `ssd_scan` chunk after chunk. Same contract as
    `ssd_chunks` (x [B, Q, L, H, P] ... -> y [B, Q, L, H, P], exits [B, Q, H, P, N], final)."""

    def chunk(current, inputs):
        x_g, dt_g, b_g, c_g = inputs
        y_g, current = ssd_scan(x_g, dt_g, a, b_g, c_g, current)
        return current, (y_g, current)

    inputs = tuple(jnp.moveaxis(t, 1, 0) for t in (x, dt, b, c))
    final, (ys, exits) = jax.lax.scan(chunk, state, inputs)
    return jnp.moveaxis(ys, 0, 1), jnp.moveaxis(exits, 0, 1), final
