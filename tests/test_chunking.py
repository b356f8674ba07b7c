"""The chunk driver: segment layout, one-pass emission and bitwise resume, on a toy recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.chunking import (EmittingGroupStep, check_prefill_args, plan_chunks, run_chunks,
                                    scan_chunks, write_emitted)
from sparse_prefix.protocol import RecurrentState, State

C = 4


def toy_step(state, tokens, positions, valid):
    """h <- 0.9 h + token + 0.01 * position on valid slots; conv keeps the last real token."""
    layer = state.recurrent[0]

    def one(h, inputs):
        x, p, ok = inputs
        new = jnp.where(ok, 0.9 * h + x + 0.01 * p, h)
        return new, new

    inputs = (tokens.T.astype(jnp.float32), positions.T.astype(jnp.float32), valid.T)
    h, hs = jax.lax.scan(one, layer.ssm[:, 0, 0, 0], inputs)
    n_valid = jnp.sum(valid, axis=1)
    last_tok = jnp.take_along_axis(tokens, jnp.maximum(n_valid - 1, 0)[:, None], axis=1)
    conv = jnp.where(n_valid[:, None, None] > 0, last_tok[:, :, None].astype(jnp.float32), layer.conv)
    new = RecurrentState(ssm=h[:, None, None, None], conv=conv)
    return state._replace(recurrent=(new,)), hs.T[:, :, None]


def fresh(batch):
    return State(recurrent=(RecurrentState(jnp.zeros((batch, 1, 1, 1)), jnp.zeros((batch, 1, 1))),),
                 kv=None, length=jnp.zeros((batch,), jnp.int32))


def reference(tokens, upto):
    h = 0.0
    for p, x in enumerate(tokens[:upto]):
        h = 0.9 * h + x + 0.01 * p
    return h


prefill = jax.jit(lambda state, tokens, lengths, ckpts: run_chunks(
    toy_step, state, tokens, lengths, ckpts, chunk_size=C, hidden_size=1))


def test_plan_puts_every_checkpoint_at_a_chunk_end():
    plan = plan_chunks(jnp.array([10, 8]), jnp.array([[3, 0, 8], [4, 8, 0]]), C)
    # row 0: segments [0,3) [3,3) [3,8) [8,10) -> 1, 0, 2, 1 chunks
    np.testing.assert_array_equal(plan.first_chunk[0], [0, 1, 1, 3, 4])
    np.testing.assert_array_equal(plan.emit_chunk[0], [0, -1, 2])
    np.testing.assert_array_equal(plan.emit_chunk[1], [0, 1, -1])
    assert int(plan.num_chunks) == 4


def test_emitted_states_match_the_sequential_reference_and_padding_slots_stay_empty():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(2, 16)).astype(np.int32)
    lengths = np.array([13, 9], np.int32)
    ckpts = np.array([[1, 5, 0, 13], [0, 4, 8, 9]], np.int32)
    last, final, cps = prefill(fresh(2), tokens, lengths, ckpts)
    for b in range(2):
        assert float(last[b, 0]) == pytest.approx(reference(tokens[b], lengths[b]), rel=1e-6)
        for k, p in enumerate(ckpts[b]):
            if p > 0:
                assert float(cps.recurrent[0].ssm[b, k, 0, 0, 0]) == pytest.approx(
                    reference(tokens[b], p), rel=1e-6)
                assert float(cps.recurrent[0].conv[b, k, 0, 0]) == tokens[b, p - 1]
                assert int(cps.lengths[b, k]) == p
            else:
                assert int(cps.lengths[b, k]) == 0
    np.testing.assert_array_equal(final.length, lengths)


@pytest.mark.parametrize("split", [1, 3, 4, 5, 8, 11])
def test_resume_from_an_emitted_state_reproduces_the_full_call(split):
    rng = np.random.default_rng(split)
    tokens = rng.integers(0, 5, size=(1, 12)).astype(np.int32)
    _, full, _ = prefill(fresh(1), tokens, np.array([12], np.int32), np.array([[split]], np.int32))
    _, _, cps = prefill(fresh(1), tokens, np.array([12], np.int32), np.array([[split]], np.int32))
    resumed = fresh(1)._replace(recurrent=jax.tree_util.tree_map(lambda x: x[:, 0], cps.recurrent),
                                length=cps.lengths[:, 0])
    rest = np.zeros((1, 12), np.int32)
    rest[0, :12 - split] = tokens[0, split:]
    _, again, _ = prefill(resumed, rest, np.array([12 - split], np.int32), np.zeros((1, 1), np.int32))
    np.testing.assert_array_equal(np.asarray(again.recurrent[0].ssm), np.asarray(full.recurrent[0].ssm))
    assert int(again.length[0]) == 12


@pytest.mark.parametrize("tokens, lengths, ckpts, message", [
    (np.zeros((1, 4), np.float32), None, np.zeros(1, np.int32), "integer"),
    (np.zeros((1, 0), np.int32), None, np.zeros(1, np.int32), "non-empty"),
    (np.full((1, 4), 9, np.int32), None, np.zeros(1, np.int32), "token ids"),
    (np.zeros((1, 4), np.int32), None, np.array([3, 2], np.int32), "strictly increase"),
    (np.zeros((1, 4), np.int32), None, np.array([2, 2], np.int32), "strictly increase"),
    (np.zeros((1, 4), np.int32), np.array([3], np.int32), np.array([4], np.int32), "beyond"),
    (np.zeros((1, 4), np.int32), np.array([0], np.int32), np.array([1], np.int32), "lengths"),
])
def test_bad_prefill_arguments_raise_a_named_error(tokens, lengths, ckpts, message):
    with pytest.raises((ValueError, TypeError), match=message):
        check_prefill_args(tokens, lengths, ckpts, vocab_size=8, max_length=64)


@pytest.mark.parametrize("batch", [1, 3, 12])      # per-row slices up to 8 rows, one mask beyond
def test_token_ids_are_checked_in_every_rows_real_slots_only(batch):
    tokens = np.zeros((batch, 6), np.int32)
    lengths = np.full((batch,), 4, np.int32)
    tokens[:, 4:] = 99                                  # padding past every row's length: not checked
    checked, _, _ = check_prefill_args(tokens, lengths, np.zeros((0,), np.int32), vocab_size=8, max_length=64)
    np.testing.assert_array_equal(checked, tokens)
    for bad in (8, -1):
        wrong = tokens.copy()
        wrong[batch - 1, 3] = bad                       # the last real slot of the last row
        with pytest.raises(ValueError, match=rf"token ids must lie in 0..7, got \[{bad}\]"):
            check_prefill_args(wrong, lengths, np.zeros((0,), np.int32), vocab_size=8, max_length=64)


def toy_group_step(state, tokens, positions, valid, want_boundaries):
    """The toy recurrence over G chunks at once: a scan over the chunks of `toy_step`."""

    def one_chunk(current, inputs):
        chunk_tokens, chunk_positions, chunk_valid = inputs
        current, hidden = toy_step(current, chunk_tokens, chunk_positions, chunk_valid)
        return current, (hidden, current.recurrent)

    inputs = tuple(jnp.swapaxes(x, 0, 1) for x in (tokens, positions, valid))
    state, (hidden, bounds) = jax.lax.scan(one_chunk, state, inputs)
    bounds = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), bounds)
    return state, jnp.swapaxes(hidden, 0, 1), bounds if want_boundaries else None


@pytest.mark.parametrize("group", [2, 3])
def test_group_steps_emit_the_same_states_as_single_chunk_steps(group):
    run = jax.jit(lambda state, tokens, lengths, ckpts: run_chunks(
        toy_group_step, state, tokens, lengths, ckpts, chunk_size=C, hidden_size=1,
        chunks_per_step=group))
    rng = np.random.default_rng(group)
    tokens = rng.integers(0, 5, size=(2, 16)).astype(np.int32)
    lengths = np.array([13, 9], np.int32)
    ckpts = np.array([[1, 5, 0, 13], [0, 4, 8, 9]], np.int32)
    expected = prefill(fresh(2), tokens, lengths, ckpts)
    got = run(fresh(2), tokens, lengths, ckpts)
    for want, have in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want))


def test_grouped_scan_matches_the_single_chunk_scan():
    tokens = np.random.default_rng(5).integers(0, 5, size=(2, 12)).astype(np.int32)
    single = jax.jit(lambda s, t: scan_chunks(toy_step, s, t, chunk_size=C))(fresh(2), tokens)
    grouped = jax.jit(lambda s, t: scan_chunks(toy_group_step, s, t, chunk_size=C,
                                               chunks_per_step=2))(fresh(2), tokens)
    for want, have in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(grouped)):
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want))


def toy_emitting_step(calls):
    """`toy_group_step` as an `EmittingGroupStep` that writes its own states; `calls` records
    whether each trace got buffers."""

    def step(state, tokens, positions, valid, buffers, slot):
        calls.append(buffers is not None)
        state, hidden, bounds = toy_group_step(state, tokens, positions, valid, buffers is not None)
        if buffers is not None:
            buffers = write_emitted(buffers, bounds, slot)
        return state, hidden, buffers

    def init_buffers(state, slots):
        return jax.tree_util.tree_map(
            lambda leaf: jnp.zeros((leaf.shape[0], slots) + leaf.shape[1:], leaf.dtype), state.recurrent)

    return EmittingGroupStep(step, init_buffers, lambda buffers: buffers)


@pytest.mark.parametrize("slots", [0, 4])
def test_an_emitting_step_emits_what_the_boundary_protocol_emits_and_nothing_at_k0(slots):
    calls = []
    run = jax.jit(lambda state, tokens, lengths, ckpts, step: run_chunks(
        step, state, tokens, lengths, ckpts, chunk_size=C, hidden_size=1, chunks_per_step=2),
        static_argnums=4)
    rng = np.random.default_rng(11)
    tokens = rng.integers(0, 5, size=(2, 16)).astype(np.int32)
    lengths = np.array([13, 9], np.int32)
    ckpts = np.array([[1, 5, 0, 13], [0, 4, 8, 9]], np.int32)[:, :slots]
    expected = run(fresh(2), tokens, lengths, ckpts, toy_group_step)
    got = run(fresh(2), tokens, lengths, ckpts, toy_emitting_step(calls))
    assert calls == [slots > 0]                       # K = 0: traced without buffers or slots
    assert got[2].recurrent[0].ssm.shape == (2, slots, 1, 1, 1)
    for want, have in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(have), np.asarray(want))


def test_an_emitting_step_needs_its_group_size():
    with pytest.raises(ValueError, match="chunks_per_step"):
        run_chunks(toy_emitting_step([]), fresh(1), np.zeros((1, 4), np.int32), np.array([4]),
                   np.zeros((1, 0), np.int32), chunk_size=C, hidden_size=1)
