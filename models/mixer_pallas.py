"""Pallas (Triton) kernels for the elementwise ends of a Mamba2 mixer on the GPU: the causal conv
with its SiLU, and the gated RMSNorm -- both reading the in_proj output as laid out.

Why kernels for elementwise work: on mamba2-1.3b (H200, jax 0.11.2) XLA laid the conv out
token-minor (a transpose emitter per layer and step, 178 us for 18 MB) and the gated norm
channel-major, because of how it chose the layouts of the neighbouring dots and custom calls. A
kernel's operands and outputs are row-major by construction, so these passes read and write each
tensor once in its natural [tokens, channels] layout.

  * `conv_silu_pallas` -- the depthwise causal conv of every chunk of a group from its own entering
    window (the same windows as `group_conv.causal_conv_group`), plus bias and SiLU, written in the
    compute dtype. Per (chunk, block of channels, run of rows) the rows go in blocks of `ROWS`; a
    tap's shifted rows are loaded at an offset, except in a chunk's first block, where they come
    from the block and the chunk's window through 0/1 shift matrices on the tensor cores (an
    exact copy: one 1 per row, float32 accumulation; Triton cannot shift a register tile along
    its rows).
  * `gated_norm_pallas` -- HF's MambaRMSNormGated (norm_before_gate=False): per row and group of
    E/G channels, g = y silu(z), g rsqrt(mean(g^2) + eps) w; one pass when a group row fits one
    tile, else two over its pieces (sum of squares, then the scaled output).

Exactness: every program reads only its own chunk (and that chunk's window) with the same
operations wherever the chunk sits in the group, so a resume on the chunk grid stays bitwise. The
numbers differ from the XLA path by rounding only (the norm's sum order, exp implementations).
On a machine without a GPU the kernels run in Pallas' interpreter (tests compare them there with
the XLA path). `conv_supported` / `norm_supported` tell whether a shape qualifies.

Shape legend: B batch rows, Q chunks per step, C chunk length, Dp in_proj width, Dc conv channels,
E = d_inner, G groups of the norm, W conv width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .pallas_common import dot_precision, interpret, is_pow2

Array = jax.Array

ROWS = 16            # conv rows per block (the shift matrices are [ROWS, ROWS]; Triton dots need >= 16)
CHANNELS = 64        # conv channels per program (at most; an H200 sweep: 21.7 us vs 23.4 for 128)
NORM_ROWS = 1        # norm rows per program, and columns per piece (more pieces: two passes). On
NORM_COLUMNS = 4096  # an H200 at mamba2-1.3b's E = 4096: 14 us vs 36 us for 8 rows x 512 columns


def _silu(x: Array) -> Array:
    return x / (1.0 + jnp.exp(-x))


def _channel_block(first_channel: int, channels: int, most: int = CHANNELS) -> int:
    """The largest power of two <= `most` dividing both the channel offset and count (0: none of
    at least 16)."""
    block = most
    while block >= 16 and (channels % block or first_channel % block):
        block //= 2
    return block if block >= 16 else 0


def conv_supported(chunk: int, first_channel: int, channels: int, width: int) -> bool:
    """Whether `conv_silu_pallas` takes a chunk length, channel offset / count and conv width."""
    return (is_pow2(chunk) and chunk >= ROWS and _channel_block(first_channel, channels) > 0
            and 2 <= width <= ROWS + 1)


def norm_supported(rows: int, inner: int, groups: int) -> bool:
    """Whether `gated_norm_pallas` takes rows per chunk, E and G (power-of-two group widths)."""
    width = inner // groups if inner % groups == 0 else 0
    return is_pow2(width) and width >= 16 and rows % min(NORM_ROWS, rows) == 0 and is_pow2(rows)


# ----------------------------------------------------------------------------- the conv


def _conv_kernel(x_ref, window_ref, weight_ref, bias_ref, out_ref, *, width: int, rows: int,
                 precision):
    taps = [weight_ref[i, :].astype(jnp.float32) for i in range(width)]             # [BD] each
    bias = bias_ref[...].astype(jnp.float32)
    row = jax.lax.broadcasted_iota(jnp.int32, (ROWS, ROWS), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (ROWS, ROWS), 1)
    dtype = x_ref.dtype
    first_row = pl.program_id(2) * rows

    def from_window(start, current):
        # The chunk's first block: row r reads the block's row r - s, or for r < s the window's
        # row ROWS + r - s, through 0/1 shift matrices (Triton cannot shift a tile along rows).
        window = window_ref[...].astype(dtype)
        return [jnp.dot((col == row - s).astype(dtype), current, precision=precision,
                        preferred_element_type=jnp.float32)
                + jnp.dot((col == ROWS + row - s).astype(dtype), window, precision=precision,
                          preferred_element_type=jnp.float32)
                for s in range(1, width)]

    def from_memory(start, current):
        # Any later block: the shifted rows are the chunk's own, loaded at an offset.
        del current
        return [x_ref[pl.ds(start - s, ROWS), :].astype(jnp.float32) for s in range(1, width)]

    def block(k, carry):
        start = pl.multiple_of(first_row + k * ROWS, ROWS)
        current = x_ref[pl.ds(start, ROWS), :]                                       # [R, BD]
        shifted = jax.lax.cond(start == 0, from_window, from_memory, start, current)  # s = 1..W-1
        total = jnp.zeros(current.shape, jnp.float32)
        for i in range(width):
            shift = width - 1 - i
            term = current.astype(jnp.float32) if shift == 0 else shifted[shift - 1]
            total = total + term * taps[i][None, :]
        out_ref[pl.ds(start, ROWS), :] = _silu(total + bias[None, :]).astype(out_ref.dtype)
        return carry

    jax.lax.fori_loop(0, rows // ROWS, block, 0)


def conv_silu_pallas(proj: Array, first_channel: int, channels: int, entering: Array, weight: Array,
                     bias: Array | None, *, rows_per_program: int = 64,
                     channels_per_program: int = CHANNELS, num_warps: int = 4) -> Array:
    """SiLU(depthwise causal conv + bias) of every chunk, from its own entering window.

    Args:
      proj: [B, Q, C, Dp] the in_proj output; the conv input is channels [first_channel,
        first_channel + channels) of it (xBC), read in place.
      first_channel, channels: where xBC starts in Dp and its width Dc.
      entering: [B, Q, W-1, Dc] each chunk's window (its last W-1 real inputs before it, oldest
        first: `group_conv.group_windows`).
      weight: [W, Dc] taps (row W-1 multiplies the current input). bias: [Dc] or None.
      rows_per_program: chunk rows one program convolves (a multiple of ROWS, clipped to C).
      channels_per_program: at most this many channels per program (a power of two).
      num_warps: Triton warps per program.

    Returns:
      [B, Q, C, Dc] in proj.dtype: SiLU of the conv (garbage on padded slots, as the XLA path).
    """
    batch, chunks, chunk, _ = proj.shape
    width = weight.shape[0]
    block = _channel_block(first_channel, channels, channels_per_program)
    if not block:
        raise ValueError(f"no channel block of 16..{channels_per_program} divides channels {channels} "
                         f"and offset {first_channel} (see conv_supported)")
    keep = width - 1
    window = jnp.pad(entering.astype(proj.dtype), ((0, 0), (0, 0), (ROWS - keep, 0), (0, 0)))
    taps = 1 << (width - 1).bit_length()
    if taps != width:   # the kernel converts weight and bias to float32 itself (no extra XLA passes)
        weight = jnp.pad(weight, ((0, taps - width), (0, 0)))
    bias = jnp.zeros((channels,), weight.dtype) if bias is None else bias
    first = first_channel // block
    rows = min(max(rows_per_program // ROWS, 1) * ROWS, chunk)
    if chunk % rows:
        raise ValueError(f"rows_per_program {rows_per_program} does not divide the chunk {chunk} in "
                         f"blocks of {ROWS}")
    kernel = functools.partial(_conv_kernel, width=width, rows=rows, precision=dot_precision(proj.dtype))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((batch, chunks, chunk, channels), proj.dtype),
        grid=(batch * chunks, channels // block, chunk // rows),
        in_specs=[pl.BlockSpec((None, None, chunk, block),
                               lambda bq, j, r: (bq // chunks, bq % chunks, 0, first + j)),
                  pl.BlockSpec((None, None, ROWS, block),
                               lambda bq, j, r: (bq // chunks, bq % chunks, 0, j)),
                  pl.BlockSpec((taps, block), lambda bq, j, r: (0, j)),
                  pl.BlockSpec((block,), lambda bq, j, r: (j,))],
        out_specs=pl.BlockSpec((None, None, chunk, block),
                               lambda bq, j, r: (bq // chunks, bq % chunks, 0, j)),
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="mamba2_conv_silu",
    )(proj, window, weight, bias)


# ----------------------------------------------------------------------------- the gated norm


def _norm_kernel(y_ref, z_ref, weight_ref, out_ref, *, width: int, piece: int, eps: float):
    pieces = width // piece

    def gated(k):
        cols = pl.ds(0 if isinstance(k, int) else pl.multiple_of(k * piece, piece), piece)
        z = z_ref[:, cols].astype(jnp.float32)
        return y_ref[:, cols].astype(jnp.float32) * _silu(z), cols

    def output(g, cols, scale):
        w = weight_ref[cols].astype(jnp.float32)
        out_ref[:, cols] = (g * scale[:, None] * w[None, :]).astype(out_ref.dtype)

    if pieces == 1:  # the whole group row in registers: one read of y and z
        g, cols = gated(0)
        output(g, cols, jax.lax.rsqrt(jnp.sum(g * g, axis=1) / width + eps))
        return

    def square_sum(k, total):
        g, _ = gated(k)
        return total + jnp.sum(g * g, axis=1)

    rows = y_ref.shape[0]
    total = jax.lax.fori_loop(0, pieces, square_sum, jnp.zeros((rows,), jnp.float32))
    scale = jax.lax.rsqrt(total / width + eps)

    def write(k, carry):
        g, cols = gated(k)
        output(g, cols, scale)
        return carry

    jax.lax.fori_loop(0, pieces, write, 0)


def gated_norm_pallas(y: Array, proj: Array, weight: Array, groups: int, eps: float, *,
                      rows: int = NORM_ROWS, piece: int = NORM_COLUMNS, num_warps: int = 4) -> Array:
    """HF MambaRMSNormGated of the SSD output with the gate z read from the in_proj output.

    Args:
      y: [B, Q, C, E] the SSD output with the D skip (compute dtype).
      proj: [B, Q, C, Dp] the in_proj output; z is its channels [0, E).
      weight: [E] the norm weight. groups: G (each group of E/G channels normalised alone).
      eps: the norm epsilon. rows: rows per program (clipped to C). piece: columns per tile
        (clipped to E/G; one tile per group row = one pass over y and z). num_warps: per program.

    Returns:
      [B, Q, C, E] in y.dtype: the normalised, gated output (the input of out_proj).
    """
    batch, chunks, chunk, inner = y.shape
    width = inner // groups
    rows = min(rows, chunk)
    piece = min(piece, width)
    per_chunk = chunk // rows

    def index(i, g):
        bq = i // per_chunk
        return bq // chunks, bq % chunks, i % per_chunk, g

    kernel = functools.partial(_norm_kernel, width=width, piece=piece, eps=float(eps))
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(y.shape, y.dtype),
        grid=(batch * chunks * per_chunk, groups),
        in_specs=[pl.BlockSpec((None, None, rows, width), index),
                  pl.BlockSpec((None, None, rows, width), index),
                  pl.BlockSpec((width,), lambda i, g: (g,))],
        out_specs=pl.BlockSpec((None, None, rows, width), index),
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        name="mamba2_gated_norm",
    )(y, proj, weight)


# ----------------------------------------------------------------------------- the time steps


def _time_kernel(raw_ref, bias_ref, a_log_ref, valid_ref, dt_ref, cum_ref, *, low: float,
                 high: float):
    x = raw_ref[...].astype(jnp.float32) + bias_ref[...][None, :]                    # [L, HB]
    dt = jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))                       # softplus
    dt = jnp.minimum(jnp.maximum(dt, low), high)
    dt = jnp.where(valid_ref[...][:, None] != 0, dt, 0.0)
    a = -jnp.exp(a_log_ref[...])
    dt_ref[...] = dt.T
    cum_ref[...] = jnp.cumsum(dt * a[None, :], axis=0).T


TIME_HEADS = 4       # heads per time-step program: 128 programs per mamba2-1.3b step (16: 32, 7.5 us)


def time_steps_supported(first_channel: int, heads: int) -> bool:
    """Whether `time_steps_pallas` takes dt at this channel offset with this many heads."""
    block = min(TIME_HEADS, heads)
    return is_pow2(block) and heads % block == 0 and first_channel % block == 0


def time_steps_pallas(proj: Array, first_channel: int, dt_bias: Array, a_log: Array, valid: Array,
                      dt_limit: tuple[float, float]) -> tuple[Array, Array]:
    """Step sizes and their cumulative decay, head-major, in one kernel (XLA needs ~4: softplus,
    two transposes and a two-level cumsum).

    dt = clip(softplus(dt_raw + dt_bias), *dt_limit), 0 on padded slots; cum = cumsum(dt A) along
    each chunk with A = -exp(A_log).

    Args:
      proj: [B, Q, C, Dp] the in_proj output; dt_raw is channels [first_channel, first_channel + H).
      first_channel: where dt_raw starts. dt_bias, a_log: float32[H]. valid: [B, Q, C] (nonzero =
        real slot). dt_limit: (low, high).

    Returns:
      (dt_t, cum_t) float32[B, Q, H, C].
    """
    batch, chunks, chunk, _ = proj.shape
    heads = dt_bias.shape[0]
    block = min(TIME_HEADS, heads)
    first = first_channel // block
    head_major = pl.BlockSpec((None, None, block, chunk), lambda bq, j: (bq // chunks, bq % chunks, j, 0))
    shape = jax.ShapeDtypeStruct((batch, chunks, heads, chunk), jnp.float32)
    low, high = dt_limit
    return pl.pallas_call(
        functools.partial(_time_kernel, low=float(low), high=float(high)),
        out_shape=(shape, shape), grid=(batch * chunks, heads // block),
        in_specs=[pl.BlockSpec((None, None, chunk, block),
                               lambda bq, j: (bq // chunks, bq % chunks, 0, first + j)),
                  pl.BlockSpec((block,), lambda bq, j: (j,)),
                  pl.BlockSpec((block,), lambda bq, j: (j,)),
                  pl.BlockSpec((None, None, chunk), lambda bq, j: (bq // chunks, bq % chunks, 0))],
        out_specs=(head_major, head_major), interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="mamba2_time_steps",
    )(proj, dt_bias.astype(jnp.float32), a_log.astype(jnp.float32), valid.astype(jnp.int32))
