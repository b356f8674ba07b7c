"""Mamba2 group steps (G chunks per prefill step): exactness across group positions, agreement with
G = 1, the group mixer API, padding chunks, in-place checkpoint emission, compilation bound and
configuration."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.chunking import run_chunks, write_emitted
from sparse_prefix.models import build, create
from sparse_prefix.models.group_conv import causal_conv_group
from sparse_prefix.models.mamba2 import Mamba2LM, mamba2_emitting_step, mamba2_group_step
from sparse_prefix.models.mamba2_mixer import mamba2_mixer_chunk, mamba2_mixer_group, mamba2_mixer_state
from sparse_prefix.protocol import RecurrentState
from sparse_prefix.testing import check_model

B, T = 2, 59  # check_model's shapes on mamba2-tiny (C = 16): token bucket 64, checkpoint bucket 4
group_mixer = jax.jit(mamba2_mixer_group, static_argnums=(1, 5))


@pytest.fixture(scope="module")
def tiny():
    return create("mamba2-tiny", dtype=jnp.float32)


def _tokens(seed, batch=B, total=T):
    return np.random.default_rng(seed).integers(0, 512, size=(batch, total)).astype(np.int32)


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("group", [2, 3])
def test_group_steps_pass_the_equivalence_matrix(tiny, group):
    model, params = tiny
    grouped = model.with_chunking(chunks_per_step=group)
    before = grouped.compile_count
    report = check_model(grouped, params, batch=B, cross_bucket=group == 3)
    assert grouped.compile_count - before <= 3          # prefill widths (one cross-bucket), decode
    assert report["bitwise_checks"] > 50 and report["max_off_grid_error"] < 1e-5
    assert report["max_decode_error"] < 1e-4


def test_resume_at_every_chunk_boundary_is_bitwise_wherever_the_chunk_sits_in_its_group(tiny):
    model, params = tiny
    model = model.with_chunking(chunks_per_step=3)
    chunk, tokens = model.chunk_size, _tokens(7)
    lengths = np.full(B, T, np.int32)
    none = np.zeros((B, 4), np.int32)
    want_logits, want_state, _ = model.prefill(params, tokens, model.init_state(B), none, lengths)
    for split in (chunk, 2 * chunk, 3 * chunk):  # the resumed call shifts every chunk by 1, 2, 0
        _, prefix, _ = model.prefill(params, tokens, model.init_state(B), none,
                                     np.full(B, split, np.int32))
        rest = np.zeros_like(tokens)
        rest[:, :T - split] = tokens[:, split:]
        logits, state, _ = model.prefill(params, rest, prefix, none, lengths - split)
        np.testing.assert_array_equal(np.asarray(logits), np.asarray(want_logits))
        for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want_state)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_group_steps_agree_with_single_chunk_steps_within_float32_tolerance(tiny):
    model, params = tiny
    tokens, lengths = _tokens(1), np.array([T, 41], np.int32)
    ckpts = np.array([[5, 16, 33, 0], [1, 17, 0, 40]], np.int32)
    single = model.prefill(params, tokens, model.init_state(B), ckpts, lengths)
    grouped_model = model.with_chunking(chunks_per_step=3)
    grouped = grouped_model.prefill(params, tokens, grouped_model.init_state(B), ckpts, lengths)
    for got, want in zip(jax.tree_util.tree_leaves(grouped), jax.tree_util.tree_leaves(single)):
        assert got.shape == want.shape and got.dtype == want.dtype
        if jnp.issubdtype(want.dtype, jnp.floating):
            assert _rel(got, want) < 1e-5
        else:
            np.testing.assert_array_equal(got, want)
    full = grouped_model.forward(params, tokens)
    np.testing.assert_allclose(full[0, T - 1], single[0][0], rtol=1e-5, atol=1e-5)


def test_group_mixer_matches_the_sequential_reference_chunk_after_chunk_with_each_boundary(tiny):
    model, model_params = tiny
    cfg = model.config.mixer
    reference = dataclasses.replace(cfg, backend="sequential")
    params = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[0], model_params.layers.mixer)
    rng = np.random.default_rng(0)
    groups, chunk = 3, 8
    x = rng.standard_normal((B, groups, chunk, cfg.d_model)).astype(np.float32)
    n_valid = np.array([[8, 5, 0], [2, 0, 8]])  # partial, all-padding and full chunks
    valid = np.arange(chunk)[None, None] < n_valid[..., None]
    shapes = jax.eval_shape(lambda: mamba2_mixer_state(cfg, B, jnp.float32))
    state = RecurrentState(*(rng.standard_normal(leaf.shape).astype(np.float32) for leaf in shapes))
    y, final, bounds = group_mixer(params, cfg, x, state, valid, True)
    one_chunk = jax.jit(mamba2_mixer_chunk, static_argnums=1)
    current = state
    for g in range(groups):
        y_g, current = one_chunk(params, reference, x[:, g], current, valid[:, g])
        mask = valid[:, g, :, None]
        assert _rel(np.where(mask, y[:, g], 0), np.where(mask, y_g, 0)) < 1e-5
        for got, want in zip(jax.tree_util.tree_leaves(bounds), current):
            assert _rel(got[:, g], want) < 1e-5
    for got, want in zip(final, current):
        assert _rel(got, want) < 1e-5
    # An all-padding chunk passes the state (row 0: chunk 2; row 1: chunk 1) through exactly.
    for leaf in bounds:
        np.testing.assert_array_equal(np.asarray(leaf[0, 2]), np.asarray(leaf[0, 1]))
        np.testing.assert_array_equal(np.asarray(leaf[1, 1]), np.asarray(leaf[1, 0]))
    assert jax.eval_shape(lambda: mamba2_mixer_group(params, cfg, x, state, valid))[2] is None


def test_group_conv_windows_are_the_last_real_inputs_before_each_chunk():
    width, channels = 4, 3
    x = np.arange(2 * 3 * 5 * channels, dtype=np.float32).reshape(2, 3, 5, channels) + 100
    window = -np.arange(2 * (width - 1) * channels, dtype=np.float32).reshape(2, width - 1, channels)
    n_valid = np.array([[5, 1, 0], [2, 5, 3]], np.int32)
    weight = np.random.default_rng(0).standard_normal((width, channels)).astype(np.float32)
    y, exits = jax.jit(causal_conv_group)(x, window, weight, None, n_valid)
    for row in range(2):
        stream = [window[row]]                             # every real input, in order
        for g in range(3):
            before = np.concatenate(stream)[-(width - 1):]
            real = x[row, g, :n_valid[row, g]]
            full = np.concatenate([before, x[row, g]])
            want = sum(full[i:i + 5] * weight[i] for i in range(width))
            np.testing.assert_allclose(y[row, g, :len(real)], want[:len(real)], rtol=1e-5, atol=1e-4)
            stream.append(real)
            np.testing.assert_array_equal(exits[row, g], np.concatenate(stream)[-(width - 1):])


def test_a_replay_with_group_steps_compiles_once_per_length_and_checkpoint_bucket(tiny):
    model, params = tiny
    model = model.with_chunking(chunks_per_step=3)
    rng = np.random.default_rng(3)
    before = model.compile_count
    for _ in range(12):
        total = int(rng.integers(2 * model.chunk_size + 1, 4 * model.chunk_size + 1))
        lengths = rng.integers(1, total + 1, size=B).astype(np.int32)
        lengths[0] = total
        slots = int(rng.integers(0, 3))
        ckpts = np.zeros((B, slots), np.int32)
        for row in range(B):
            picked = np.sort(rng.choice(np.arange(1, lengths[row] + 1), size=min(slots, lengths[row]),
                                        replace=False))
            ckpts[row, :picked.size] = picked
        _, state, emitted = model.prefill(params, _tokens(int(rng.integers(1 << 30)), B, total),
                                          model.init_state(B), ckpts, lengths)
        assert emitted.lengths.shape == (B, slots) and emitted.recurrent[0].ssm.shape[1] == slots
        np.testing.assert_array_equal(state.length, lengths)
    # one token bucket (33..64 -> 64) times two checkpoint buckets (K = 0 and K = 1..4)
    assert model.compile_count - before <= 2


def test_chunking_is_a_validated_config_field_with_gpu_minded_presets(tiny):
    model, _ = tiny
    assert model.config.chunks_per_step == 1 and model.chunks_per_step == 1
    other = model.with_chunking(32, 4)
    assert (other.chunk_size, other.chunks_per_step) == (32, 4)
    assert other.config.replace(chunk_size=16, chunks_per_step=1) == model.config
    assert type(other.config).from_dict(other.config.to_dict()) == other.config
    for name in ("mamba2-130m", "mamba2-1.3b", "mamba2-2.7b"):
        preset = build(name)
        assert (preset.chunk_size, preset.chunks_per_step) == (256, 8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chunks_per_step"):
            model.config.replace(chunks_per_step=bad)
    assert isinstance(other, Mamba2LM) and other.donate_state == model.donate_state


def _driver(cfg):
    """run_chunks on the Mamba2 group step, jitted: the emitting step or the boundary protocol."""

    def prefill(params, state, tokens, lengths, ckpts, emitting):
        step = (mamba2_emitting_step(params, cfg) if emitting
                else functools.partial(mamba2_group_step, params, cfg))
        return run_chunks(step, state, tokens, lengths, ckpts, chunk_size=cfg.chunk_size,
                          hidden_size=cfg.d_model, chunks_per_step=cfg.chunks_per_step)

    return prefill


def test_in_place_emission_writes_the_checkpoints_of_the_boundary_protocol(tiny):
    model, model_params = tiny
    cfg = model.config.mixer
    params = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[0], model_params.layers.mixer)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((B, 3, 8, cfg.d_model)).astype(np.float32)  # the shapes of the test above
    valid = np.arange(8)[None, None] < np.array([[8, 3, 8], [0, 8, 8]])[..., None]
    shapes = jax.eval_shape(lambda: mamba2_mixer_state(cfg, B, jnp.float32))
    state = RecurrentState(*(rng.standard_normal(leaf.shape).astype(np.float32) for leaf in shapes))
    slots = 3
    buffers = jax.tree_util.tree_map(
        lambda leaf: jnp.full((B, slots) + leaf.shape[1:], 7.0, leaf.dtype), state)
    slot = np.array([[2, slots, slots], [slots, 0, slots]], np.int32)  # chunk -> slot (K: none)
    y, final, written = group_mixer(params, cfg, x, state, valid, False, emit=(buffers, slot))
    want_y, want_final, bounds = group_mixer(params, cfg, x, state, valid, True)
    expected = write_emitted(buffers, bounds, slot)
    for got, want in zip(jax.tree_util.tree_leaves((y, final, written)),
                         jax.tree_util.tree_leaves((want_y, want_final, expected))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got, bound in zip(written, bounds):  # exactly the emitted chunks landed, nothing else
        np.testing.assert_array_equal(np.asarray(got[0, 2]), np.asarray(bound[0, 0]))
        np.testing.assert_array_equal(np.asarray(got[1, 0]), np.asarray(bound[1, 1]))
        assert np.all(np.asarray(got[0, :2]) == 7.0) and np.all(np.asarray(got[1, 1:]) == 7.0)
    with pytest.raises(ValueError, match="exclusive"):
        mamba2_mixer_group(params, cfg, x, state, valid, True, emit=(buffers, slot))


def test_a_call_without_checkpoints_traces_no_emission(tiny):
    model, params = tiny
    model = model.with_chunking(chunks_per_step=2)
    prefill = _driver(model.config)
    tokens, lengths = _tokens(5, B, 48), np.array([48, 40], np.int32)
    for slots in (0, 4):
        jaxpr = str(jax.make_jaxpr(prefill, static_argnums=5)(
            params, model.init_state(B), tokens, lengths, np.zeros((B, slots), np.int32), True))
        assert ("scatter" in jaxpr) == (slots > 0)
