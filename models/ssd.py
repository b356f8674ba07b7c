"""SSD, the state-space recurrence of Mamba2: one chunk in quadratic form, one token, a token scan.

Per head h the recurrence is, for every token t (dt_t > 0 its step, A_h < 0 the decay rate):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        S: [P, N]
    y_t = S_t C_t                                       (the D skip is added by the caller)

Shape legend: B batch rows, L tokens of the chunk, H heads, P head dim, G groups (H % G == 0, heads
h in [g H/G, (g+1) H/G) read group g's B and C), N state size. Inputs, outputs, decays and the state
are float32; `ssd_chunk` may run its matmuls on bf16 operands (float32 accumulation) for a bf16 model.

Backends (selected by `Mamba2MixerConfig.backend`):
  * `ssd_chunk` -- the chunked (dual, quadratic) form of one chunk from an incoming state: the
    intra-chunk part is a masked, decayed C B^T "attention", the inter-chunk part reads the incoming
    state; every contraction is a batched matmul (the GPU path).
  * `ssd_scan` -- the sequential reference: `ssd_step` under `lax.scan`, token by token.
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


def ssd_chunk(x: Array, dt: Array, a: Array, b: Array, c: Array, state: Array, *,
              matmul_dtype=jnp.float32) -> tuple[Array, Array]:
    """One chunk of SSD in quadratic form, starting from `state`.

    The decays, the state and every accumulation are float32; only the operands of the four
    matmuls are cast to `matmul_dtype` (bf16 for a bf16 model, as the state-spaces kernels do).

    Args:
      x: float32[B, L, H, P] inputs (after the conv and SiLU).
      dt: float32[B, L, H] step sizes after softplus; 0 on padded slots.
      a: float32[H] the (negative) decay rates A = -exp(A_log).
      b, c: float32[B, L, G, N] input and output projections of the state.
      state: float32[B, H, P, N] the state before the chunk.
      matmul_dtype: the operand dtype of the matmuls.

    Returns:
      (y float32[B, L, H, P] without the D skip, state float32[B, H, P, N] after the chunk).
    """
    mm = functools.partial(_matmul, dtype=jnp.dtype(matmul_dtype))
    batch, length, heads, head_dim = x.shape
    groups, size = b.shape[2], b.shape[3]
    per_group = heads // groups
    log_decay = jnp.cumsum(dt * a, axis=1).reshape(batch, length, groups, per_group)  # [B,L,G,J]
    x_dt = (x * dt[..., None]).reshape(batch, length, groups, per_group, head_dim)   # [B,L,G,J,P]
    state_g = state.reshape(batch, groups, per_group, head_dim, size)               # [B,G,J,P,N]

    # Intra-chunk: y_l += sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s.
    cum = jnp.moveaxis(log_decay, 1, -1)                                            # [B,G,J,L]
    causal = jnp.tril(jnp.ones((length, length), bool))
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    scores = mm("blgn,bsgn->bgls", c, b)                                            # [B,G,L,S]
    y_diag = mm("bgjls,bsgjp->blgjp", scores[:, :, None] * decay, x_dt)

    # Inter-chunk: y_l += exp(cum_l) C_l . state.
    y_off = mm("blgn,bgjpn->blgjp", c, state_g) * jnp.exp(log_decay)[..., None]

    # State update: state' = exp(cum_last) state + sum_s exp(cum_last - cum_s) dt_s x_s B_s^T.
    last = log_decay[:, -1]                                                          # [B,G,J]
    to_end = jnp.exp(last[:, None] - log_decay)                                      # [B,L,G,J]
    new_state = (jnp.exp(last)[..., None, None] * state_g
                 + mm("bsgn,bsgjp->bgjpn", b, x_dt * to_end[..., None]))
    y = (y_diag + y_off).reshape(batch, length, heads, head_dim)
    return y, new_state.reshape(batch, heads, head_dim, size)


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
