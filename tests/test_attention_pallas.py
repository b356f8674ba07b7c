"""The "pallas" attention kernel, run in Pallas' interpreter on CPU: it matches the XLA reads and
reads one layer of a stacked cache. In a model (with the GDN kernels: tests/test_gdn_pallas.py) it
keeps a prefill resumed on the chunk grid bitwise equal to the uncached one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models.attention import AttentionConfig, _attend_blocked, _attend_dense
from sparse_prefix.models.attention_pallas import attend_pallas, default_stages, supported
from sparse_prefix.protocol import KVCache

B, T, HKV, G, D, S = 2, 24, 2, 2, 16, 128


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, HKV, G, D)).astype(np.float32)
    k = rng.standard_normal((B, S, HKV, D)).astype(np.float32)
    v = rng.standard_normal((B, S, HKV, D)).astype(np.float32)
    # rows at different depths; the second row's queries end past the first key block of 64
    positions = np.stack([np.arange(5, 5 + T), np.arange(60, 60 + T)]).astype(np.int32)
    return q, k, v, positions


def test_pallas_read_matches_the_dense_and_blocked_xla_reads(inputs):
    q, k, v, positions = inputs
    got = np.asarray(attend_pallas(q, k, v, positions, block_k=16, block_q=16))
    dense = np.asarray(_attend_dense(q, KVCache(k, v), positions, None))
    blocked = np.asarray(_attend_blocked(q, KVCache(k, v), positions, 32, None))
    np.testing.assert_allclose(got, dense, atol=2e-6)
    np.testing.assert_allclose(got, blocked, atol=2e-6)


@pytest.mark.parametrize("parts", [2, 3])
def test_pallas_read_in_key_parts_matches_the_dense_read_and_gives_a_row_the_same_bits_anywhere(
        inputs, parts):
    q, k, v, positions = inputs
    got = np.asarray(attend_pallas(q, k, v, positions, block_k=16, block_q=16, parts=parts))
    dense = np.asarray(_attend_dense(q, KVCache(k, v), positions, None))
    np.testing.assert_allclose(got, dense, atol=2e-6)
    # the last 8 rows alone (another query block, a shallower deepest row): what a resume runs
    alone = np.asarray(attend_pallas(q[:, 16:], k, v, positions[:, 16:], block_k=16, block_q=16,
                                     parts=parts))
    np.testing.assert_array_equal(alone, got[:, 16:])


@pytest.mark.parametrize("parts", [0, -1, 1.5, True])
def test_pallas_read_rejects_a_part_count_that_is_not_a_positive_int(inputs, parts):
    q, k, v, positions = inputs
    with pytest.raises(ValueError, match="parts"):
        attend_pallas(q, k, v, positions, block_k=16, parts=parts)


def test_pallas_read_of_a_stacked_cache_reads_only_the_given_layer(inputs):
    q, k, v, positions = inputs
    stacked_k = np.stack([np.full_like(k, 7.0), k, -k])
    stacked_v = np.stack([np.full_like(v, np.inf), v, 2 * v])        # other layers may hold anything
    got = attend_pallas(q, stacked_k, stacked_v, positions, jnp.int32(1), block_k=16, block_q=16)
    want = attend_pallas(q, k, v, positions, block_k=16, block_q=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_pallas_read_ignores_stale_values_past_every_query(inputs):
    q, k, v, positions = inputs
    stale_k, stale_v = k.copy(), v.copy()
    beyond = positions.max() + 1
    stale_k[:, beyond:] = 1e30
    stale_v[:, beyond:] = np.nan
    got = attend_pallas(q, stale_k, stale_v, positions, block_k=16, block_q=16)
    want = attend_pallas(q, k, v, positions, block_k=16, block_q=16)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("read", ["pallas", "pallas-parts", "dense", "blocked"])
def test_rows_at_position_minus_one_read_nothing_and_change_no_bit_of_the_real_rows(inputs, read):
    q, k, v, positions = inputs
    reads = {"pallas": lambda p: attend_pallas(q, k, v, p, block_k=16, block_q=16),
             "pallas-parts": lambda p: attend_pallas(q, k, v, p, block_k=16, block_q=16, parts=3),
             "dense": lambda p: _attend_dense(q, KVCache(k, v), p, None),
             "blocked": lambda p: _attend_blocked(q, KVCache(k, v), p, 32, None)}[read]
    padded = positions.copy()
    padded[:, 16:] = positions[:, :1]             # padding as the driver lays it: at the base
    silent = positions.copy()
    silent[:, 16:] = -1                           # what attention_chunk passes for padded slots
    silent[1, :] = -1                             # a whole row of the batch reads nothing
    want, got = np.asarray(reads(padded)), np.asarray(reads(silent))
    np.testing.assert_array_equal(got[0, :16], want[0, :16])
    np.testing.assert_array_equal(got[:, 16:], 0.0)
    np.testing.assert_array_equal(got[1], 0.0)


def test_pallas_shape_support_is_reported_not_guessed():
    assert supported(256, 16384, 64)
    assert not supported(8, 128, 16)         # head_dim below Triton's 16
    assert not supported(16, 100, 16)        # block does not divide the buffer


def test_pallas_kernel_is_a_checked_config_choice():
    with pytest.raises(ValueError, match="kernel"):
        AttentionConfig(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=4,
                        kernel="flash")
    for parts in (0, 2.0, False):
        with pytest.raises(ValueError, match="key_parts"):
            AttentionConfig(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=4,
                            key_parts=parts)


def test_pipeline_depth_is_the_deepest_that_fits_the_shared_memory():
    assert default_stages(64, 64, 256) == 3                  # 3 x 64 KiB + 32 KiB fits 227 KiB
    assert default_stages(64, 64, 256, shared_bytes=166_912) == 2
    assert default_stages(64, 64, 512) == 1
    assert default_stages(64, 64, 256, itemsize=4) == 1
