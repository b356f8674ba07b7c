"""Mamba2: the equivalence matrix, backends, compilation bound, dtypes, presets and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models import build, create
from sparse_prefix.models.mamba2 import Mamba2LM
from sparse_prefix.protocol import RecurrentLM, RecurrentState, State
from sparse_prefix.testing import assert_same_model_outputs, check_model

B, T = 2, 59  # the shapes check_model uses on mamba2-tiny (C = 16): one T bucket (64), one K bucket


@pytest.fixture(scope="module")
def tiny():
    return create("mamba2-tiny", dtype=jnp.float32)


def _tokens(seed, batch=B, total=T, vocab=512):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, total)).astype(np.int32)


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_mamba2_tiny_implements_the_contract_and_passes_the_equivalence_matrix(tiny):
    model, params = tiny
    assert isinstance(model, RecurrentLM)
    report = check_model(model, params, batch=B)
    assert report["bitwise_checks"] > 50 and report["tolerance_checks"] > 50
    assert report["max_off_grid_error"] < 1e-5 and report["max_decode_error"] < 1e-4


def test_chunked_and_sequential_backends_agree_on_logits_states_and_checkpoints(tiny):
    model, params = tiny
    sequential = Mamba2LM(model.config.replace(backend="sequential"))
    tokens, lengths = _tokens(1), np.array([T, 41], np.int32)
    ckpts = np.array([[5, 16, 33, 0], [1, 17, 0, 40]], np.int32)
    outs = [m.prefill(params, tokens, m.init_state(B), ckpts, lengths) for m in (model, sequential)]
    (logits_c, state_c, emitted_c), (logits_s, state_s, emitted_s) = outs
    assert _rel(logits_c, logits_s) < 1e-5
    for got, want in zip(jax.tree_util.tree_leaves((state_c, emitted_c)),
                         jax.tree_util.tree_leaves((state_s, emitted_s))):
        if jnp.issubdtype(want.dtype, jnp.floating):
            assert _rel(got, want) < 1e-5
        else:
            np.testing.assert_array_equal(got, want)


def test_forward_logits_match_prefill_at_every_checked_length(tiny):
    model, params = tiny
    tokens = _tokens(2)
    full = model.forward(params, tokens)
    assert full.shape == (B, T, 512) and full.dtype == jnp.float32
    for cut in (1, 16, 37):
        logits, _, _ = model.prefill(params, tokens, model.init_state(B), np.zeros(0, np.int32),
                                     np.array([cut, T], np.int32))
        np.testing.assert_allclose(logits[0], full[0, cut - 1], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits[1], full[1, T - 1], rtol=1e-5, atol=1e-5)


def test_a_replay_of_50_random_lengths_compiles_once_per_length_bucket(tiny):
    model, params = tiny
    rng = np.random.default_rng(3)
    before = model.compile_count
    for _ in range(50):
        total = int(rng.integers(1, 4 * model.chunk_size + 1))
        lengths = rng.integers(1, total + 1, size=B).astype(np.int32)
        lengths[0] = total
        slots = int(rng.integers(0, 5))
        ckpts = np.zeros((B, slots), np.int32)
        for row in range(B):
            valid = np.sort(rng.choice(np.arange(1, lengths[row] + 1),
                                       size=min(slots, lengths[row]), replace=False))
            ckpts[row, :valid.size] = valid
        logits, state, emitted = model.prefill(params, _tokens(int(rng.integers(1 << 30)), B, total),
                                               model.init_state(B), ckpts, lengths)
        assert emitted.lengths.shape == (B, slots)
        np.testing.assert_array_equal(state.length, lengths)
    # lengths 1..64 with C = 16 fall in the buckets 16, 32, 64; K = 0 (no emission) and 1..4
    # checkpoint slots in two K buckets.
    assert model.compile_count - before <= 6


def test_bf16_model_keeps_float32_states_and_tracks_the_float32_model(tiny):
    model32, params32 = tiny
    model, params = create("mamba2-tiny")
    assert params.embedding.dtype == jnp.bfloat16 and params.layers.mixer.A_log.dtype == jnp.float32
    abstract = model.abstract_state(B)
    assert all(layer.ssm.dtype == jnp.float32 and layer.conv.dtype == jnp.bfloat16
               for layer in abstract.recurrent)
    tokens = _tokens(4)
    logits, state, _ = model.prefill(params, tokens, model.init_state(B), np.zeros(0, np.int32))
    params_as32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), params)
    want, _, _ = model32.prefill(params_as32, tokens, model32.init_state(B), np.zeros(0, np.int32))
    assert logits.dtype == jnp.float32 and state.recurrent[0].ssm.dtype == jnp.float32
    assert _rel(logits, want) < 0.02  # measured 0.005


def test_presets_have_the_state_spaces_shapes():
    model = build("mamba2-130m")
    shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))
    # embedding 50288 * 768 + 24 * (in_proj 768 * 3352 + conv 1792 * 5 + 3 * 24 + 1536 + out_proj
    # 1536 * 768 + norm 768) + norm_f 768, tied head.
    assert count == 50288 * 768 + 24 * (768 * 3352 + 1792 * 5 + 72 + 1536 + 1536 * 768 + 768) + 768
    assert (model.chunk_size, model.vocab_size, model.dtype) == (256, 50288, jnp.bfloat16)
    assert model.max_length >= 16384
    profile = model.memory_profile()
    assert profile.ssm_elements == 24 * 24 * 64 * 128
    assert profile.checkpoint_bytes == 4 * 24 * 24 * 64 * 128 + 2 * 24 * 3 * 1792
    assert profile.kv_bytes_per_token == 0
    widths = {name: build(name).config.d_model for name in
              ("mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b")}
    depths = {name: build(name).config.n_layer for name in widths}
    assert widths == {"mamba2-370m": 1024, "mamba2-780m": 1536, "mamba2-1.3b": 2048,
                      "mamba2-2.7b": 2560}
    assert depths == {"mamba2-370m": 48, "mamba2-780m": 48, "mamba2-1.3b": 48, "mamba2-2.7b": 64}


def test_padding_checkpoint_slots_are_returned_with_the_callers_k(tiny):
    model, params = tiny
    for slots in (0, 1, 3):
        ckpts = np.zeros((slots,), np.int32)
        _, _, emitted = model.prefill(params, _tokens(5), model.init_state(B), ckpts)
        assert emitted.lengths.shape == (B, slots)
        assert emitted.recurrent[0].ssm.shape == (B, slots, 8, 16, 16)


@pytest.mark.parametrize("tokens, lengths, ckpts, error, message", [
    (np.full((B, 8), 512), None, [], ValueError, "token ids"),
    (np.full((B, 8), -1), None, [], ValueError, "token ids"),
    (np.zeros((B, 0), np.int32), None, [], ValueError, "non-empty"),
    (np.zeros((B, 8), np.float32), None, [], TypeError, "integer"),
    (np.zeros((B, 8), np.int32), None, [5, 3], ValueError, "strictly increase"),
    (np.zeros((B, 8), np.int32), None, [3, 3], ValueError, "strictly increase"),
    (np.zeros((B, 8), np.int32), None, [9], ValueError, "beyond"),
    (np.zeros((B, 8), np.int32), [8, 4], [[2], [5]], ValueError, "beyond"),
    (np.zeros((B, 8), np.int32), None, [[1, 2]], ValueError, "checkpoints must have shape"),
])
def test_bad_prefill_arguments_raise_a_named_error(tiny, tokens, lengths, ckpts, error, message):
    model, params = tiny
    with pytest.raises(error, match=message):
        model.prefill(params, tokens, model.init_state(B), np.asarray(ckpts, np.int32), lengths)


def test_a_state_of_the_wrong_shape_dtype_or_kind_raises_a_named_error(tiny):
    model, params = tiny
    tokens = np.zeros((B, 8), np.int32)
    good = model.init_state(B)
    layer = good.recurrent[0]
    wrong_dtype = good._replace(recurrent=(RecurrentState(layer.ssm.astype(jnp.bfloat16), layer.conv),)
                                + good.recurrent[1:])
    wrong_shape = good._replace(recurrent=(RecurrentState(layer.ssm[:, :4], layer.conv),)
                                + good.recurrent[1:])
    with pytest.raises(ValueError, match=r"recurrent\[0\].*ssm.*float32"):
        model.prefill(params, tokens, wrong_dtype, np.zeros(0, np.int32))
    with pytest.raises(ValueError, match=r"recurrent\[0\].*ssm.*shape \(2, 8, 16, 16\)"):
        model.prefill(params, tokens, wrong_shape, np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="structure"):
        model.prefill(params, tokens, good._replace(recurrent=good.recurrent[:1]), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="shape"):
        model.prefill(params, tokens, model.init_state(3), np.zeros(0, np.int32))
    with pytest.raises(TypeError, match="State"):
        model.prefill(params, tokens, tuple(good), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="shape"):
        model.decode(params, np.zeros((B,), np.int32), wrong_shape)
    with pytest.raises(ValueError, match="token ids"):
        model.decode(params, np.array([0, 512], np.int32), good)
    with pytest.raises(ValueError, match="one per state row"):
        model.decode(params, np.zeros((B, 1), np.int32), good)
    full = good._replace(length=jnp.full((B,), model.max_length - 4, jnp.int32))
    with pytest.raises(ValueError, match="max_length"):
        model.prefill(params, tokens, full, np.zeros(0, np.int32))


def test_init_state_is_a_zero_state_without_kv(tiny):
    model, _ = tiny
    state = model.init_state(3)
    assert isinstance(state, State) and state.kv is None
    assert len(state.recurrent) == model.config.n_layer
    assert all(float(jnp.abs(leaf).sum()) == 0 for leaf in jax.tree_util.tree_leaves(state))
    assert jax.tree_util.tree_structure(model.abstract_state(3)) == jax.tree_util.tree_structure(state)


def test_prepared_params_give_the_same_prefill_decode_and_forward(tiny):
    model, params = tiny
    prepared = model.prepare_params(params)
    assert isinstance(prepared.layers, tuple) and len(prepared.layers) == model.config.n_layer
    assert model.prepare_params(prepared) is prepared                 # already prepared: as is
    tokens = np.random.default_rng(5).integers(0, model.vocab_size, (2, 40), dtype=np.int32)
    ckpts = np.array([[16, 32], [16, 32]], np.int32)
    assert_same_model_outputs(model, params, prepared, tokens, ckpts)
    np.testing.assert_allclose(np.asarray(model.forward(prepared, tokens)),
                               np.asarray(model.forward(params, tokens)), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="Mamba2Params"):
        model.prepare_params({"layers": params.layers})


def test_command_buffer_setting_is_validated_kept_by_rechunking_and_off_by_default_on_gpus(
        tiny, monkeypatch):
    from sparse_prefix.chunking import prefill_compiler_options
    model, _ = tiny
    with pytest.raises(ValueError, match="command_buffers"):
        Mamba2LM(model.config, command_buffers="sometimes")
    assert model.with_chunking(chunks_per_step=2).command_buffers == model.command_buffers
    assert model.prefill_compiler_options == prefill_compiler_options(model.command_buffers, "off")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    off = (("xla_gpu_enable_command_buffer", ""),)
    assert prefill_compiler_options("auto", auto_default="off") == off
    assert prefill_compiler_options("off") == off and prefill_compiler_options("on") == ()
    assert prefill_compiler_options("auto") == ()


def test_kernel_path_emits_every_real_slot_into_buffers_zeroed_only_at_padding():
    """The GPU-kernel path (Pallas' interpreter here) starts its checkpoint buffers from
    `padding_zeroed_buffers`: every real slot must still be written by the prefill (it would read
    0 otherwise), padding slots read 0 (their fill is tested in test_pallas_common)."""
    model, params = create("mamba2-tiny", dtype=jnp.float32)
    kernels = Mamba2LM(model.config.replace(backend="pallas", chunks_per_step=2), donate_state=False)
    reference = Mamba2LM(kernels.config.replace(backend="chunked"), donate_state=False)
    tokens = np.random.default_rng(3).integers(0, model.vocab_size, (2, 80)).astype(np.int32)
    ckpts = np.array([[16, 48, 64, 80], [32, 0, 0, 0]], np.int32)       # 4 slots: no slicing
    got = kernels.prefill(params, tokens, kernels.init_state(2), ckpts)[2]
    want = reference.prefill(params, tokens, reference.init_state(2), ckpts)[2]
    np.testing.assert_array_equal(got.lengths, want.lengths)
    for got_leaf, want_leaf in zip(jax.tree_util.tree_leaves(got.recurrent),
                                   jax.tree_util.tree_leaves(want.recurrent)):
        assert float(jnp.min(jnp.abs(got_leaf[0]).reshape(4, -1).max(axis=1))) > 0   # all written
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)
        assert not np.any(np.asarray(got_leaf[1, 1:]))
