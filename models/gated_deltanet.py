"""The Qwen3.5 Gated DeltaNet (GDN) mixer: chunked (UT-transform) prefill, one-token decode, scan reference.

Shapes follow `sparse_prefix.protocol`; here H = value heads (Hv), Hk = key heads (Hv % Hk == 0, value
head h reads key head h // (Hv // Hk), as HF's repeat_interleave), Dk / Dv the key / value head dims,
Dc = 2 * Hk * Dk + Hv * Dv the channels of the one causal conv over the mixed q|k|v projection.

The gated delta rule on one head (state S float32 [Dk, Dv]; read-out o_t = S_t^T q_t):
    S_t = a_t S_{t-1} + k_t beta_t (v_t - a_t S_{t-1}^T k_t)^T,   a_t = exp(g_t),
    g_t = -exp(A_log) softplus(a_proj_t + dt_bias) <= 0,  beta_t = sigmoid(b_proj_t),
with q, k L2-normalised (eps 1e-6) and q scaled by Dk^-1/2. A padded slot gets beta = 0 and g = 0,
which makes it an exact identity: S_t = 1 * S_{t-1} + k_t * 0.

Chunked form over a sub-chunk of c tokens with incoming state S0 (G = inclusive cumsum of g inside it,
D[i, j] = exp(G_i - G_j) for j <= i else 0, L = strictly_lower(beta_i k_i.k_j D[i, j])):
    U = (I + L)^-1 (beta v),   W = (I + L)^-1 (beta exp(G) k),   V' = U - W S0
    o = (q exp(G)) S0 + ((q k^T) * D) V',    S_c = exp(G_c) S0 + (k exp(G_c - G))^T V'.
All sub-chunks' U, W, D are computed at once (big batched matmuls); (I + L)^-1 comes from a
log-depth block doubling (`unit_lower_inverse`, matmuls only); only the S recursion (V', S_c: two
matmuls per sub-chunk) is sequential -- a scan, or one Pallas kernel on a GPU (`gdn_pallas`,
GDNConfig.recurrence) -- and the outputs o are one batched product after it.

Prefill runs G chunks at once (`gdn_mixer_group`): projections over all G*C rows, per-chunk conv
windows, intra terms batched over the chunks, the state passed sub-chunk to sub-chunk in order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.chunking import EmitTarget, write_emitted
from sparse_prefix.protocol import RecurrentState

from . import gdn_pallas, gdn_solve_pallas
from .group_conv import causal_conv_group
from .layers import causal_conv_step, normal_init

Array = jax.Array
_L2_EPS = 1e-6
SOLVERS = ("doubling", "triangular", "pallas", "auto")   # the UT solve (see GDNConfig.solver)
RECURRENCES = ("xla", "pallas", "auto")   # the sub-chunk state recursion (see GDNConfig.recurrence)


def rule_precision(dtype) -> jax.lax.Precision:
    """Matmul precision of the float32 delta rule for a model computing in `dtype`: full float32 for
    float32 models on every backend; the backend default (TF32 on recent GPUs, more mantissa than
    the bf16 projections feeding it) for reduced-precision models. CPU computes float32 either way."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


@dataclasses.dataclass(frozen=True)
class GDNConfig:
    """Shape of one Gated DeltaNet mixer (Qwen3.5 names in brackets).

    Attributes:
      d_model: d [hidden_size].  num_k_heads: Hk [linear_num_key_heads].
      num_v_heads: Hv [linear_num_value_heads], a multiple of Hk.
      head_k_dim: Dk [linear_key_head_dim].  head_v_dim: Dv [linear_value_head_dim].
      conv_width: W [linear_conv_kernel_dim].  norm_eps: the gated RMSNorm's eps [rms_norm_eps].
      sub_chunk: c, the UT-transform block and the step of the state recursion; the model's chunk
        size must be a multiple of it. Bigger c: fewer sequential steps (L / c per layer), more
        intra-chunk FLOPs (~c per token).
      solver: the UT solve, "doubling" (`unit_lower_inverse`: batched matmuls, ~35 kernels per layer
        and step), "triangular" (`jax.lax.linalg.triangular_solve`), "pallas" (one Triton kernel of
        blocked forward substitution: `gdn_solve_pallas`; Pallas' interpreter off the GPU) or
        "auto" ("pallas" where the default backend is a GPU, the model computes in reduced precision
        and `gdn_solve_pallas.supported` takes the shape, else "doubling"). "pallas" falls back to
        "doubling" on shapes the kernel does not take.
      recurrence: the sub-chunk state recursion: "xla" (a `lax.scan`, two matmuls per step),
        "pallas" (one Triton kernel looping over the sub-chunks on the device: `gdn_pallas`;
        Pallas' interpreter off the GPU), or "auto" ("pallas" where the default backend is a GPU and
        the model computes in reduced precision, else "xla"). "pallas" falls back to "xla" on shapes the kernel does not take
        (`gdn_pallas.supported`: power-of-two sub_chunk, head_k_dim, head_v_dim >= 16).
    """

    d_model: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_width: int = 4
    norm_eps: float = 1e-6
    sub_chunk: int = 64
    solver: str = "doubling"
    recurrence: str = "xla"

    def __post_init__(self):
        for name in ("d_model", "num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "sub_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GDNConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.conv_width, int) or self.conv_width < 2:
            raise ValueError(f"GDNConfig.conv_width must be an int >= 2, got {self.conv_width!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"GDNConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.recurrence not in RECURRENCES:
            raise ValueError(f"GDNConfig.recurrence must be one of {RECURRENCES}, "
                             f"got {self.recurrence!r}")
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"GDNConfig.num_v_heads ({self.num_v_heads}) must be a multiple of "
                             f"num_k_heads ({self.num_k_heads})")

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim


# ----------------------------------------------------------------------------- parameters and state


def init_gdn_params(key: Array, cfg: GDNConfig, dtype) -> dict:
    """Random parameters (HF's initialisation scheme); A_log and dt_bias stay float32.

    Returns a dict: in_proj_qkv [d, Dc], in_proj_z [d, Hv*Dv], in_proj_b / in_proj_a [d, Hv],
    conv_weight [W, Dc], dt_bias f32[Hv], A_log f32[Hv], norm_weight [Dv], out_proj [Hv*Dv, d].
    """
    keys = jax.random.split(key, 7)
    std = 0.02
    a_init = jax.random.uniform(keys[5], (cfg.num_v_heads,), jnp.float32, 0.01, 16.0)
    conv_bound = 1.0 / math.sqrt(cfg.conv_width)
    return {
        "in_proj_qkv": normal_init(keys[0], (cfg.d_model, cfg.conv_dim), std, dtype),
        "in_proj_z": normal_init(keys[1], (cfg.d_model, cfg.value_dim), std, dtype),
        "in_proj_b": normal_init(keys[2], (cfg.d_model, cfg.num_v_heads), std, dtype),
        "in_proj_a": normal_init(keys[3], (cfg.d_model, cfg.num_v_heads), std, dtype),
        "conv_weight": jax.random.uniform(keys[4], (cfg.conv_width, cfg.conv_dim), jnp.float32,
                                          -conv_bound, conv_bound).astype(dtype),
        "dt_bias": jnp.ones((cfg.num_v_heads,), jnp.float32),
        "A_log": jnp.log(a_init),
        "norm_weight": jnp.ones((cfg.head_v_dim,), dtype),
        "out_proj": normal_init(keys[6], (cfg.value_dim, cfg.d_model), std, dtype),
    }


def init_gdn_state(cfg: GDNConfig, batch: int, dtype) -> RecurrentState:
    """Zero state: ssm float32[B, Hv, Dk, Dv], conv [B, W-1, Dc] in the compute dtype."""
    return RecurrentState(
        ssm=jnp.zeros((batch, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim), jnp.float32),
        conv=jnp.zeros((batch, cfg.conv_width - 1, cfg.conv_dim), dtype))


# ----------------------------------------------------------------------------- the gated delta rule


def _l2_normalise(x: Array) -> Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _L2_EPS)


def unit_lower_inverse(lower: Array, precision=jax.lax.Precision.HIGHEST) -> Array:
    """(I + lower)^-1 for strictly lower-triangular `lower` [..., n, n], by block doubling.

    Exact block forward substitution in log2(n) batched levels: the inverses of the diagonal blocks
    of size b give those of size 2b by [[X11, 0], [-X22 T21 X11, X22]] (T21 the block below the
    diagonal, gathered by static indices: every entry of `lower` is read once over all levels).
    Two batched matmuls per level instead of a `triangular_solve` over many tiny matrices (slow on
    GPUs). n need not be a power of two (the matrix is padded with an identity block).

    Args:
      lower: float32[..., n, n]; only its strictly lower triangle is read.
      precision: of the matmuls.

    Returns:
      float32[..., n, n], unit lower triangular.
    """
    n = lower.shape[-1]
    size = 1 << max(n - 1, 0).bit_length()
    lead = lower.shape[:-2]
    strict = jnp.tril(jnp.ones((n, n), bool), -1)
    lower = jnp.where(strict, lower, 0.0)
    if size != n:
        lower = jnp.pad(lower, [(0, 0)] * len(lead) + [(0, size - n), (0, size - n)])
    inverse = jnp.ones(lead + (size, 1, 1), lower.dtype)           # the 1 x 1 diagonal blocks
    block = 1
    while block < size:
        pairs = size // (2 * block)
        start = 2 * block * np.arange(pairs)[:, None, None]              # static block origins
        rows = start + block + np.arange(block)[None, :, None]
        cols = start + np.arange(block)[None, None, :]
        below = lower[..., rows, cols]                  # T21 of every 2b block: [..., m, b, b]
        halves = inverse.reshape(lead + (pairs, 2, block, block))
        upper_inv, lower_inv = halves[..., 0, :, :], halves[..., 1, :, :]
        corner = -jnp.matmul(jnp.matmul(lower_inv, below, precision=precision), upper_inv,
                             precision=precision)
        top = jnp.concatenate([upper_inv, jnp.zeros_like(upper_inv)], axis=-1)
        bottom = jnp.concatenate([corner, lower_inv], axis=-1)
        inverse = jnp.concatenate([top, bottom], axis=-2)
        block *= 2
    return inverse.reshape(lead + (size, size))[..., :n, :n]


def use_pallas_recurrence(recurrence: str, sub_chunk: int, head_k_dim: int, head_v_dim: int,
                          precision=None) -> bool:
    """Whether `recurrence` ("xla", "pallas" or "auto") resolves to the Pallas kernel on these shapes:
    "pallas", or "auto" on a GPU backend for reduced-precision (TF32) matmuls -- Triton's float32
    (HIGHEST) dots skip the tensor cores and lose to XLA's scan (gdn_pallas) -- and a shape
    `gdn_pallas.supported` takes."""
    if recurrence not in RECURRENCES:
        raise ValueError(f"recurrence must be one of {RECURRENCES}, got {recurrence!r}")
    if recurrence == "auto":
        recurrence = "pallas" if _pallas_by_default(precision) else "xla"
    return recurrence == "pallas" and gdn_pallas.supported(sub_chunk, head_k_dim, head_v_dim)


def _pallas_by_default(precision) -> bool:
    """What "auto" means for the rule's kernels: Pallas on a GPU backend for reduced-precision (TF32)
    matmuls; Triton's float32 (HIGHEST) dots skip the tensor cores."""
    return jax.default_backend() == "gpu" and precision != jax.lax.Precision.HIGHEST


def use_pallas_solver(solver: str, sub_chunk: int, width: int, precision=None) -> bool:
    """Whether `solver` resolves to the Pallas UT solve (`gdn_solve_pallas`) for a [c, c] system with
    `width` right-hand columns: "pallas", or "auto" on a GPU backend for reduced-precision (TF32)
    matmuls, where `gdn_solve_pallas.supported` takes the shape."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":
        solver = "pallas" if _pallas_by_default(precision) else "doubling"
    return solver == "pallas" and gdn_solve_pallas.supported(sub_chunk, width)


def _recurrence_scan(u: Array, w: Array, k_to_end: Array, end_decay: Array, keep: Array,
                     state: Array, precision) -> tuple[Array, Array, Array]:
    """The sub-chunk state recursion as a `lax.scan` (shapes as `gdn_pallas.delta_recurrence_pallas`).

    Returns (final state f32[B, H, Dk, Dv], entering f32[n, B, H, Dk, Dv], v_new f32[n, B, H, c, Dv]).
    """
    def step(s, inputs):
        u_b, w_b, k_b, end_b, keep_b = inputs
        v_new = u_b - jnp.einsum("bhcd,bhde->bhce", w_b, s, precision=precision)
        s_new = end_b * s + jnp.einsum("bhcd,bhce->bhde", k_b, v_new, precision=precision)
        return jnp.where(keep_b, s_new, s), (s, v_new)

    state, (entering, v_new) = jax.lax.scan(step, state, (u, w, k_to_end, end_decay, keep))
    return state, entering, v_new


def _exits(entering: Array, final: Array, groups: int) -> Array:
    """The state after each of G chunks from the recursion's outputs: entering f32[n, B, H, Dk, Dv]
    (n sub-chunks, n / G per chunk) and the final state [B, H, Dk, Dv] -> f32[B, G, H, Dk, Dv]."""
    subs = entering.shape[0] // groups
    return jnp.moveaxis(jnp.concatenate([entering[subs::subs], final[None]], axis=0), 0, 1)


def _delta_rule_blocks(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array,
                       sub_valid: Array, sub_chunk: int, precision, solver: str,
                       recurrence: str = "xla", exits: tuple | None = None
                       ) -> tuple[Array, Array, Array, Array | None]:
    """The chunked gated delta rule over T tokens in sub-chunks of c (module docstring), float32.

    Every sub-chunk's intra terms (decays, the UT transform, the q k^T block) are computed at once;
    only the state recursion S -> S' runs over the T / c sub-chunks in order, each step the same two
    matmuls (a `lax.scan`, or one Pallas kernel with `recurrence` "pallas" / "auto" on a GPU), and
    the outputs are one batched product after it. A sub-chunk with no real token keeps the state bit
    for bit (explicit select), so a chunk's numbers never depend on what precedes or follows it in
    the call.

    Args:
      q, k: f32[B, T, H, Dk].  v: f32[B, T, H, Dv].  g, beta: f32[B, T, H] (0 at padded slots).
      state: f32[B, H, Dk, Dv].  sub_valid: bool[B, T // c], sub-chunks holding a real token.
      sub_chunk: c.  precision: of every matmul.  solver: the UT solve (see GDNConfig.solver).
      recurrence: "xla", "pallas" or "auto" (the state recursion; see GDNConfig.recurrence).
      exits: None, or (buffers f32[B, K, R, H, Dk, Dv], slot int32[B, G], layer int32 scalar): the T
        tokens are G chunks; the state after chunk g of row b goes to buffers[b, slot[b, g], layer]
        where slot[b, g] < K (written by the Pallas recursion itself, or by one scatter after the
        XLA scan).

    Returns:
      (o f32[B, T, H, Dv], final state f32[B, H, Dk, Dv], entering f32[T // c, B, H, Dk, Dv]: the
      state before each sub-chunk, the written buffers (None without `exits`)).
    """
    batch, total, heads, _ = k.shape
    dv = v.shape[-1]
    if total % sub_chunk:
        raise ValueError(f"chunk length {total} is not a multiple of sub_chunk {sub_chunk}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    n = total // sub_chunk

    def blocks(x):  # [B, T, H, ...] -> [n, B, H, c, ...]
        x = x.reshape((batch, n, sub_chunk) + x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 3, 2)

    q, k, v, g, beta = (blocks(x) for x in (q, k, v, g, beta))
    cum = jnp.cumsum(g, axis=-1)                                   # [n, B, H, c]
    causal = jnp.tril(jnp.ones((sub_chunk, sub_chunk), bool))
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    kk = jnp.einsum("...id,...jd->...ij", k, k, precision=precision)
    strict = jnp.tril(jnp.ones((sub_chunk, sub_chunk), bool), -1)
    lower = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(cum))[..., None] * k], axis=-1)
    if use_pallas_solver(solver, sub_chunk, rhs.shape[-1], precision):
        solved = gdn_solve_pallas.unit_lower_solve_pallas(lower, rhs, precision)
    elif solver in ("doubling", "pallas", "auto"):
        solved = jnp.matmul(unit_lower_inverse(lower, precision), rhs, precision=precision)
    else:
        system = lower + jnp.eye(sub_chunk, dtype=lower.dtype)
        solved = jax.lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True,
                                                 unit_diagonal=True)
    u, w = solved[..., :dv], solved[..., dv:]
    k_to_end = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    end_decay = jnp.exp(cum[..., -1])[..., None, None]
    keep = jnp.moveaxis(sub_valid, 1, 0)[:, :, None, None, None]   # [n, B, 1, 1, 1]
    written = None
    if use_pallas_recurrence(recurrence, sub_chunk, k.shape[-1], dv, precision):
        results = gdn_pallas.delta_recurrence_pallas(u, w, k_to_end, end_decay, keep, state,
                                                     precision, exits=exits)
        state, entering, v_new = results[:3]
        written = results[3] if exits is not None else None
    else:
        state, entering, v_new = _recurrence_scan(u, w, k_to_end, end_decay, keep, state, precision)
        if exits is not None:
            buffers, slot, layer = exits
            written = write_emitted(buffers, _exits(entering, state, slot.shape[1]), slot, layer)
    attn = jnp.einsum("...id,...jd->...ij", q, k, precision=precision) * decay
    q_decayed = q * jnp.exp(cum)[..., None]
    out = (jnp.einsum("...cd,...de->...ce", q_decayed, entering, precision=precision)
           + jnp.einsum("...ij,...je->...ie", attn, v_new, precision=precision))
    out = jnp.moveaxis(out, 3, 2).swapaxes(0, 1).reshape(batch, total, heads, dv)
    return out, state, entering, written


def gated_delta_chunked(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array,
                        sub_chunk: int, precision=jax.lax.Precision.HIGHEST, *, valid: Array | None = None,
                        solver: str = "doubling", recurrence: str = "xla") -> tuple[Array, Array]:
    """The gated delta rule over T tokens in sub-chunks of c (module docstring), float32.

    Args:
      q, k: f32[B, T, H, Dk] (q already normalised and scaled, k normalised; grouped to H heads).
      v: f32[B, T, H, Dv].  g: f32[B, T, H] log-decays (<= 0).  beta: f32[B, T, H].
        Padded slots must carry beta = 0 and g = 0 (then they leave the state unchanged).
      state: f32[B, H, Dk, Dv], the state before the first token.
      sub_chunk: c; T must be a multiple of it.  precision: of every matmul (see `rule_precision`).
      valid: bool[B, T] real slots (default all); a sub-chunk without one keeps the state bitwise.
      solver: the UT solve, "doubling" (`unit_lower_inverse`), "triangular" (`triangular_solve`),
        "pallas" (`gdn_solve_pallas`) or "auto" (see GDNConfig.solver).
      recurrence: the state recursion, "xla", "pallas" or "auto" (see GDNConfig.recurrence).

    Returns:
      (o f32[B, T, H, Dv], state after the T tokens f32[B, H, Dk, Dv]).
    """
    batch, total = k.shape[:2]
    if total % sub_chunk:
        raise ValueError(f"chunk length {total} is not a multiple of sub_chunk {sub_chunk}")
    if valid is None:
        valid = jnp.ones((batch, total), bool)
    sub_valid = jnp.any(valid.reshape(batch, total // sub_chunk, sub_chunk), axis=-1)
    out, state, _, _ = _delta_rule_blocks(q, k, v, g, beta, state, sub_valid, sub_chunk, precision,
                                          solver, recurrence)
    return out, state


def gated_delta_step(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array,
                     precision=jax.lax.Precision.HIGHEST) -> tuple[Array, Array]:
    """One token of the gated delta rule: q, k f32[B, H, Dk], v f32[B, H, Dv], g, beta f32[B, H].

    Returns (o f32[B, H, Dv], new state f32[B, H, Dk, Dv]).
    """
    state = state * jnp.exp(g)[..., None, None]
    memory = jnp.einsum("bhde,bhd->bhe", state, k, precision=precision)
    delta = beta[..., None] * (v - memory)
    state = state + k[..., :, None] * delta[..., None, :]
    return jnp.einsum("bhde,bhd->bhe", state, q, precision=precision), state


def gated_delta_sequential(q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array,
                           precision=jax.lax.Precision.HIGHEST) -> tuple[Array, Array]:
    """Reference backend: `gated_delta_step` scanned over the C tokens (same arguments as chunked)."""
    def step(s, inputs):
        out, s = gated_delta_step(*inputs, s, precision)
        return s, out

    inputs = tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, g, beta))
    state, out = jax.lax.scan(step, state, inputs)
    return jnp.swapaxes(out, 0, 1), state


BACKENDS = ("chunked", "sequential")


# ----------------------------------------------------------------------------- the mixer


def _project(params: dict, x: Array) -> tuple[Array, Array, Array, Array]:
    """x [..., d] -> (mixed qkv [..., Dc], z [..., Hv*Dv], b [..., Hv], a [..., Hv]) in x.dtype."""
    return tuple(jnp.einsum("...d,de->...e", x, params[name].astype(x.dtype))
                 for name in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"))


def _qkv_gates(params: dict, cfg: GDNConfig, mixed: Array, b: Array, a: Array, dtype):
    """Post-conv mixed qkv f32[..., Dc] -> float32 (q, k [..., Hv, Dk], v [..., Hv, Dv], g, beta [..., Hv])."""
    mixed = jax.nn.silu(mixed).astype(dtype).astype(jnp.float32)
    lead = mixed.shape[:-1]
    q = mixed[..., :cfg.key_dim].reshape(lead + (cfg.num_k_heads, cfg.head_k_dim))
    k = mixed[..., cfg.key_dim:2 * cfg.key_dim].reshape(lead + (cfg.num_k_heads, cfg.head_k_dim))
    v = mixed[..., 2 * cfg.key_dim:].reshape(lead + (cfg.num_v_heads, cfg.head_v_dim))
    q = _l2_normalise(q) * (cfg.head_k_dim ** -0.5)
    k = _l2_normalise(k)
    group = cfg.num_v_heads // cfg.num_k_heads
    if group > 1:
        q = jnp.repeat(q, group, axis=-2)
        k = jnp.repeat(k, group, axis=-2)
    beta = jax.nn.sigmoid(b.astype(jnp.float32))
    g = -jnp.exp(params["A_log"].astype(jnp.float32)) * jax.nn.softplus(
        a.astype(jnp.float32) + params["dt_bias"].astype(jnp.float32))
    return q, k, v, g, beta


def _gated_norm_out(params: dict, cfg: GDNConfig, o: Array, z: Array, dtype) -> Array:
    """Gated RMSNorm (normalise, weight, then * silu(z)) per value head, then out_proj -> [..., d]."""
    o = o.astype(dtype).astype(jnp.float32)
    normed = (o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + cfg.norm_eps)).astype(dtype)
    weighted = (params["norm_weight"].astype(dtype) * normed).astype(jnp.float32)
    z = z.reshape(z.shape[:-1] + (cfg.num_v_heads, cfg.head_v_dim)).astype(jnp.float32)
    gated = (weighted * jax.nn.silu(z)).astype(dtype)
    gated = gated.reshape(gated.shape[:-2] + (cfg.value_dim,))
    return jnp.einsum("...e,ed->...d", gated, params["out_proj"].astype(dtype))


def gdn_mixer_group(params: dict, cfg: GDNConfig, x: Array, state: RecurrentState, valid: Array,
                    want_boundaries: bool = False, *, backend: str = "chunked",
                    emit: EmitTarget | None = None
                    ) -> tuple[Array, RecurrentState, RecurrentState | None]:
    """The GDN mixer over G consecutive chunks of a prefill layout at once (the prefill path).

    Projections, gates and out_proj run as single matmuls over all B*G*C rows; each chunk's conv
    reads its own window (the last W-1 real inputs before it, `group_conv`); every chunk's intra
    terms are batched over the G chunks; the state passes chunk to chunk in order (a scan over the
    sub-chunks, the same step for each), so a chunk's numbers do not depend on its position in
    the group.

    Args:
      params: `init_gdn_params` layout.  x: [B, G, C, d] (already normed; compute dtype).
      state: RecurrentState(ssm f32[B, Hv, Dk, Dv], conv [B, W-1, Dc]) before the first chunk.
      valid: bool[B, G, C]; each chunk's valid slots are a prefix (a chunk may be all padding).
        Padded slots leave the state exactly unchanged.
      want_boundaries: also return the state after each chunk (a static Python bool).
      backend: "chunked" (UT transform in sub-chunks) or "sequential" (token scan reference).
      emit: None, or where to write the state after each chunk instead of returning it
        (`EmitTarget`: buffers RecurrentState(ssm f32[B, K, R, Hv, Dk, Dv], conv [B, K, R, W-1, Dc]),
        slot int32[B, G], layer): the Pallas recursion writes the ssm states from inside its loop,
        the conv windows take one scatter (`write_emitted` semantics).

    Returns:
      (y [B, G, C, d] in x.dtype (garbage at padded slots), state after the last chunk,
      boundaries: RecurrentState with leaves [B, G, ...] when `want_boundaries`; the written
      buffers with `emit`; else None).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dtype = x.dtype
    batch, group, chunk = valid.shape
    n_valid = jnp.sum(valid, axis=2, dtype=jnp.int32)                        # [B, G]
    mixed, z, b, a = _project(params, x)
    mixed, windows = causal_conv_group(mixed, state.conv, params["conv_weight"], None, n_valid)
    q, k, v, g, beta = _qkv_gates(params, cfg, mixed, b, a, dtype)
    mask = valid[..., None]
    beta = jnp.where(mask, beta, 0.0)
    g = jnp.where(mask, g, 0.0)
    k = jnp.where(mask[..., None], k, 0.0)
    precision = rule_precision(dtype)
    want_boundaries = want_boundaries or emit is not None
    written = None
    if backend == "chunked":
        flat = lambda t: t.reshape((batch, group * chunk) + t.shape[3:])  # noqa: E731
        subs = chunk // cfg.sub_chunk
        sub_valid = jnp.any(valid.reshape(batch, group * subs, cfg.sub_chunk), axis=-1)
        o, ssm, entering, written = _delta_rule_blocks(
            flat(q), flat(k), flat(v), flat(g), flat(beta), state.ssm, sub_valid, cfg.sub_chunk,
            precision, cfg.solver, cfg.recurrence,
            None if emit is None else (emit.buffers.ssm, emit.slot, emit.layer))
        o = o.reshape((batch, group, chunk) + o.shape[2:])
        exits = _exits(entering, ssm, group) if want_boundaries and written is None else None
    else:
        def per_chunk(s, inputs):
            q_c, k_c, v_c, g_c, beta_c, real = inputs
            o_c, s_new = gated_delta_sequential(q_c, k_c, v_c, g_c, beta_c, s, precision)
            s = jnp.where(real[:, None, None, None], s_new, s)
            return s, (o_c, s)

        inputs = tuple(jnp.swapaxes(t, 0, 1) for t in (q, k, v, g, beta, n_valid > 0))
        ssm, (o, exits) = jax.lax.scan(per_chunk, state.ssm, inputs)
        o, exits = jnp.swapaxes(o, 0, 1), jnp.moveaxis(exits, 0, 1)
    y = _gated_norm_out(params, cfg, o, z, dtype)
    final = RecurrentState(ssm=ssm, conv=windows[:, -1])
    if not want_boundaries:
        return y, final, None
    if emit is None:
        return y, final, RecurrentState(ssm=exits, conv=windows)
    if written is None:
        written = write_emitted(emit.buffers.ssm, exits, emit.slot, emit.layer)
    conv = write_emitted(emit.buffers.conv, windows, emit.slot, emit.layer)
    return y, final, RecurrentState(ssm=written, conv=conv)


def gdn_mixer_chunk(params: dict, cfg: GDNConfig, x: Array, state: RecurrentState, valid: Array,
                    *, backend: str = "chunked") -> tuple[Array, RecurrentState]:
    """The GDN mixer over one chunk whose valid slots are a prefix: `gdn_mixer_group` with G = 1.

    Args:
      params: `init_gdn_params` layout.  x: [B, C, d] (already normed; compute dtype).
      state: RecurrentState(ssm f32[B, Hv, Dk, Dv], conv [B, W-1, Dc]).
      valid: bool[B, C], a prefix of each row. Padded slots leave the state exactly unchanged.
      backend: "chunked" (UT transform in sub-chunks) or "sequential" (token scan reference).

    Returns:
      (y [B, C, d] in x.dtype (garbage at padded slots), new RecurrentState).
    """
    y, state, _ = gdn_mixer_group(params, cfg, x[:, None], state, valid[:, None], backend=backend)
    return y[:, 0], state


def gdn_mixer_step(params: dict, cfg: GDNConfig, x: Array, state: RecurrentState
                   ) -> tuple[Array, RecurrentState]:
    """One token: x [B, d] (normed, compute dtype) -> (y [B, d], new RecurrentState)."""
    dtype = x.dtype
    mixed, z, b, a = _project(params, x)
    mixed, window = causal_conv_step(mixed, state.conv, params["conv_weight"], None)
    q, k, v, g, beta = _qkv_gates(params, cfg, mixed, b, a, dtype)
    o, ssm = gated_delta_step(q, k, v, g, beta, state.ssm, rule_precision(dtype))
    return _gated_norm_out(params, cfg, o, z, dtype), RecurrentState(ssm=ssm, conv=window)
