"""The static step loop (host-counted trip count) computes what the device-counted loop computes."""

from __future__ import annotations

import numpy as np
import pytest
import jax

from sparse_prefix.chunking import padded_width, plan_chunks, plan_steps, resolve_step_loop
from sparse_prefix.engine import Engine
from sparse_prefix.models import create
from sparse_prefix.models.hybrid import HybridLM
from sparse_prefix.models.mamba2 import Mamba2LM

NONE = np.zeros((0,), np.int32)


def _pair(name):
    """(dynamic model, static model, params) of a tiny preset, neither donating its state."""
    model, params = create(name, seed=0)
    cls = HybridLM if isinstance(model, HybridLM) else Mamba2LM
    return (cls(model.config, donate_state=False, step_loop="dynamic"),
            cls(model.config, donate_state=False, step_loop="static"), params)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_plan_steps_counts_the_steps_of_the_device_plan():
    rng = np.random.default_rng(0)
    for case in range(24):
        chunk, group = 16, (1, 2, 4)[case % 3]
        lengths = rng.integers(1, 150, size=3)
        checkpoints = np.where(rng.random((3, 4)) < 0.6, rng.integers(-3, 150, size=(3, 4)), 0)
        checkpoints = np.minimum(checkpoints, lengths[:, None])
        chunks = int(plan_chunks(lengths, checkpoints, chunk).num_chunks)
        assert plan_steps(lengths, checkpoints, chunk, group) == -(-chunks // group), (lengths, checkpoints)
        width = padded_width(150, lengths, checkpoints, chunk_size=chunk, chunks_per_step=group,
                             static_steps=True)
        assert width % (group * chunk) == 0 and width >= lengths.max()


@pytest.mark.parametrize("name", ["hybrid-tiny", "mamba2-tiny"])
def test_the_static_step_loop_prefill_is_bitwise_the_dynamic_one(name):
    dynamic, static, params = _pair(name)
    assert (dynamic.step_loop, static.step_loop) == ("dynamic", "static")
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, size=(2, 64)).astype(np.int32)
    lengths = np.array([64, 37], np.int32)
    checkpoints = np.array([[16, 33, 48, 60], [5, 32, 0, 0]], np.int32)
    want = dynamic.prefill(params, tokens, dynamic.init_state(2), checkpoints, lengths)
    got = static.prefill(params, tokens, static.init_state(2), checkpoints, lengths)
    _assert_trees_equal(got, want)
    # Resumed on the chunk grid from the static loop's own state: the uncached logits, bitwise
    # (both halves take the same number of steps: one static program).
    split = 32
    _, state, _ = static.prefill(params, tokens[:1, :split], static.init_state(1), NONE)
    logits, final, _ = static.prefill(params, tokens[:1, split:], state, NONE)
    full_logits, full_final, _ = dynamic.prefill(params, tokens[:1], dynamic.init_state(1), NONE)
    np.testing.assert_array_equal(logits, full_logits)
    _assert_trees_equal(final.recurrent, full_final.recurrent)


def test_an_engine_on_the_static_step_loop_answers_bitwise_uncached():
    dynamic, static, params = _pair("mamba2-tiny")
    engine = Engine(static, params, policy="block:16+fork", capacity_entries=4, background_resolve=False,
                    fuse_restore=True)
    engine.warmup((1,), max_tokens=32)          # every step count of a suffix <= 32 tokens
    compiled = static.compile_count
    rng = np.random.default_rng(2)
    doc = rng.integers(0, 256, size=24)
    for cut in (16, 20, 18):
        tokens = np.concatenate([doc[:cut], rng.integers(0, 256, size=9)]).astype(np.int32)
        result = engine.prefill(tokens)
        want, _, _ = dynamic.prefill(params, tokens[None], dynamic.init_state(1), NONE)
        np.testing.assert_array_equal(result.last_logits, np.asarray(want)[0])
    assert engine.stats()["hits"] > 0
    assert static.compile_count == compiled     # warmup compiled every program the requests ran
    engine.close()


def test_warmup_refuses_a_max_tokens_outside_the_model_length():
    model, params = create("mamba2-tiny", seed=0)
    engine = Engine(model, params, policy="block:16", capacity_entries=2, background_resolve=False)
    for bad in (0, model.max_length + 1, True):
        with pytest.raises(ValueError, match="max_tokens"):
            engine.warmup((1,), max_tokens=bad)
    engine.close()


def test_an_unknown_step_loop_is_refused_by_name():
    with pytest.raises(ValueError, match="step_loop"):
        resolve_step_loop("eager")
    model, _ = create("mamba2-tiny", seed=0)
    with pytest.raises(ValueError, match="step_loop"):
        Mamba2LM(model.config, step_loop="fast")
    assert resolve_step_loop("auto") == ("static" if jax.default_backend() == "gpu" else "dynamic")
