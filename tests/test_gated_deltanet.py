"""The Gated DeltaNet mixer: chunked (UT transform) == sequential reference, exact padding, decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sparse_prefix.models.gated_deltanet import (
    GDNConfig, gated_delta_chunked, gated_delta_sequential, gdn_mixer_chunk, gdn_mixer_group,
    gdn_mixer_step, init_gdn_params, init_gdn_state, unit_lower_inverse)
from sparse_prefix.protocol import RecurrentState

B, C, H, DK, DV, SUB = 2, 8, 3, 4, 5, 4
CFG = GDNConfig(d_model=16, num_k_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=4, conv_width=4,
                sub_chunk=4)

chunked = jax.jit(lambda *args: gated_delta_chunked(*args, SUB))
sequential = jax.jit(gated_delta_sequential)
mixer_chunk = jax.jit(lambda p, x, s, v: gdn_mixer_chunk(p, CFG, x, s, v))
mixer_reference = jax.jit(lambda p, x, s, v: gdn_mixer_chunk(p, CFG, x, s, v, backend="sequential"))
mixer_step = jax.jit(lambda p, x, s: gdn_mixer_step(p, CFG, x, s))
mixer_group = jax.jit(lambda p, x, s, v: gdn_mixer_group(p, CFG, x, s, v, True))


def rule_inputs(seed, valid=None):
    """Random normalised q, k, v, log-decays, betas and a state (NumPy); padded slots get beta = g = 0."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, C, H, DK)).astype(np.float32)
    k = rng.normal(size=(B, C, H, DK)).astype(np.float32)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * DK ** -0.5
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, C, H, DV)).astype(np.float32)
    g = -rng.uniform(0.0, 3.0, size=(B, C, H)).astype(np.float32)
    beta = (1 / (1 + np.exp(-2 * rng.normal(size=(B, C, H))))).astype(np.float32)
    if valid is not None:
        g, beta = np.where(valid[..., None], g, 0.0), np.where(valid[..., None], beta, 0.0)
    return q, k, v, g, beta, rng.normal(size=(B, H, DK, DV)).astype(np.float32)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_chunked_rule_matches_the_sequential_scan(seed):
    out_c, state_c = chunked(*rule_inputs(seed))
    out_s, state_s = sequential(*rule_inputs(seed))
    np.testing.assert_allclose(out_c, out_s, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(state_c, state_s, atol=2e-5, rtol=1e-4)


def test_chunked_rule_matches_a_hand_computed_two_token_example():
    q, k, v = np.zeros((B, C, H, DK)), np.zeros((B, C, H, DK)), np.zeros((B, C, H, DV))
    g, beta, state = np.zeros((B, C, H)), np.zeros((B, C, H)), np.zeros((B, H, DK, DV))
    k[0, 0, 0, :2], k[0, 1, 0, :2], q[0, 1, 0, 0] = [1.0, 0.0], [0.6, 0.8], 1.0
    v[0, 0, 0, 0], v[0, 1, 0, 0] = 2.0, 1.0
    g[0, 1, 0], beta[0, :2, 0] = np.log(0.5), [1.0, 0.5]
    out, final = chunked(*(x.astype(np.float32) for x in (q, k, v, g, beta, state)))
    # S1 = k0 (2) = [2, 0]; S2 = 0.5 S1 + k1 * 0.5 (1 - 0.5 S1.k1) = [1, 0] + [0.6, 0.8] * 0.2
    np.testing.assert_allclose(final[0, 0, :2, 0], [1.12, 0.16], rtol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0, 0], 1.12, rtol=1e-6)
    assert not np.any(final[1]) and not np.any(out[1])


def test_padded_slots_leave_the_state_exactly_unchanged():
    valid = np.arange(C)[None, :] < np.array([[3], [0]])
    inputs = rule_inputs(1, valid)
    _, state = chunked(*inputs)
    np.testing.assert_array_equal(state[1], inputs[5][1])            # all padded: identity
    _, seq_state = sequential(*inputs)
    np.testing.assert_array_equal(seq_state[1], inputs[5][1])
    np.testing.assert_allclose(state[0], seq_state[0], atol=1e-5, rtol=1e-4)
    q, k, v, g, beta, start = inputs
    s = start[0].astype(np.float64)
    for t in range(3):                                                # NumPy float64 reference
        s = s * np.exp(g[0, t])[:, None, None]
        delta = beta[0, t][:, None] * (v[0, t] - np.einsum("hde,hd->he", s, k[0, t]))
        s = s + k[0, t][:, :, None] * delta[:, None, :]
    np.testing.assert_allclose(state[0], s, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 5, 8, 16])
def test_block_doubling_inverts_unit_lower_triangular_matrices(n):
    lower = np.tril(np.random.default_rng(n).normal(size=(3, n, n)), -1)
    lower[0] = np.tril(np.ones((n, n)), -1)                  # all-ones: inverse is bidiagonal (1, -1)
    got = unit_lower_inverse(jnp.asarray(lower, jnp.float32))
    np.testing.assert_allclose(got, np.linalg.inv(np.eye(n) + lower), atol=1e-4, rtol=1e-5)
    assert np.all(np.asarray(got)[..., np.triu_indices(n, 1)[0], np.triu_indices(n, 1)[1]] == 0)


def test_doubling_and_triangular_solves_agree():
    inputs = rule_inputs(7)
    triangular = jax.jit(lambda *args: gated_delta_chunked(*args, SUB, solver="triangular"))
    for got, want in zip(chunked(*inputs), triangular(*inputs)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def mixer():
    """NumPy parameters of the `init_gdn_params` layout (unit-scale projections), state and input."""
    rng = np.random.default_rng(4)
    shapes = jax.eval_shape(lambda: init_gdn_params(jax.random.PRNGKey(0), CFG, jnp.float32))
    params = {name: (rng.normal(size=x.shape) / np.sqrt(x.shape[0])).astype(np.float32)
              for name, x in shapes.items()}
    params["A_log"] = np.log(rng.uniform(0.5, 8.0, size=shapes["A_log"].shape)).astype(np.float32)
    params["dt_bias"] = np.ones(shapes["dt_bias"].shape, np.float32)
    params["norm_weight"] = (1 + 0.1 * rng.normal(size=shapes["norm_weight"].shape)).astype(np.float32)
    zero = jax.eval_shape(lambda: init_gdn_state(CFG, B, jnp.float32))
    state = RecurrentState(ssm=rng.normal(size=zero.ssm.shape).astype(np.float32),
                           conv=rng.normal(size=zero.conv.shape).astype(np.float32))
    return params, state, rng.normal(size=(B, C, CFG.d_model)).astype(np.float32)


def test_mixer_backends_agree(mixer):
    params, state, x = mixer
    valid = np.ones((B, C), bool)
    y_c, s_c = mixer_chunk(params, x, state, valid)
    y_s, s_s = mixer_reference(params, x, state, valid)
    np.testing.assert_allclose(y_c, y_s, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(s_c.ssm, s_s.ssm, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(s_c.conv, s_s.conv)


def test_mixer_token_steps_match_the_chunk(mixer):
    params, state, x = mixer
    y_chunk, s_chunk = mixer_chunk(params, x, state, np.ones((B, C), bool))
    s = state
    for t in range(C):
        y_t, s = mixer_step(params, x[:, t], s)
        np.testing.assert_allclose(y_t, y_chunk[:, t], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(s.ssm, s_chunk.ssm, atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(s.conv, s_chunk.conv)


def test_mixer_on_a_partial_chunk_equals_the_steps_of_its_real_tokens(mixer):
    params, state, x = mixer
    valid = np.arange(C)[None, :] < np.array([[5], [0]])
    _, s_chunk = mixer_chunk(params, x, state, valid)
    s = state
    for t in range(5):
        _, s = mixer_step(params, x[:, t], s)
    np.testing.assert_allclose(s_chunk.ssm[0], s.ssm[0], atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(s_chunk.conv[0], s.conv[0])
    np.testing.assert_array_equal(s_chunk.ssm[1], state.ssm[1])          # row 1: all padding
    np.testing.assert_array_equal(s_chunk.conv[1], state.conv[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_k_heads=3, num_v_heads=4), "multiple of num_k_heads"),
    (dict(conv_width=1), "conv_width"),
    (dict(head_k_dim=0), "head_k_dim"),
])
def test_bad_gdn_configs_raise_named_errors(kwargs, message):
    base = dict(d_model=8, num_k_heads=2, num_v_heads=4, head_k_dim=4, head_v_dim=4)
    with pytest.raises(ValueError, match=message):
        GDNConfig(**{**base, **kwargs})


def test_chunk_length_off_the_sub_chunk_grid_is_rejected():
    with pytest.raises(ValueError, match="sub_chunk"):
        gated_delta_chunked(*rule_inputs(0), 3)
    with pytest.raises(ValueError, match="backend"):
        gdn_mixer_chunk({}, CFG, np.zeros((1, 4, CFG.d_model)), None, np.ones((1, 4), bool),
                        backend="fast")


GROUP = 3


@pytest.fixture(scope="module")
def group_inputs(mixer):
    """Three chunks per row; row 1's middle chunk is all padding and its last chunk partial."""
    params, state, _ = mixer
    x = np.random.default_rng(8).normal(size=(B, GROUP, C, CFG.d_model)).astype(np.float32)
    n_valid = np.array([[C, C, C], [C, 0, 5]])
    return params, state, x, np.arange(C)[None, None, :] < n_valid[..., None]


def test_a_group_of_chunks_equals_its_chunks_run_one_by_one(group_inputs):
    params, state, x, valid = group_inputs
    y, final, bounds = mixer_group(params, x, state, valid)
    s = state
    for g in range(GROUP):
        y_g, s = mixer_chunk(params, x[:, g], s, valid[:, g])
        np.testing.assert_allclose(y[:, g][valid[:, g]], np.asarray(y_g)[valid[:, g]], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(bounds.ssm[:, g], s.ssm, atol=1e-5, rtol=1e-4)
        np.testing.assert_array_equal(bounds.conv[:, g], s.conv)
    np.testing.assert_array_equal(bounds.ssm[1, 1], bounds.ssm[1, 0])         # all padding: identity
    np.testing.assert_array_equal(final.ssm, bounds.ssm[:, -1])
    np.testing.assert_array_equal(final.conv, s.conv)


def test_a_chunks_numbers_do_not_depend_on_its_slot_in_the_group(group_inputs):
    """Chunks 1 and 2 run in slots 1, 2 of one call and slots 0, 1 of the next (resumed from the
    state after chunk 0): outputs and states are bitwise the same."""
    params, state, x, valid = group_inputs
    y, _, bounds = mixer_group(params, x, state, valid)
    after_first = RecurrentState(ssm=bounds.ssm[:, 0], conv=bounds.conv[:, 0])
    shifted = np.concatenate([x[:, 1:], x[:, :1]], axis=1)
    shifted_valid = np.concatenate([valid[:, 1:], valid[:, :1]], axis=1)
    y2, _, bounds2 = mixer_group(params, shifted, after_first, shifted_valid)
    np.testing.assert_array_equal(y2[:, :2], y[:, 1:])
    np.testing.assert_array_equal(bounds2.ssm[:, :2], bounds.ssm[:, 1:])
    np.testing.assert_array_equal(bounds2.conv[:, :2], bounds.conv[:, 1:])
