"""Hybrid stacks: the equivalence matrix, backends, presets, memory profile, compilations, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models import build
from sparse_prefix.models.attention import AttentionConfig
from sparse_prefix.models.gated_deltanet import GDNConfig
from sparse_prefix.models.checkpoint_io import load_model, save_model
from sparse_prefix.models.hybrid import (HybridConfig, HybridLM, hybrid_tiny_config,
                                         mamba2_attention_tiny_config)
from sparse_prefix.testing import check_model

WIDTH = 40  # every prefill here uses T = 40 (bucket 64) and K <= 4: one compilation per model


def scaled_params(model, seed=0):
    """NumPy random parameters of the model's layout: unit-gain projections (signals O(1)), norm
    weights near their identity, decays spread over (0.5, 8)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    plain_norms = {"norm_weight", "norm"} | ({"input_norm", "post_norm", "final_norm"}
                                             if model.config.norm_offset == 0 else set())

    def draw(path, leaf):
        name = getattr(path[-1], "key", None) or getattr(path[-1], "name", None)
        if name == "A_log":
            value = np.log(rng.uniform(0.5, 8.0, leaf.shape))
        elif name in ("dt_bias", "D"):
            value = np.ones(leaf.shape)
        elif len(leaf.shape) == 2:
            value = rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0])
        else:
            value = (name in plain_norms) + 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tiny():
    model = HybridLM(hybrid_tiny_config(), dtype=jnp.float32, donate_state=False)
    return model, scaled_params(model)


def test_hybrid_tiny_passes_the_equivalence_matrix(tiny):
    model, params = tiny
    before = model.compile_count
    report = check_model(model, params)
    assert report["bitwise_checks"] > 0 and report["max_decode_error"] < 1e-4
    assert model.compile_count - before <= 3            # two prefill widths (one cross-bucket), decode


def test_mamba2_attention_stack_passes_the_equivalence_matrix():
    model = HybridLM(mamba2_attention_tiny_config(), dtype=jnp.float32)      # donates its state
    before = model.compile_count
    report = check_model(model, scaled_params(model, seed=1))
    assert report["bitwise_checks"] > 0 and report["max_decode_error"] < 1e-4
    assert model.compile_count - before <= 3


def test_bfloat16_compute_keeps_float32_states_and_resumes_bitwise_on_the_grid():
    model = HybridLM(hybrid_tiny_config(), dtype=jnp.bfloat16, donate_state=False)
    params = scaled_params(model)
    state = model.abstract_state(2)
    assert all(layer.ssm.dtype == jnp.float32 and layer.conv.dtype == jnp.bfloat16
               for layer in state.recurrent)
    assert all(cache.k.dtype == jnp.bfloat16 for cache in state.kv)
    tokens = np.random.default_rng(5).integers(0, model.vocab_size, (2, WIDTH)).astype(np.int32)
    lengths = np.array([WIDTH, 27], np.int32)
    logits, final, emitted = model.prefill(params, tokens, model.init_state(2), [16, 24], lengths)
    assert emitted.recurrent[0].ssm.dtype == jnp.float32
    restored = model.restore(final, emitted, np.array([0, 1], np.int32))      # at 16 and at 24
    starts = np.array([16, 24])
    rest = np.zeros_like(tokens)
    for row, start in enumerate(starts):
        rest[row, :WIDTH - start] = tokens[row, start:]
    again, resumed, _ = model.prefill(params, rest, restored, np.zeros(4, np.int32), lengths - starts)
    np.testing.assert_array_equal(again, logits)
    for leaf, ref in zip(jax.tree_util.tree_leaves(resumed.recurrent),
                         jax.tree_util.tree_leaves(final.recurrent)):
        np.testing.assert_array_equal(leaf, ref)
    for cache, ref in zip(resumed.kv, final.kv):
        np.testing.assert_array_equal(cache.k[0, :WIDTH], ref.k[0, :WIDTH])
        np.testing.assert_array_equal(cache.v[1, :27], ref.v[1, :27])


def test_forward_logits_at_every_position_match_prefill(tiny):
    model, params = tiny
    tokens = np.random.default_rng(2).integers(0, model.vocab_size, (2, 30)).astype(np.int32)
    logits = model.forward(params, tokens)                          # T = 30 runs padded to 32
    assert logits.shape == (2, 30, model.vocab_size)
    padded = np.pad(tokens, ((0, 0), (0, WIDTH - 30)))
    last, _, _ = model.prefill(params, padded, model.init_state(2), np.zeros(4, np.int32),
                               np.array([17, 30], np.int32))
    np.testing.assert_allclose(logits[[0, 1], [16, 29]], last, atol=1e-5, rtol=1e-5)


def test_compile_count_stays_fixed_across_lengths_and_checkpoint_counts(tiny):
    model, params = tiny
    tokens = np.random.default_rng(3).integers(0, model.vocab_size, (2, WIDTH)).astype(np.int32)
    model.prefill(params, tokens, model.init_state(2), np.zeros(4, np.int32))
    before = model.compile_count
    for total, ckpts in [(33, [8]), (40, [1, 2, 3, 4]), (64, []), (50, [[3, 9], [0, 16]])]:
        batch_tokens = np.random.default_rng(total).integers(0, model.vocab_size, (2, total))
        model.prefill(params, batch_tokens.astype(np.int32), model.init_state(2),
                      np.asarray(ckpts, np.int32).reshape(-1) if np.ndim(ckpts) < 2 else ckpts)
    assert model.compile_count == before


def test_qwen35_group_memory_profile_gives_the_papers_ratio_768():
    profile = build("qwen3.5-0.8b-group").memory_profile()
    assert profile.ssm_elements == 3 * 16 * 128 * 128
    assert profile.kv_elements_per_token == 2 * 2 * 256
    assert profile.ssm_elements // profile.kv_elements_per_token == 768
    assert profile.kv_bytes_per_token == 2 * profile.kv_elements_per_token          # bf16 KV
    conv = 3 * 3 * (2 * 16 * 128 + 16 * 128)
    assert profile.checkpoint_elements == profile.ssm_elements + conv
    assert profile.checkpoint_bytes == 4 * profile.ssm_elements + 2 * conv


def test_qwen35_presets_have_the_published_text_shape():
    full = build("qwen3.5-0.8b").config
    assert full.pattern == "GGGA" * 6 and (full.d_model, full.d_ff, full.vocab_size) == (1024, 3584, 248320)
    assert full.tie_embeddings and full.norm_offset == 1.0 and full.max_length >= 16384
    a, g = full.attention, full.gdn
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rotary_dim, a.rope_theta) == (8, 2, 256, 64, 1e7)
    assert (g.num_k_heads, g.num_v_heads, g.head_k_dim, g.head_v_dim, g.conv_width) == (16, 16, 128, 128, 4)
    group = build("qwen3.5-0.8b-group").config
    assert group.pattern == "GGGA" and group.attention == a and group.gdn == g
    for name in ("hybrid-tiny", "mamba2-attn-tiny"):
        tiny = build(name)
        assert tiny.chunk_size <= 32 and tiny.vocab_size <= 512


def test_state_layout_follows_the_pattern():
    model = build("hybrid-tiny")
    state = model.abstract_state(3)
    assert len(state.recurrent) == model.config.pattern.count("G")
    assert len(state.kv) == model.config.pattern.count("A")
    assert state.kv[0].k.shape == (3, model.max_length, 2, 8) and state.length.shape == (3,)


def test_configs_and_models_round_trip_through_json_and_orbax(tiny, tmp_path):
    model, params = tiny
    for config in (model.config, mamba2_attention_tiny_config(), build("qwen3.5-0.8b").config):
        assert HybridConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    save_model(str(tmp_path / "saved"), model, params)
    loaded, loaded_params = load_model(str(tmp_path / "saved"))
    assert isinstance(loaded, HybridLM) and loaded.config == model.config
    for got, want in zip(jax.tree_util.tree_leaves(loaded_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(got, want)


def _config(**changes):
    base = dict(vocab_size=16, d_model=8, d_ff=8, pattern="GA", chunk_size=4, max_length=16,
                gdn=GDNConfig(d_model=8, num_k_heads=1, num_v_heads=1, head_k_dim=4, head_v_dim=4,
                              sub_chunk=4),
                attention=AttentionConfig(d_model=8, num_heads=2, num_kv_heads=1, head_dim=4,
                                          rotary_dim=2))
    return HybridConfig(**{**base, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(pattern="GX"), "unknown layer letters"),
    (dict(pattern=""), "pattern"),
    (dict(attention=None), "HybridConfig.attention"),
    (dict(pattern="MA"), "HybridConfig.mamba"),
    (dict(chunk_size=6), "multiple of gdn.sub_chunk"),
    (dict(d_model=16), "differs from d_model"),
    (dict(max_length=0), "max_length"),
])
def test_bad_configs_raise_named_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_bad_calls_raise_named_errors(tiny):
    model, params = tiny
    state = model.init_state(2)
    tokens = np.zeros((2, 8), np.int32)
    with pytest.raises(ValueError, match="state"):
        model.prefill(params, tokens, model.init_state(3), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="token ids"):
        model.prefill(params, tokens + model.vocab_size, state, np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="max_length"):
        model.prefill(params, tokens, state._replace(length=np.full(2, 125, np.int32)),
                      np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="max_length"):
        model.decode(params, np.zeros(2, np.int32), state._replace(length=np.full(2, 128, np.int32)))
    with pytest.raises(ValueError, match="shape"):
        model.decode(params, np.zeros(3, np.int32), state)
    with pytest.raises(ValueError, match="token ids"):
        model.decode(params, np.full(2, -1, np.int32), state)
    with pytest.raises(ValueError, match="max_length"):
        model.forward(params, np.zeros((1, 129), np.int32))
    _, final, emitted = model.prefill(params, np.zeros((2, WIDTH), np.int32), state, [8, 16])
    with pytest.raises(ValueError, match="k must lie in 0..1"):
        model.restore(final, emitted, np.array([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        model.restore(final, emitted, np.array([0]))
    with pytest.raises(TypeError, match="HybridConfig"):
        HybridLM(object())
    with pytest.raises(ValueError, match="backend"):
        HybridLM(hybrid_tiny_config(), backend="fast")
