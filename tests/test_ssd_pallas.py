"""The "pallas" SSD backend, run in Pallas' interpreter on CPU: it matches the pure-JAX "chunked"
backend on one tiny shape and keeps a chunk's numbers independent of its slot in the group (the
bitwise-resume property), and falls back to "chunked" on shapes its kernels do not take."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models import create
from sparse_prefix.models.mamba2_mixer import mamba2_mixer_group, mamba2_mixer_state
from sparse_prefix.models.ssd_pallas import supported
from sparse_prefix.protocol import RecurrentState

B, Q, C = 2, 2, 16  # mamba2-tiny's mixer: H 8, P 16, G 2, N 16 (the smallest shape the kernels take)
group_mixer = jax.jit(mamba2_mixer_group, static_argnums=(1, 5))


@pytest.fixture(scope="module")
def mixer():
    model, model_params = create("mamba2-tiny", dtype=jnp.float32)
    cfg = model.config.mixer
    params = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[0], model_params.layers.mixer)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: mamba2_mixer_state(cfg, B, jnp.float32))
    state = RecurrentState(*(rng.standard_normal(leaf.shape).astype(np.float32) for leaf in shapes))
    x = rng.standard_normal((B, Q + 1, C, cfg.d_model)).astype(np.float32)
    return cfg, params, state, x


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_pallas_backend_matches_the_chunked_backend_in_float32(mixer):
    cfg, params, state, x = mixer
    pallas = dataclasses.replace(cfg, backend="pallas")
    valid = np.arange(C)[None, None] < np.array([[16, 5], [0, 16]])[..., None]  # partial, padding
    y, final, bounds = group_mixer(params, pallas, x[:, :Q], state, valid, True)
    want_y, want_final, want_bounds = group_mixer(params, cfg, x[:, :Q], state, valid, True)
    mask = valid[..., None]
    # float32 throughout; only the summation order differs (observed ~1e-7 relative).
    assert _rel(np.where(mask, y, 0), np.where(mask, want_y, 0)) < 1e-5
    for got, want in zip(jax.tree_util.tree_leaves((final, bounds)),
                         jax.tree_util.tree_leaves((want_final, want_bounds))):
        assert _rel(got, want) < 1e-5
    for got, before in zip(bounds, state):  # an all-padding chunk (row 1, chunk 0) keeps the state
        np.testing.assert_array_equal(np.asarray(got[1, 0]), np.asarray(before[1]))


def test_pallas_chunk_outputs_do_not_depend_on_the_chunk_slot_in_the_group(mixer):
    cfg, params, state, x = mixer
    pallas = dataclasses.replace(cfg, backend="pallas")
    valid = np.ones((B, Q, C), bool)
    y, _, bounds = group_mixer(params, pallas, x[:, :Q], state, valid, True)
    after_first = RecurrentState(*(leaf[:, 0] for leaf in bounds))
    # Resume after chunk 0: chunk 1 moves from slot 1 to slot 0 of the same compiled program.
    y_resumed, _, bounds_resumed = group_mixer(params, pallas, x[:, 1:], after_first, valid, True)
    np.testing.assert_array_equal(np.asarray(y_resumed[:, 0]), np.asarray(y[:, 1]))
    for got, want in zip(bounds_resumed, bounds):
        np.testing.assert_array_equal(np.asarray(got[:, 0]), np.asarray(want[:, 1]))


def test_kernels_take_power_of_two_blocks_only():
    tiny = dict(heads=8, head_dim=16, groups=2, state_size=16, d_inner=128)
    assert supported(2, 16, **tiny) and supported(8, 256, 32, 64, 1, 128, 2048)
    assert not supported(3, 16, **tiny)                      # G = 3: the "chunked" path runs
    assert not supported(2, 24, **tiny)                      # C not a power of two
    assert not supported(2, 8, **tiny)                       # blocks under 16


def test_auto_backend_picks_pallas_only_on_a_gpu_for_non_float32_operands():
    from sparse_prefix.models.mamba2_mixer import ssd_backend
    assert ssd_backend("auto", jnp.bfloat16, "gpu") == "pallas"
    assert ssd_backend("auto", jnp.float32, "gpu") == "chunked"
    assert ssd_backend("auto", jnp.bfloat16, "cpu") == "chunked"
    assert ssd_backend("sequential", jnp.bfloat16, "gpu") == "sequential"
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd_backend("triton", jnp.bfloat16, "gpu")


def test_chunk_scan_with_shared_scores_matches_per_head_scores():
    from sparse_prefix.models.ssd_pallas import chunk_scan_pallas
    heads, head_dim, groups, size, length = 4, 16, 2, 16, 32
    rng = np.random.default_rng(2)
    xbc = rng.standard_normal((1, 2, length, heads * head_dim + 2 * groups * size)).astype(np.float32)
    dt = rng.uniform(0.0, 0.1, (1, 2, length, heads)).astype(np.float32)
    cum = np.cumsum(-dt * rng.uniform(1.0, 4.0, heads).astype(np.float32), axis=2)
    entering = rng.standard_normal((1, 2, heads, head_dim, size)).astype(np.float32)
    d_skip = np.ones(heads, np.float32)
    common = dict(heads=heads, head_dim=head_dim, groups=groups, state_size=size,
                  out_dtype=jnp.float32, block=16)
    cum_t, dt_t = np.swapaxes(cum, 2, 3), np.swapaxes(dt, 2, 3)
    want = chunk_scan_pallas(xbc, cum_t, dt_t, entering, d_skip, **common)
    got = chunk_scan_pallas(xbc, cum_t, dt_t, entering, d_skip, shared_scores=True, **common)
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("slots", [4, 3])   # in the chain kernel (power of two) / exits + scatter
def test_pallas_emission_writes_the_chunked_backends_states_and_keeps_other_slots(mixer, slots):
    cfg, params, state, x = mixer
    pallas = dataclasses.replace(cfg, backend="pallas")
    valid = np.arange(C)[None, None] < np.array([[16, 5], [0, 16]])[..., None]
    rng = np.random.default_rng(4)
    buffers = RecurrentState(*(rng.standard_normal((B, slots) + leaf.shape[1:]).astype(np.float32)
                               for leaf in state))
    slot = np.array([[2, slots], [slots, 0]], np.int32)          # slot K: not emitted
    _, _, got = group_mixer(params, pallas, x[:, :Q], state, valid, False, emit=(buffers, slot))
    _, _, want = group_mixer(params, cfg, x[:, :Q], state, valid, False, emit=(buffers, slot))
    for got_leaf, want_leaf, before in zip(got, want, buffers):
        assert _rel(got_leaf, want_leaf) < 1e-5
        written = np.zeros(got_leaf.shape[:2], bool)
        written[0, 2] = written[1, 0] = True
        np.testing.assert_array_equal(np.asarray(got_leaf)[~written], before[~written])
