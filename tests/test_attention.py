"""Gated attention with a KV buffer: chunked == naive causal attention, stale entries inert, decode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models.attention import (
    AttentionConfig, attention_chunk, attention_group, attention_step, init_attention_params)
from sparse_prefix.protocol import KVCache

B, C, S = 2, 8, 32
CFG = AttentionConfig(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4,
                      rope_theta=10_000.0)
BLOCKED = dataclasses.replace(CFG, key_block=8)
VARIANTS = {"dense": CFG, "blocked": BLOCKED}
CHUNK = {name: jax.jit(lambda p, x, cache, pos, valid, cfg=cfg:
                       attention_chunk(p, cfg, x, cache, pos, valid))
         for name, cfg in VARIANTS.items()}
STEP = {name: jax.jit(lambda p, x, cache, pos, cfg=cfg: attention_step(p, cfg, x, cache, pos))
        for name, cfg in VARIANTS.items()}
GROUP = jax.jit(lambda p, x, cache, pos, valid, layer: attention_group(p, BLOCKED, x, cache, pos, valid,
                                                                      layer))


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_attention_params(jax.random.PRNGKey(0), CFG, jnp.float32))
    out = {name: (rng.normal(size=x.shape) / np.sqrt(x.shape[0])).astype(np.float32)
           for name, x in shapes.items()}
    out["q_norm"] = (0.2 * rng.normal(size=CFG.head_dim)).astype(np.float32)
    out["k_norm"] = (0.2 * rng.normal(size=CFG.head_dim)).astype(np.float32)
    return out


def empty_cache(fill=0.0):
    shape = (B, S, CFG.num_kv_heads, CFG.head_dim)
    return KVCache(k=np.full(shape, fill, np.float32), v=np.full(shape, fill, np.float32))


def reference(params, x):
    """Naive causal gated attention in float64 NumPy over a whole sequence x [B, T, d]."""
    def norm(t, w):
        return t / np.sqrt(np.mean(t * t, axis=-1, keepdims=True) + CFG.norm_eps) * (1 + w)

    def rope(t, positions):
        half = CFG.rotary_dim // 2
        freq = 1.0 / CFG.rope_theta ** (np.arange(half) * 2 / CFG.rotary_dim)
        ang = positions[:, None] * freq[None, :]
        cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
        a, b, rest = t[..., :half], t[..., half:CFG.rotary_dim], t[..., CFG.rotary_dim:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin, rest], axis=-1)

    batch, length, _ = x.shape
    h, hk, d = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    qg = (x @ params["q_proj"]).reshape(batch, length, h, 2 * d)
    q, gate = qg[..., :d], qg[..., d:].reshape(batch, length, h * d)
    k = (x @ params["k_proj"]).reshape(batch, length, hk, d)
    v = (x @ params["v_proj"]).reshape(batch, length, hk, d)
    positions = np.arange(length, dtype=np.float64)
    q, k = rope(norm(q, params["q_norm"]), positions), rope(norm(k, params["k_norm"]), positions)
    k, v = np.repeat(k, h // hk, axis=2), np.repeat(v, h // hk, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", weights, v).reshape(batch, length, h * d)
    return (out / (1 + np.exp(-gate))) @ params["o_proj"]


def run_chunks_of(params, x, cache, variant="dense"):
    outs = []
    for start in range(0, x.shape[1], C):
        pos = np.broadcast_to(np.arange(start, start + C, dtype=np.int32), (B, C))
        y, cache = CHUNK[variant](params, x[:, start:start + C], cache, pos, np.ones((B, C), bool))
        outs.append(np.asarray(y))
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_attention_matches_naive_causal_attention(params, variant):
    x = np.random.default_rng(1).normal(size=(B, 3 * C, CFG.d_model)).astype(np.float32)
    ours, _ = run_chunks_of(params, x, empty_cache(), variant)
    np.testing.assert_allclose(ours, reference(params.copy(), x.astype(np.float64)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_stale_and_non_finite_entries_beyond_a_query_contribute_nothing(params, variant):
    x = np.random.default_rng(2).normal(size=(B, 2 * C, CFG.d_model)).astype(np.float32)
    clean, clean_cache = run_chunks_of(params, x, empty_cache(), variant)
    for fill in (np.nan, np.inf, 1e30):
        dirty, dirty_cache = run_chunks_of(params, x, empty_cache(fill), variant)
        np.testing.assert_array_equal(dirty, clean)
        np.testing.assert_array_equal(dirty_cache.k[:, :2 * C], clean_cache.k[:, :2 * C])


def test_padded_slots_write_nothing_and_valid_slots_land_at_their_positions(params):
    x = np.random.default_rng(3).normal(size=(B, C, CFG.d_model)).astype(np.float32)
    pos = np.array([np.arange(5, 5 + C), np.arange(S - 3, S - 3 + C)], np.int32)  # row 1 near S
    valid = np.arange(C)[None, :] < np.array([[6], [3]])
    _, cache = CHUNK["dense"](params, x, empty_cache(7.0), pos, valid)
    written = np.zeros((B, S), bool)
    written[0, 5:11], written[1, S - 3:] = True, True
    assert np.all(np.asarray(cache.k)[~written] == 7.0) and np.all(np.asarray(cache.v)[~written] == 7.0)
    assert not np.any(np.asarray(cache.k)[written] == 7.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_steps_match_the_chunk(params, variant):
    x = np.random.default_rng(4).normal(size=(B, C + 4, CFG.d_model)).astype(np.float32)
    full, _ = run_chunks_of(params, x[:, :C], empty_cache(), variant)
    cache = empty_cache()
    for t in range(C + 4):                         # the blocked read crosses into a second block
        y, cache = STEP[variant](params, x[:, t], cache, np.full((B,), t, np.int32))
        if t < C:
            np.testing.assert_allclose(y, full[:, t], atol=1e-5, rtol=1e-4)
    want = reference(params.copy(), x.astype(np.float64))[:, -1]
    np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-4)


def test_a_batch_mate_reaching_further_changes_no_bit_of_a_row(params):
    """Blocked read: row 0 stays in block 0 while row 1 forces a visit to blocks 1-3."""
    x = np.random.default_rng(5).normal(size=(B, C, CFG.d_model)).astype(np.float32)
    cache = empty_cache(np.nan)
    pos_near = np.stack([np.arange(C), np.arange(C)]).astype(np.int32)
    pos_far = np.stack([np.arange(C), np.arange(S - C, S)]).astype(np.int32)
    valid = np.ones((B, C), bool)
    near, _ = CHUNK["blocked"](params, x, cache, pos_near, valid)
    far, _ = CHUNK["blocked"](params, x, cache, pos_far, valid)
    np.testing.assert_array_equal(near[0], far[0])


def test_a_chunk_reads_the_same_bits_in_any_group_slot_of_a_stacked_cache(params):
    """Two chunks per group (blocked read): chunk 1 sits in slot 1 of the first call and slot 0 of
    the second (which reaches a further key block); its output and K/V are bitwise the same, and the
    stacked cache's other layer is untouched."""
    x = np.random.default_rng(6).normal(size=(B, 3, C, CFG.d_model)).astype(np.float32)
    pos = np.broadcast_to(np.arange(3 * C, dtype=np.int32).reshape(1, 3, C), (B, 3, C))
    valid = np.ones((B, 2, C), bool)
    shape = (2, B, S, CFG.num_kv_heads, CFG.head_dim)                      # R = 2 layers stacked
    stacked = KVCache(k=np.full(shape, np.nan, np.float32), v=np.full(shape, np.nan, np.float32))
    first, cache = GROUP(params, x[:, :2], stacked, pos[:, :2], valid, np.int32(1))
    second, cache = GROUP(params, x[:, 1:], cache, pos[:, 1:], valid, np.int32(1))
    np.testing.assert_array_equal(second[:, 0], first[:, 1])
    assert np.all(np.isnan(np.asarray(cache.k[0]))) and not np.any(np.isnan(cache.k[1, :, :3 * C]))
    flat, _ = run_chunks_of(params, x.reshape(B, 3 * C, -1), empty_cache(), "blocked")
    np.testing.assert_allclose(second[:, 1], flat[:, 2 * C:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(rotary_dim=3), "rotary_dim"),
    (dict(rotary_dim=10), "rotary_dim"),
    (dict(head_dim=0), "head_dim"),
    (dict(key_block=-1), "key_block"),
])
def test_bad_attention_configs_raise_named_errors(kwargs, message):
    base = dict(d_model=16, num_heads=4, num_kv_heads=2, head_dim=8, rotary_dim=4)
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**{**base, **kwargs})
