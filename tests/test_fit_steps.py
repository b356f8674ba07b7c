"""A call that lays out one chunk runs one chunk (`HybridLM.fit_steps` "auto" / "on"), with the bits
of a G-chunk step where the backend gives them.

hybrid-tiny at G = 2 (C = 8), fit_steps="auto": a one-chunk call gets the width C and runs as a
single-chunk step; every other call (and every call with the default fit_steps="off", or after a
failed `verify_step_fit`) keeps G-chunk steps. Where the CPU gives the two the same bits, resumes
that end in a one-chunk suffix run one chunk; either way, through the model and through the Engine,
they must equal the uncached call bit for bit. (On a GPU they need not: the default is "off".)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.engine import Engine
from sparse_prefix.models.hybrid import HybridLM, gemm_compiler_options, hybrid_tiny_config
from sparse_prefix.testing import resume_difference

NONE = np.zeros((0,), np.int32)


def grouped_model(max_length=128, **kwargs):
    config = dataclasses.replace(hybrid_tiny_config(), chunks_per_step=2, max_length=max_length)
    return HybridLM(config, dtype=jnp.float32, **kwargs)


@pytest.fixture(scope="module")
def fitted():
    model = grouped_model(fit_steps="auto")
    return model, model.init_params(np.array([0, 3], np.uint32))


@pytest.mark.parametrize("fit", ["on", "auto"])
def test_a_one_chunk_call_gets_the_width_of_one_chunk_and_longer_calls_keep_group_steps(fitted, fit):
    """"on" always fits; "auto" fits where `verify_step_fit` finds the bits of a group step (XLA's CPU
    kernels give them on some processors, not on others) and keeps group steps where it does not."""
    model = fitted[0] if fit == "auto" else grouped_model(fit_steps="on")
    fits = model.fits_one_chunk(1)                         # verified on this backend, then cached
    assert fits == (fit == "on" or model.verify_step_fit(1))
    one_chunk = (1, 8) if fits else (1, 16)
    assert model.prepare_prefill(np.ones((1, 5), np.int32), NONE)[0].shape == one_chunk
    assert model.prepare_prefill(np.ones((1, 8), np.int32), NONE)[0].shape == one_chunk
    assert model.prepare_prefill(np.ones((1, 9), np.int32), NONE)[0].shape[1] >= 16
    # an off-grid checkpoint makes two chunks of five tokens: no fit
    assert model.prepare_prefill(np.ones((1, 5), np.int32), np.array([3], np.int32))[0].shape[1] >= 16


@pytest.mark.parametrize("split", [72, 40])
def test_a_resumed_one_chunk_suffix_is_bitwise_the_uncached_call(fitted, split):
    model, params = fitted
    assert resume_difference(model, params, 80 if split != 40 else 48, split=split) == (split, 0.0)


def test_emitting_in_a_one_chunk_call_gives_the_states_of_a_group_step(fitted):
    model, params = fitted
    tokens = np.random.default_rng(4).integers(0, 256, (1, 8)).astype(np.int32)
    checkpoints = np.array([8], np.int32)
    off = grouped_model(fit_steps="off")
    assert off.prepare_prefill(tokens, checkpoints)[0].shape[1] >= 16
    got = model.prefill(params, tokens, model.init_state(1), checkpoints)
    want = off.prefill(params, tokens, off.init_state(1), checkpoints)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fit_steps_off_and_a_failed_verification_keep_one_chunk_calls_in_a_group_step(monkeypatch):
    assert grouped_model().fit_steps == "off"                 # the default: exact by construction
    off = grouped_model(fit_steps="off")
    assert not off.fits_one_chunk(1)
    assert off.prepare_prefill(np.ones((1, 5), np.int32), NONE)[0].shape[1] >= 16
    distinct = grouped_model(max_length=96, fit_steps="auto")   # its own programs and verdicts
    monkeypatch.setattr(HybridLM, "verify_step_fit", lambda self, batch=1: False)
    assert not distinct.fits_one_chunk(2)
    assert distinct.prepare_prefill(np.ones((2, 5), np.int32), NONE)[0].shape[1] >= 16


def test_the_engine_answers_a_one_chunk_suffix_bitwise_as_the_uncached_model(fitted):
    model, params = fitted
    rng = np.random.default_rng(6)
    doc = rng.integers(0, 256, 48).astype(np.int32)
    engine = Engine(model, params, policy="block:16", capacity_entries=4, background_resolve=False)
    engine.prefill(doc)
    question = np.concatenate([doc, rng.integers(0, 256, 5).astype(np.int32)])
    result = engine.prefill(question)
    assert result.stats.resume_position == 48 and result.stats.recomputed_tokens == 5
    want = model.prefill(params, question[None], model.init_state(1), NONE)[0][0]
    np.testing.assert_array_equal(np.asarray(result.last_logits), np.asarray(want))


def test_bad_fit_steps_and_gemm_settings_are_refused():
    with pytest.raises(ValueError, match="fit_steps"):
        grouped_model(fit_steps="maybe")
    with pytest.raises(ValueError, match="gemm"):
        gemm_compiler_options("triton")
    assert gemm_compiler_options("xla") == ()
    with pytest.raises(ValueError, match="command_buffers"):
        grouped_model(command_buffers="sometimes")


def test_command_buffer_setting_survives_rechunking_and_the_profilers_rebuild():
    from sparse_prefix.experiments.profile_prefill import undonated

    model = grouped_model(command_buffers="off")
    assert model.with_chunking(chunks_per_step=1).command_buffers == "off"
    assert undonated(model).command_buffers == "off"
    assert model.prefill_compiler_options == ()            # nothing to switch off a GPU
