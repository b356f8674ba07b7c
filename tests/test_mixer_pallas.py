"""The Mamba2 mixer's conv and gated-norm kernels (`models.mixer_pallas`), run in Pallas'
interpreter on CPU: each matches the XLA path it replaces, including chunks that are partly or
wholly padding and windows that reach back across chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models import mixer_pallas
from sparse_prefix.models.group_conv import causal_conv_group, group_windows
from sparse_prefix.models.mamba2_mixer import gated_rms_norm

B, Q, C, W = 2, 3, 32, 4            # two row blocks per chunk: the window and a previous block
FIRST, DC, DP = 64, 96, 192         # xBC at channels [64, 160) of a 192-wide projection: block 32


def _inputs(dtype):
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((B, Q, C, DP)).astype(np.float32)
    window = rng.standard_normal((B, W - 1, DC)).astype(np.float32)
    weight = rng.standard_normal((W, DC)).astype(np.float32)
    bias = rng.standard_normal((DC,)).astype(np.float32)
    n_valid = np.array([[C, 5, 0], [2, C, 1]], np.int32)     # full, partial and empty chunks
    return (jnp.asarray(proj, dtype), jnp.asarray(window, dtype), jnp.asarray(weight, dtype),
            jnp.asarray(bias, dtype), n_valid)


@pytest.mark.parametrize("rows_per_program", [16, 32])   # two programs per chunk, or one
def test_conv_kernel_matches_the_xla_group_conv_with_padding_and_windows(rows_per_program):
    proj, window, weight, bias, n_valid = _inputs(jnp.float32)
    assert mixer_pallas.conv_supported(C, FIRST, DC, W)
    xbc = proj[..., FIRST:FIRST + DC]
    want, want_exits = causal_conv_group(xbc, window, weight, bias, n_valid)
    entering, exits = group_windows(window, xbc, n_valid)
    got = mixer_pallas.conv_silu_pallas(proj, FIRST, DC, entering, weight, bias,
                                        rows_per_program=rows_per_program)
    np.testing.assert_array_equal(np.asarray(exits), np.asarray(want_exits))
    valid = (np.arange(C)[None, None] < n_valid[..., None])[..., None]
    np.testing.assert_allclose(np.where(valid, got, 0), np.where(valid, jax.nn.silu(want), 0),
                               rtol=1e-6, atol=1e-6)


def test_conv_kernel_in_bfloat16_copies_shifted_rows_exactly():
    # bf16 operands: the shift matrices must copy the rows bit for bit (0/1 weights, float32
    # accumulation), so the kernel's taps equal the XLA path's before the SiLU rounding.
    proj, window, _, _, n_valid = _inputs(jnp.bfloat16)
    weight = jnp.zeros((W, DC), jnp.bfloat16).at[0].set(1)      # output = the input 3 slots back
    xbc = proj[..., FIRST:FIRST + DC]
    entering, _ = group_windows(window, xbc, n_valid)
    got = mixer_pallas.conv_silu_pallas(proj, FIRST, DC, entering, weight, None)
    want, _ = causal_conv_group(xbc, window, weight, None, n_valid)
    valid = (np.arange(C)[None, None] < n_valid[..., None])[..., None]
    want = jax.nn.silu(want).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_allclose(np.where(valid, np.asarray(got, np.float32), 0),
                               np.where(valid, want, 0), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("piece", [64, 16])   # one pass over a group row, or four pieces twice
def test_gated_norm_kernel_matches_the_xla_norm_per_group(piece):
    rng = np.random.default_rng(1)
    inner, groups = 128, 2
    y = jnp.asarray(rng.standard_normal((B, Q, C, inner)), jnp.float32)
    proj = jnp.asarray(rng.standard_normal((B, Q, C, DP)), jnp.float32)
    weight = jnp.asarray(rng.standard_normal((inner,)), jnp.float32)
    assert mixer_pallas.norm_supported(C, inner, groups)
    got = mixer_pallas.gated_norm_pallas(y, proj, weight, groups, 1e-5, piece=piece)
    want = gated_rms_norm(y, proj[..., :inner], weight, groups, 1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_kernels_refuse_shapes_triton_cannot_block():
    assert not mixer_pallas.conv_supported(24, 0, 128, 4)      # chunk not a power of two
    assert not mixer_pallas.conv_supported(32, 8, 128, 4)      # channel offset not 16-aligned
    assert not mixer_pallas.norm_supported(32, 1536, 1)        # group width not a power of two
    assert mixer_pallas.norm_supported(256, 4096, 1)


def test_time_steps_kernel_matches_xla_softplus_clip_mask_and_cumsum():
    from sparse_prefix.models.ssd_pallas import time_steps
    rng = np.random.default_rng(3)
    heads, first = 8, 96
    proj = jnp.asarray(rng.standard_normal((B, Q, C, DP)) * 3.0, jnp.float32)
    dt_bias = jnp.asarray(rng.standard_normal(heads), jnp.float32)
    a_log = jnp.asarray(rng.uniform(0.0, 2.5, heads), jnp.float32)
    n_valid = np.array([[C, 5, 0], [2, C, 1]])
    valid = np.arange(C)[None, None] < n_valid[..., None]
    limit = (0.001, 2.0)
    assert mixer_pallas.time_steps_supported(first, heads)
    dt_t, cum_t = mixer_pallas.time_steps_pallas(proj, first, dt_bias, a_log, valid, limit)
    dt = jnp.clip(jax.nn.softplus(proj[..., first:first + heads] + dt_bias), *limit)
    dt = jnp.where(valid[..., None], dt, 0.0)
    want_dt, want_cum = time_steps(dt, -jnp.exp(a_log))
    np.testing.assert_allclose(np.asarray(dt_t), np.asarray(want_dt), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(cum_t), np.asarray(want_cum), rtol=1e-5, atol=1e-5)
    assert not np.asarray(dt_t)[0, 2].any()          # an all-padding chunk has dt = 0 everywhere
