"""The "pallas" Gated DeltaNet state recursion, run in Pallas' interpreter on CPU: it matches the XLA
scan, passes the state bitwise through sub-chunks without a real token, and keeps a prefill resumed
on the chunk grid bitwise equal to the uncached one (a sub-chunk's numbers do not depend on where it
sits in the call)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models.gated_deltanet import GDNConfig, _delta_rule_blocks
from sparse_prefix.models.gdn_pallas import delta_recurrence_pallas, supported
from sparse_prefix.models.hybrid import HybridLM, hybrid_tiny_config
from sparse_prefix.testing import emission_difference, resume_difference

B, T, H, DK, DV, SUB = 2, 96, 2, 16, 32, 32
HIGHEST = jax.lax.Precision.HIGHEST


@pytest.fixture(scope="module")
def rule_inputs():
    """Normalised q, k, values, log-decays, betas and a state; row 1's second sub-chunk and row 0's
    last hold no real token (beta = g = 0 there, as the mixer pads)."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, H, DK)).astype(np.float32)
    k = rng.normal(size=(B, T, H, DK)).astype(np.float32)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True) * DK ** -0.5
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, DV)).astype(np.float32)
    g = -rng.uniform(0.0, 0.5, size=(B, T, H)).astype(np.float32)
    beta = (1 / (1 + np.exp(-2 * rng.normal(size=(B, T, H))))).astype(np.float32)
    sub_valid = np.array([[True, True, False], [True, False, True]])
    valid = np.repeat(sub_valid, SUB, axis=1)
    g, beta = np.where(valid[..., None], g, 0.0), np.where(valid[..., None], beta, 0.0)
    state = rng.normal(size=(B, H, DK, DV)).astype(np.float32)
    return q, k, v, g, beta, state, sub_valid


def _rule(recurrence):
    return jax.jit(lambda q, k, v, g, beta, state, sub_valid: _delta_rule_blocks(
        q, k, v, g, beta, state, sub_valid, SUB, HIGHEST, "doubling", recurrence))


def test_pallas_recurrence_matches_the_xla_scan_and_passes_the_state_bitwise_where_no_token_is_real(
        rule_inputs):
    out, final, entering, _ = _rule("pallas")(*rule_inputs)
    want_out, want_final, want_entering, _ = _rule("xla")(*rule_inputs)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final), np.asarray(want_final), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(entering), np.asarray(want_entering), atol=2e-5, rtol=1e-5)
    entering, final = np.asarray(entering), np.asarray(final)
    np.testing.assert_array_equal(entering[0, 0], rule_inputs[5][0])         # entering[0]: the input
    np.testing.assert_array_equal(entering[2, 1], entering[1, 1])            # row 1, sub-chunk 1
    np.testing.assert_array_equal(final[0], entering[2, 0])                  # row 0, sub-chunk 2


@pytest.mark.parametrize("recurrence", ["pallas", "xla"])
def test_the_rule_writes_each_emitted_chunk_exit_into_its_slot_and_layer_and_touches_nothing_else(
        rule_inputs, recurrence):
    """exits=(buffers, slot, layer): the state after chunk g (here two sub-chunks of 16 each) lands
    at [b, slot[b, g], layer] where slot < K; every other byte of the buffers keeps its value."""
    slots, layers, sentinel, sub = 3, 2, -7.0, SUB // 2
    q, k, v, g, beta, state, sub_valid = rule_inputs
    sub_valid = np.repeat(sub_valid, 2, axis=1)                          # [B, 6] sub-chunks of 16
    buffers = np.full((B, slots, layers, H, DK, DV), sentinel, np.float32)
    slot = np.array([[0, slots, 2], [slots, 1, slots]], np.int32)
    rule = jax.jit(lambda *args: _delta_rule_blocks(*args[:7], sub, HIGHEST, "doubling", recurrence,
                                                    (args[7], args[8], args[9])))
    _, final, entering, written = rule(q, k, v, g, beta, state, sub_valid, buffers, slot,
                                       jnp.int32(1))
    after = np.concatenate([np.asarray(entering)[2::2], np.asarray(final)[None]])   # [G, B, ...]
    want = buffers.copy()
    for b in range(B):
        for chunk in range(3):
            if slot[b, chunk] < slots:
                want[b, slot[b, chunk], 1] = after[chunk, b]
    np.testing.assert_array_equal(np.asarray(written), want)


def test_pallas_recurrence_keeps_the_state_exactly_under_a_zero_decay_and_garbage_inputs():
    """keep false selects the old state: even NaN / inf inputs and a zero decay leave it bitwise."""
    rng = np.random.default_rng(1)
    n, c = 2, 16
    u = rng.normal(size=(n, 1, 1, c, 16)).astype(np.float32)
    w = rng.normal(size=(n, 1, 1, c, 16)).astype(np.float32)
    k = rng.normal(size=(n, 1, 1, c, 16)).astype(np.float32)
    u[1], w[1], k[1] = np.nan, np.inf, np.nan
    end = np.array([0.5, 0.0], np.float32).reshape(n, 1, 1, 1, 1)
    keep = np.array([True, False]).reshape(n, 1, 1, 1, 1)
    state = rng.normal(size=(1, 1, 16, 16)).astype(np.float32)
    final, entering, _ = delta_recurrence_pallas(u, w, k, end, keep, state, HIGHEST)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(entering[1]))
    assert np.all(np.isfinite(np.asarray(final)))


def test_pallas_recurrence_shape_support_is_reported_not_guessed():
    assert supported(256, 128, 128) and supported(16, 16, 16)
    assert not supported(4, 16, 16)          # sub_chunk below Triton's 16
    assert not supported(64, 8, 16)          # head_k_dim below 16
    assert not supported(64, 128, 96)        # head_v_dim not a power of two


def test_pallas_recurrence_is_a_checked_config_choice():
    with pytest.raises(ValueError, match="recurrence"):
        GDNConfig(d_model=32, num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=16,
                  recurrence="bogus")
    assert GDNConfig(d_model=32, num_k_heads=2, num_v_heads=4, head_k_dim=16,
                     head_v_dim=16).recurrence == "xla"


def test_prefill_and_decode_on_the_pallas_kernels_resume_and_emit_bitwise_and_match_xla():
    """The presets' GPU path on CPU: the GDN recursion kernel, the UT solve kernel
    (`gdn_solve_pallas`) and the attention read kernel (`attention_pallas`) together, against the
    XLA scan, the doubling and XLA's blocked read."""
    base = hybrid_tiny_config()
    gdn = dataclasses.replace(base.gdn, head_k_dim=16, head_v_dim=16, sub_chunk=16,
                              recurrence="pallas", solver="pallas")
    attention = dataclasses.replace(base.attention, head_dim=16, kernel="pallas")
    config = dataclasses.replace(base, gdn=gdn, attention=attention, chunk_size=32,
                                 chunks_per_step=2, max_length=128)
    # 2-chunk steps throughout (the kernel's subject; one-chunk calls: tests/test_fit_steps.py)
    model = HybridLM(config, dtype=jnp.float32, donate_state=False, fit_steps="off")
    reference = HybridLM(dataclasses.replace(
        config, gdn=dataclasses.replace(gdn, recurrence="xla", solver="doubling"),
        attention=dataclasses.replace(attention, kernel="xla")), dtype=jnp.float32, donate_state=False)
    params = model.init_params(jax.random.PRNGKey(0))
    assert resume_difference(model, params, 80, split=32) == (32, 0.0)   # C = 32, not on G C = 64
    # written from inside the kernel (2 sub-chunks a chunk): chunk 0 (g = 0 of the first step)
    # and chunk 1 (g = 1)
    assert emission_difference(model, params, 80, [32, 64]) == 0.0
    assert model.stack.uses_kernels()                      # buffers from the padding-zeroing kernel
    _, _, emitted = model.prefill(params, np.zeros((1, 80), np.int32), model.init_state(1),
                                  np.array([[32, 0]], np.int32))
    assert all(not np.any(np.asarray(leaf)[:, 1]) for leaf in jax.tree_util.tree_leaves(emitted.recurrent))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 80), dtype=np.int32)
    none = np.zeros((0,), np.int32)
    want_logits, want_state, _ = model.prefill(params, tokens, model.init_state(1), none)
    xla_logits, xla_state, _ = reference.prefill(params, tokens, reference.init_state(1), none)
    np.testing.assert_allclose(np.asarray(want_logits), np.asarray(xla_logits), atol=1e-4, rtol=1e-4)
    for got, want in zip(jax.tree_util.tree_leaves(want_state), jax.tree_util.tree_leaves(xla_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    token = np.array([3], np.int32)                 # one decode step reads through the kernel too
    step_logits, _ = model.decode(params, token, want_state)
    xla_step_logits, _ = reference.decode(params, token, xla_state)
    np.testing.assert_allclose(np.asarray(step_logits), np.asarray(xla_step_logits), atol=1e-4, rtol=1e-4)


def test_the_gdn_kernels_lower_to_triton_for_a_gpu_from_this_machine(monkeypatch):
    """Lowering to Triton (what a GPU compile runs first) works without a GPU: it catches what
    Pallas' interpreter accepts and Triton does not (e.g. an integer op on mixed types)."""
    from sparse_prefix.models import gdn_pallas, gdn_solve_pallas

    for module in (gdn_pallas, gdn_solve_pallas):
        monkeypatch.setattr(module, "interpret", lambda: False)
    f32, n, c, d = jnp.float32, 8, 64, 128
    rows = jax.ShapeDtypeStruct((n, 1, 2, c, d), f32)
    args = (rows, rows, rows, jax.ShapeDtypeStruct((n, 1, 2, 1, 1), f32),
            jax.ShapeDtypeStruct((n, 1, 1, 1, 1), bool), jax.ShapeDtypeStruct((1, 2, d, d), f32))
    exits = (jax.ShapeDtypeStruct((1, 4, 3, 2, d, d), f32), jax.ShapeDtypeStruct((1, 2), jnp.int32),
             jax.ShapeDtypeStruct((), jnp.int32))
    plain = lambda *a: delta_recurrence_pallas(*a, None)                         # noqa: E731
    emitting = lambda *a: delta_recurrence_pallas(*a[:6], None, exits=a[6:])     # noqa: E731
    solve = lambda lower, rhs: gdn_solve_pallas.unit_lower_solve_pallas(lower, rhs, None)  # noqa: E731
    for fn, shapes in [(plain, args), (emitting, args + exits),
                       (solve, (jax.ShapeDtypeStruct((4, c, c), f32),
                                jax.ShapeDtypeStruct((4, c, 2 * d), f32)))]:
        text = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text
