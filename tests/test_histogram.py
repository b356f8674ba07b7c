"""Overlap histograms: decay and bins by hand, lazy-scale exactness, length buckets, bad input."""

import numpy as np
import pytest

from sparse_prefix.histogram import (LengthBucketedHistogram, OverlapHistogram, binned_to_token_pmf,
                                     half_octave)


def test_decay_and_bins_match_hand_computation():
    hist = OverlapHistogram(10, bin_size=4, decay=0.5)  # bins: [0,4) [4,8) [8,10]
    for depth in (5, 9, 10, 100):  # 100 is clipped to 10 -> bin 2
        hist.observe(depth)
    # [0,1,0] -> [0,.5,1] -> [0,.25,1.5] -> [0,.125,1.75]
    np.testing.assert_allclose(hist.binned(), [0.0, 0.125, 1.75], rtol=1e-15)
    assert hist.count == 4
    assert hist.total == pytest.approx(1.875, rel=1e-15)
    expected = np.zeros(11)
    expected[4], expected[8] = 0.125, 1.75
    np.testing.assert_allclose(hist.pmf(), expected, rtol=1e-15)


def test_token_level_histogram_puts_each_depth_at_itself():
    hist = OverlapHistogram(6, bin_size=1, decay=1.0)
    for depth in (0, 3, 3, 6):
        hist.observe(depth)
    np.testing.assert_array_equal(hist.pmf(), [1, 0, 0, 2, 0, 0, 1])
    assert hist.num_bins == 7


def test_lazy_decay_survives_scale_underflow_exactly():
    hist = OverlapHistogram(8, bin_size=8, decay=0.5)
    n = 1200  # 0.5**1200 underflows float64: the lazy scale must renormalise on the way
    for _ in range(n):
        hist.observe(0)
    hist.observe(8)
    # mass at bin 0: 0.5 * sum_{k<n} 0.5**k = 1 - 0.5**n ~= 1 ; bin 1: 1
    np.testing.assert_allclose(hist.binned(), [1.0, 1.0], rtol=1e-12)
    assert np.all(np.isfinite(hist.binned()))


def test_empty_histogram_is_all_zero():
    hist = OverlapHistogram(100, bin_size=64)
    assert hist.count == 0 and hist.total == 0.0
    assert hist.pmf().shape == (101,) and not hist.pmf().any()
    assert hist.num_bins == 2  # [0,64) and [64,100]


@pytest.mark.parametrize("depth, error", [(-1, ValueError), (float("nan"), TypeError),
                                          (2.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_observe_rejects_bad_depths(depth, error):
    with pytest.raises(error, match="depth"):
        OverlapHistogram(10, bin_size=1).observe(depth)


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(max_depth=0), ValueError, "max_depth"),
    (dict(max_depth=10.0), TypeError, "max_depth"),
    (dict(max_depth=10, bin_size=0), ValueError, "bin_size"),
    (dict(max_depth=10, bin_size=11), ValueError, "bin_size"),
    (dict(max_depth=10, decay=0.0), ValueError, "decay"),
    (dict(max_depth=10, decay=1.5), ValueError, "decay"),
    (dict(max_depth=10, decay=float("nan")), ValueError, "decay"),
    (dict(max_depth=10, decay="0.9"), TypeError, "decay"),
])
def test_constructors_reject_bad_parameters(kwargs, error, word):
    kwargs = {"bin_size": 1, **kwargs}
    with pytest.raises(error, match=word):
        OverlapHistogram(**kwargs)
    with pytest.raises(error, match=word):
        LengthBucketedHistogram(**kwargs, min_length=1)


def test_half_octave_is_exact_floor_of_two_log2():
    assert [half_octave(n) for n in (1, 2, 3, 64, 90, 91, 16383, 16384)] == [0, 2, 3, 12, 12, 13, 27, 28]
    for length in list(range(1, 3000)) + [2 ** 40 - 1, 2 ** 40]:
        k = half_octave(length)  # floor(2 log2 L) = k  <=>  2^k <= L^2 < 2^(k+1)
        assert 2 ** k <= length ** 2 < 2 ** (k + 1)


def test_buckets_cover_lengths_with_clipping_and_consistent_ranges():
    hist = LengthBucketedHistogram(1000, bin_size=10, min_length=64)
    assert hist.first_bucket == half_octave(64) == 12
    assert hist.num_buckets == half_octave(1000) - 12 + 1
    for length in range(1, 1001):
        row = hist.bucket_of(length)
        lo, hi = hist.bucket_lengths(row)
        assert lo <= min(max(length, 64), 1000) <= hi
    assert hist.bucket_of(1) == 0 and hist.bucket_of(5000) == hist.num_buckets - 1
    assert hist.bucket_of(90) == 0 and hist.bucket_of(91) == 1  # 2*log2(90.5) = 13


def test_buckets_share_one_decay_clock_and_sum_to_the_pooled_histogram():
    buckets = LengthBucketedHistogram(512, bin_size=16, decay=0.9)
    pooled = OverlapHistogram(512, bin_size=16, decay=0.9)
    rng = np.random.default_rng(0)
    for _ in range(200):
        length = int(rng.integers(1, 513))
        depth = int(rng.integers(0, length + 1))
        buckets.observe(depth, length)
        pooled.observe(depth)
    np.testing.assert_allclose(buckets.binned().sum(axis=0), pooled.binned(), rtol=1e-12)
    np.testing.assert_allclose(buckets.pmfs().sum(axis=0), pooled.pmf(), rtol=1e-12)
    assert buckets.masses().sum() == pytest.approx(pooled.total, rel=1e-12)
    assert buckets.pmfs().shape == (buckets.num_buckets, 513)
    assert buckets.count == 200


def test_bucket_mass_decays_when_other_buckets_are_observed():
    hist = LengthBucketedHistogram(4096, bin_size=64, decay=0.5)
    hist.observe(10, 100)
    hist.observe(10, 4000)
    hist.observe(10, 4000)
    masses = hist.masses()
    assert masses[hist.bucket_of(100)] == pytest.approx(0.25)
    assert masses[hist.bucket_of(4000)] == pytest.approx(1.5)


def test_bucketed_observe_rejects_bad_input():
    hist = LengthBucketedHistogram(100, bin_size=10, min_length=8)
    with pytest.raises(ValueError, match="depth"):
        hist.observe(20, 10)
    with pytest.raises(ValueError, match="length"):
        hist.observe(0, 0)
    with pytest.raises(TypeError, match="length"):
        hist.observe(0, 5.5)
    with pytest.raises(ValueError, match="row"):
        hist.bucket_lengths(hist.num_buckets)


def test_binned_to_token_pmf_places_mass_at_lower_edges():
    out = binned_to_token_pmf(np.array([[1.0, 2.0, 3.0]]), 4, 9)
    np.testing.assert_array_equal(out, [[1, 0, 0, 0, 2, 0, 0, 0, 3, 0]])
