"""A call that lays out one chunk runs one chunk (`HybridLM.fit_steps`, default "auto"), with the bits
of a G-chunk step by construction.

hybrid-tiny at G = 2 (C = 8): a one-chunk call gets the width C and runs its projections, attention,
MLP and norms on C rows, while every GDN layer runs its delta rule on the step's G chunks behind
optimization barriers (the same rule program as in every G-chunk step: on a GPU cuBLAS picks the
rule's batched matmul kernels by batch count). Every other call, every call with fit_steps="off" and
every call of a pattern with Mamba2 layers keeps G-chunk steps. Resumes that end in a one-chunk
suffix, through the model and through the Engine, must equal the uncached call bit for bit.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.engine import Engine
from sparse_prefix.models.gated_deltanet import (_rule_in_isolation, gdn_mixer_group, init_gdn_params,
                                                  init_gdn_state)
from sparse_prefix.models.hybrid import (HybridLM, gemm_compiler_options, hybrid_tiny_config,
                                         mamba2_attention_tiny_config)
from sparse_prefix.testing import resume_difference

NONE = np.zeros((0,), np.int32)


def grouped_model(max_length=128, **kwargs):
    config = dataclasses.replace(hybrid_tiny_config(), chunks_per_step=2, max_length=max_length)
    return HybridLM(config, dtype=jnp.float32, **kwargs)


@pytest.fixture(scope="module")
def fitted():
    model = grouped_model()
    return model, model.init_params(np.array([0, 3], np.uint32))


def test_a_one_chunk_call_gets_the_width_of_one_chunk_and_longer_calls_keep_group_steps(fitted):
    model, _ = fitted
    assert model.fit_steps == "auto" and model.fits_one_chunk()
    assert model.prepare_prefill(np.ones((1, 5), np.int32), NONE)[0].shape == (1, 8)
    assert model.prepare_prefill(np.ones((1, 8), np.int32), NONE)[0].shape == (1, 8)
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


def test_fit_steps_off_and_mamba2_layers_keep_one_chunk_calls_in_a_group_step():
    off = grouped_model(fit_steps="off")
    assert not off.fits_one_chunk()
    assert off.prepare_prefill(np.ones((1, 5), np.int32), NONE)[0].shape[1] >= 16
    config = mamba2_attention_tiny_config().with_chunking(chunks_per_step=2)
    mixed = HybridLM(config, dtype=jnp.float32)                 # "auto": Mamba2 layers keep G steps
    assert not mixed.fits_one_chunk()
    assert mixed.prepare_prefill(np.ones((2, 5), np.int32), NONE)[0].shape[1] >= 16
    with pytest.raises(ValueError, match="fit_steps='on' needs a pattern of G and A layers"):
        HybridLM(config, dtype=jnp.float32, fit_steps="on")


def test_a_one_chunk_gdn_call_runs_its_delta_rule_on_the_steps_chunks_behind_barriers():
    cfg = hybrid_tiny_config().gdn
    params = init_gdn_params(jax.random.PRNGKey(0), cfg, jnp.float32)
    state = init_gdn_state(cfg, 1, jnp.float32)
    x = jnp.zeros((1, 1, 8, cfg.d_model), jnp.float32)
    valid = jnp.ones((1, 1, 8), bool)
    jaxpr = jax.make_jaxpr(lambda x, state: gdn_mixer_group(params, cfg, x, state, valid,
                                                            rule_chunks=2))(x, state)
    fences = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "optimization_barrier"]
    assert len(fences) == 2
    widths = {var.aval.shape[1] for var in fences[0].invars[:5]}
    assert widths == {16}                  # q, k, v, g, beta padded from C = 8 to G x C = 16 slots
    y, _, _ = gdn_mixer_group(params, cfg, x, state, valid, rule_chunks=2)
    assert y.shape == x.shape
    with pytest.raises(ValueError, match="whole sub-chunks"):
        _rule_in_isolation(*(jnp.zeros((1, 8, 2, 8)),) * 3, *(jnp.zeros((1, 8, 2)),) * 2,
                           jnp.zeros((1, 2, 8, 8)), jnp.ones((1, 2), bool), cfg,
                           jax.lax.Precision.HIGHEST, 4)


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
