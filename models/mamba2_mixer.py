"""The Mamba2 mixer as pure functions: config, weights, one chunk (prefill) and one token (decode).

This is the reusable unit: `sparse_prefix.models.mamba2` stacks it into a language model, and hybrid
stacks (Mamba2 + attention) call the same functions per Mamba2 layer:

    params = init_mamba2_mixer(key, cfg, dtype)                  # MixerParams
    state = mamba2_mixer_state(cfg, batch, dtype)                # RecurrentState(ssm f32, conv)
    y, state, bounds = mamba2_mixer_group(params, cfg, x[B, Q, C, d], state, valid[B, Q, C],
                                          want_boundaries)       # Q chunks at once
    y, state = mamba2_mixer_chunk(params, cfg, x[B, C, d], state, valid[B, C])   # Q = 1
    y, state = mamba2_mixer_decode(params, cfg, x[B, d], state)

The group form runs Q consecutive chunks of a prefill layout together (the chunks per step G of
`sparse_prefix.chunking`; Q here because G is the mixer's ngroups): projections as one matmul over
all B Q C rows, each chunk's conv from its own window, SSD batched over the chunks with the state
passed chunk to chunk in order -- every chunk's numbers are the same wherever it sits in the group.

Numerics follow state-spaces/mamba and HF `Mamba2ForCausalLM`: matmuls in the compute dtype of `x`
with float32 accumulation; the conv accumulates in float32 and its activated output (x, B, C of
SSD) is stored in the compute dtype, as state-spaces' causal_conv1d does (half the bytes for a bf16
model); dt, decays, SSD accumulation, gated norm and the recurrent state in float32; the gated
RMSNorm is HF's MambaRMSNormGated (gate before norm, normalised per group of E/G channels).

Shape legend: see `sparse_prefix.protocol`; here also E = d_inner = expand * d, Dp = in_proj width
= 2 E + 2 G N + H, Dc = conv channels = E + 2 G N, G = ngroups.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.chunking import write_emitted
from sparse_prefix.protocol import RecurrentState

from .group_conv import causal_conv_group, group_windows
from .layers import causal_conv_step
from .ssd import full_precision, ssd_chunks, ssd_scan_chunks, ssd_step

Array = jax.Array
BACKENDS = ("auto", "chunked", "pallas", "sequential")


@dataclasses.dataclass(frozen=True)
class Mamba2MixerConfig:
    """One Mamba2 mixer (the state-spaces defaults). Hashable: jit caches key on it.

    Attributes:
      d_model: d. d_state: N. d_conv: W. expand: E / d. headdim: P. ngroups: G.
      norm_eps: epsilon of the gated RMSNorm. dt_limit: (min, max) clamp of dt after softplus.
      use_bias: biases on in_proj / out_proj. conv_bias: bias on the depthwise conv.
      backend: "chunked" (quadratic SSD form per chunk, pure JAX), "pallas" (the same on the GPU
        with the Pallas kernels of `ssd_pallas` where the shapes qualify -- else "chunked" -- and
        Pallas' interpreter off the GPU), "auto" (the default: "pallas" on a GPU for a model that
        is not float32, whose dots would run at IEEE precision in Triton; "chunked" elsewhere) or
        "sequential" (token scan reference).
    """

    d_model: int
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    norm_eps: float = 1e-5
    dt_limit: tuple[float, float] = (0.0, math.inf)
    use_bias: bool = False
    conv_bias: bool = True
    backend: str = "auto"

    def __post_init__(self):
        for field in ("d_model", "d_state", "d_conv", "expand", "headdim", "ngroups"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"{field} must be a positive int, got {getattr(self, field)!r}")
        if self.d_inner % self.headdim:
            raise ValueError(f"d_inner {self.d_inner} is not a multiple of headdim {self.headdim}")
        if self.nheads % self.ngroups:
            raise ValueError(f"nheads {self.nheads} is not a multiple of ngroups {self.ngroups}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_size(self) -> int:
        return self.d_inner + self.conv_dim + self.nheads


class MixerParams(NamedTuple):
    """One mixer's weights (kernels laid out for x @ W).

    in_proj [d, Dp], in_proj_bias [Dp] | None, conv_weight [W, Dc] (row W-1 multiplies the current
    input), conv_bias [Dc] | None, dt_bias / A_log / D float32[H], norm [E] (gated RMSNorm),
    out_proj [E, d], out_proj_bias [d] | None.
    """

    in_proj: Array
    in_proj_bias: Array | None
    conv_weight: Array
    conv_bias: Array | None
    dt_bias: Array
    A_log: Array
    D: Array
    norm: Array
    out_proj: Array
    out_proj_bias: Array | None


def _uniform_fields(key: Array, shapes: dict[str, tuple[int, ...]], dtype) -> dict[str, Array]:
    """U[-1, 1) arrays of the given shapes from ONE random draw (each draw costs a compile)."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
    offsets = np.cumsum([0] + sizes)
    return {name: flat[offsets[i]:offsets[i + 1]].reshape(shape)
            for i, (name, shape) in enumerate(shapes.items())}


def init_mamba2_mixer(key: Array, cfg: Mamba2MixerConfig, dtype=jnp.bfloat16, *,
                      out_scale: float = 1.0, layers: int | None = None) -> MixerParams:
    """Random mixer weights, the state-spaces initialisation (torch Linear/Conv1d defaults, dt in
    [1e-3, 0.1] log-uniform through an inverse softplus bias, A uniform in [1, 16], D = 1).

    Args:
      key: PRNG key. cfg: the mixer. dtype: weight dtype (dt_bias, A_log, D stay float32).
      out_scale: multiplies out_proj (state-spaces uses 1/sqrt(n_layer)).
      layers: if given, every leaf gets a leading [layers] axis (independent layers, stacked).
    """
    lead = () if layers is None else (layers,)
    k_big, k_small = jax.random.split(key)
    big = _uniform_fields(k_big, {"in_proj": lead + (cfg.d_model, cfg.in_proj_size),
                                  "conv_weight": lead + (cfg.d_conv, cfg.conv_dim),
                                  "conv_bias": lead + (cfg.conv_dim,),
                                  "out_proj": lead + (cfg.d_inner, cfg.d_model)}, dtype)
    small = _uniform_fields(k_small, {"dt": lead + (cfg.nheads,), "A": lead + (cfg.nheads,)},
                            jnp.float32)
    unit = lambda x: (x + 1.0) / 2.0  # noqa: E731  U[-1, 1) -> U[0, 1)
    dt = jnp.exp(unit(small["dt"]) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt = jnp.maximum(dt, 1e-4)
    width_bound = 1.0 / math.sqrt(cfg.d_conv)
    return MixerParams(
        in_proj=big["in_proj"] * jnp.asarray(1 / math.sqrt(cfg.d_model), dtype),
        in_proj_bias=jnp.zeros(lead + (cfg.in_proj_size,), dtype) if cfg.use_bias else None,
        conv_weight=big["conv_weight"] * jnp.asarray(width_bound, dtype),
        conv_bias=big["conv_bias"] * jnp.asarray(width_bound, dtype) if cfg.conv_bias else None,
        dt_bias=dt + jnp.log(-jnp.expm1(-dt)),
        A_log=jnp.log(1.0 + 15.0 * unit(small["A"])),
        D=jnp.ones(lead + (cfg.nheads,), jnp.float32),
        norm=jnp.ones(lead + (cfg.d_inner,), dtype),
        out_proj=big["out_proj"] * jnp.asarray(out_scale / math.sqrt(cfg.d_inner), dtype),
        out_proj_bias=jnp.zeros(lead + (cfg.d_model,), dtype) if cfg.use_bias else None,
    )


def mamba2_mixer_state(cfg: Mamba2MixerConfig, batch: int, dtype=jnp.bfloat16) -> RecurrentState:
    """Zero state of one mixer: ssm float32[B, H, P, N], conv window [B, W-1, Dc] in `dtype`."""
    return RecurrentState(
        ssm=jnp.zeros((batch, cfg.nheads, cfg.headdim, cfg.d_state), jnp.float32),
        conv=jnp.zeros((batch, cfg.d_conv - 1, cfg.conv_dim), dtype))


# ----------------------------------------------------------------------------- the mixer


def _linear(x: Array, kernel: Array, bias: Array | None) -> Array:
    """x [..., i] @ kernel [i, o] (+ bias) with float32 accumulation, returned in x.dtype."""
    y = jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32,
                   precision=full_precision(x.dtype))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def gated_rms_norm(y: Array, gate: Array, weight: Array, groups: int, eps: float) -> Array:
    """HF MambaRMSNormGated (norm_before_gate=False): RMSNorm per group of (y * silu(gate)) * weight.

    Args:
      y: [..., E] float32. gate: [..., E]. weight: [E]. groups: G (each group of E/G normalised alone).

    Returns:
      float32[..., E].
    """
    gated = y.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))
    grouped = gated.reshape(gated.shape[:-1] + (groups, gated.shape[-1] // groups))
    grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, axis=-1, keepdims=True) + eps)
    return grouped.reshape(gated.shape) * weight.astype(jnp.float32)


def _split_projection(cfg: Mamba2MixerConfig, zxbcdt: Array) -> tuple[Array, Array, Array]:
    """in_proj output [..., Dp] -> (z [..., E], xBC [..., Dc], dt [..., H])."""
    return jnp.split(zxbcdt, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)


def _split_conv(cfg: Mamba2MixerConfig, xbc: Array) -> tuple[Array, Array, Array]:
    """Activated conv output [..., Dc] -> (x [..., H, P], B [..., G, N], C [..., G, N])."""
    gn = cfg.ngroups * cfg.d_state
    x, b, c = jnp.split(xbc, [cfg.d_inner, cfg.d_inner + gn], axis=-1)
    lead = xbc.shape[:-1]
    return (x.reshape(lead + (cfg.nheads, cfg.headdim)), b.reshape(lead + (cfg.ngroups, cfg.d_state)),
            c.reshape(lead + (cfg.ngroups, cfg.d_state)))


def _time_step(params: MixerParams, cfg: Mamba2MixerConfig, dt_raw: Array) -> Array:
    """softplus(dt + dt_bias) clamped to dt_limit, float32[..., H]."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + params.dt_bias.astype(jnp.float32))
    low, high = cfg.dt_limit
    return jnp.clip(dt, low, high)


def _gated_output(params: MixerParams, cfg: Mamba2MixerConfig, y: Array, z: Array, dtype) -> Array:
    """Gated norm and out_proj: y [..., E] (SSD output with the D skip), z [..., E] -> [..., d]."""
    normed = gated_rms_norm(y, z, params.norm, cfg.ngroups, cfg.norm_eps)
    return _linear(normed.astype(dtype), params.out_proj, params.out_proj_bias)


def _mixer_output(params: MixerParams, cfg: Mamba2MixerConfig, y: Array, x: Array, z: Array,
                  dtype) -> Array:
    """D skip, gated norm and out_proj: y float32 and x [..., H, P], z [..., E] -> [..., d] in dtype.

    y + D x is rounded to `dtype` before the gated norm, as state-spaces' SSD kernels return it."""
    y = (y + params.D.astype(jnp.float32)[:, None] * x).astype(dtype)
    return _gated_output(params, cfg, y.reshape(y.shape[:-2] + (cfg.d_inner,)), z, dtype)


def ssd_backend(backend: str, dtype, platform: str) -> str:
    """The SSD backend a mixer of `backend` runs for operands of `dtype` on `platform` ("gpu",
    "cpu", ...): "auto" is "pallas" on a GPU unless the operands are float32 (IEEE float32 dots in
    Triton are an order of magnitude slower than XLA's), else "chunked"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    return "pallas" if platform == "gpu" and jnp.dtype(dtype) != jnp.float32 else "chunked"


def uses_kernels(cfg: Mamba2MixerConfig, chunks: int, length: int, dtype) -> bool:
    """Whether `mamba2_mixer_group` on `chunks` chunks of `length` tokens in `dtype` runs the GPU
    (Pallas) kernels: when `ssd_backend` says so and the shapes qualify (Pallas is imported only
    then: its import costs ~1 s)."""
    if ssd_backend(cfg.backend, dtype, jax.default_backend()) != "pallas":
        return False
    from .ssd_pallas import supported
    return supported(chunks, length, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.d_inner)


def _pallas_mixer(params: MixerParams, cfg: Mamba2MixerConfig, proj: Array, state: RecurrentState,
                  valid: Array, n_valid: Array, dt: Array, a: Array, want_exits: bool,
                  emit_ssm=None) -> tuple[Array, Array | None, Array, Array, Array | None]:
    """The mixer after in_proj on the GPU kernels (`mixer_pallas`, `ssd_pallas`); each stage falls
    back to XLA where its kernel does not take the shapes (dt / a: XLA's time steps for that case).

    Args:
      proj: [B, Q, C, Dp] the in_proj output in the compute dtype. state: the layer's state.
      valid: bool[B, Q, C]. n_valid: int32[B, Q]. dt: float32[B, Q, C, H]. a: float32[H].
      want_exits: also return the SSM state after every chunk.
      emit_ssm: None, or (buffers float32[B, K, H, P, N], slot int32[B, Q]) for the chain kernel to
        write each emitting chunk's exit into its slot in place (K a power of two).

    Returns:
      (y [B, Q, C, d] after out_proj, exits float32[B, Q, H, P, N] or None, final SSM state
      float32[B, H, P, N], conv windows [B, Q, W-1, Dc] after each chunk, the emitted SSM buffers
      with this call's states written (None without `emit_ssm`)).
    """
    from . import mixer_pallas
    from .ssd_pallas import ssd_chunks_pallas, time_steps
    z, xbc, _ = _split_projection(cfg, proj)
    chunk = proj.shape[2]
    dt_first = cfg.d_inner + cfg.conv_dim
    if mixer_pallas.time_steps_supported(dt_first, cfg.nheads):
        dt_t, cum_t = mixer_pallas.time_steps_pallas(proj, dt_first, params.dt_bias, params.A_log,
                                                     valid, cfg.dt_limit)
    else:
        dt_t, cum_t = time_steps(dt, a)
    if mixer_pallas.conv_supported(chunk, cfg.d_inner, cfg.conv_dim, cfg.d_conv):
        entering, windows = group_windows(state.conv, xbc, n_valid)
        activated = mixer_pallas.conv_silu_pallas(proj, cfg.d_inner, cfg.conv_dim, entering,
                                                  params.conv_weight, params.conv_bias)
    else:
        conv, windows = causal_conv_group(xbc, state.conv, params.conv_weight, params.conv_bias,
                                          n_valid)
        activated = jax.nn.silu(conv).astype(proj.dtype)
    y, exits, final, emitted = ssd_chunks_pallas(
        activated, dt_t, cum_t, state.ssm, params.D.astype(jnp.float32), heads=cfg.nheads,
        head_dim=cfg.headdim, groups=cfg.ngroups, state_size=cfg.d_state, matmul_dtype=proj.dtype,
        want_exits=want_exits, emit=emit_ssm)
    if mixer_pallas.norm_supported(chunk, cfg.d_inner, cfg.ngroups):
        normed = mixer_pallas.gated_norm_pallas(y, proj, params.norm, cfg.ngroups, cfg.norm_eps)
        out = _linear(normed, params.out_proj, params.out_proj_bias)
    else:
        out = _gated_output(params, cfg, y, z, proj.dtype)
    return out, exits, final, windows, emitted


def mamba2_mixer_group(params: MixerParams, cfg: Mamba2MixerConfig, x: Array, state: RecurrentState,
                       valid: Array, want_boundaries: bool = False, *, emit=None
                       ) -> tuple[Array, RecurrentState, RecurrentState | None]:
    """Q consecutive chunks through one mixer (the prefill path).

    Args:
      params: one layer's `MixerParams`. cfg: the mixer config.
      x: [B, Q, C, d] normalised block input in the compute dtype, chunk after chunk.
      state: this layer's `RecurrentState` before the first chunk (ssm float32[B, H, P, N],
        conv [B, W-1, Dc]).
      valid: bool[B, Q, C]; each chunk's valid slots are a prefix of it (a chunk may be all
        padding); padded slots leave the state exactly unchanged.
      want_boundaries: also return the state after each chunk (a static Python bool).
      emit: None, or (buffers, slot): this layer's checkpoint buffers (a `RecurrentState` with
        leaves [B, K, ...]) and int32[B, Q], the slot the state after chunk q is written to (K: not
        emitted) -- the opt-in emission of `sparse_prefix.chunking.run_chunks`; exclusive with
        `want_boundaries`. With `buffers.conv` None the conv windows are not written here: the
        third result's conv is then every chunk's window [B, Q, W-1, Dc], for the caller to write
        (Mamba2LM writes all layers' at once).

    Returns:
      (y [B, Q, C, d] in x.dtype -- garbage on padded slots --, the state after the last chunk,
      third: with `want_boundaries` a `RecurrentState` with leaves [B, Q, ...] (the state after
      each chunk); with `emit` the buffers with the emitted states written in; else None).
    """
    if want_boundaries and emit is not None:
        raise ValueError("want_boundaries and emit are exclusive")
    proj = _linear(x, params.in_proj, params.in_proj_bias)
    z, xbc, dt_raw = _split_projection(cfg, proj)
    n_valid = jnp.sum(valid, axis=2, dtype=jnp.int32)                                 # [B, Q]
    dt = jnp.where(valid[..., None], _time_step(params, cfg, dt_raw), 0.0)
    a = -jnp.exp(params.A_log.astype(jnp.float32))
    per_chunk = want_boundaries or emit is not None
    if uses_kernels(cfg, x.shape[1], x.shape[2], x.dtype):
        # Emission straight from the chain kernel (no exits materialised, no scatter of them)
        # when the slot count is a power of two, as the models' checkpoint buckets are by default.
        slots = 0 if emit is None else emit[0].ssm.shape[1]
        in_kernel = slots > 0 and slots & (slots - 1) == 0
        out, exits, final, windows, emitted_ssm = _pallas_mixer(
            params, cfg, proj, state, valid, n_valid, dt, a, per_chunk and not in_kernel,
            (emit[0].ssm, emit[1]) if in_kernel else None)
    else:
        emitted_ssm = None
        conv, windows = causal_conv_group(xbc, state.conv, params.conv_weight, params.conv_bias,
                                          n_valid)
        xs, b, c = _split_conv(cfg, jax.nn.silu(conv).astype(x.dtype))
        if cfg.backend == "sequential":
            y, exits, final = ssd_scan_chunks(xs, dt, a, b, c, state.ssm)
        else:
            y, exits, final = ssd_chunks(xs, dt, a, b, c, state.ssm, matmul_dtype=x.dtype,
                                         want_exits=per_chunk)
        out = _mixer_output(params, cfg, y, xs, z, x.dtype)
    final = RecurrentState(ssm=final, conv=windows[:, -1])
    third = None
    if want_boundaries:
        third = RecurrentState(ssm=exits, conv=windows)
    elif emit is not None:
        buffers, slot = emit
        # the chain kernel wrote the emitted SSM states (emitted_ssm), or they are scattered here
        ssm = emitted_ssm if emitted_ssm is not None else write_emitted(buffers.ssm, exits, slot)
        conv = windows if buffers.conv is None else write_emitted(buffers.conv, windows, slot)
        third = RecurrentState(ssm=ssm, conv=conv)
    return out, final, third


def mamba2_mixer_chunk(params: MixerParams, cfg: Mamba2MixerConfig, x: Array, state: RecurrentState,
                       valid: Array) -> tuple[Array, RecurrentState]:
    """One chunk through one mixer: `mamba2_mixer_group` with Q = 1.

    Args:
      params: one layer's `MixerParams`. cfg: the mixer config.
      x: [B, C, d] normalised block input in the compute dtype.
      state: this layer's `RecurrentState` (ssm float32[B, H, P, N], conv [B, W-1, Dc]).
      valid: bool[B, C], a prefix of each row; padded slots leave the state exactly unchanged.

    Returns:
      (y [B, C, d] in x.dtype -- garbage on padded slots --, the state after the chunk's real tokens).
    """
    y, state, _ = mamba2_mixer_group(params, cfg, x[:, None], state, valid[:, None])
    return y[:, 0], state


def mamba2_mixer_decode(params: MixerParams, cfg: Mamba2MixerConfig, x: Array, state: RecurrentState
                        ) -> tuple[Array, RecurrentState]:
    """One token through one mixer, closed form: x [B, d] -> (y [B, d], state)."""
    z, xbc, dt_raw = _split_projection(cfg, _linear(x, params.in_proj, params.in_proj_bias))
    conv, window = causal_conv_step(xbc, state.conv, params.conv_weight, params.conv_bias)
    xs, b, c = _split_conv(cfg, jax.nn.silu(conv).astype(x.dtype))
    a = -jnp.exp(params.A_log.astype(jnp.float32))
    y, ssm = ssd_step(xs, _time_step(params, cfg, dt_raw), a, b, c, state.ssm)
    return _mixer_output(params, cfg, y, xs, z, x.dtype), RecurrentState(ssm=ssm, conv=window)
