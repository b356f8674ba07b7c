"""Planner: spec parsing, each policy's positions on hand-written cases, dp/ldp solves, re-solve modes."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sparse_prefix import Planner, placement
from sparse_prefix.planner import PolicySpec, parse_policy, snap_positions


def positions(spec, length, **kwargs):
    overlap = kwargs.pop("overlap", None)
    hints = kwargs.pop("hints", ())
    return Planner(spec, max_length=20000, **kwargs).positions(length, overlap, hints).tolist()


@pytest.mark.parametrize("spec, expected", [
    ("none", PolicySpec("none")),
    ("block:64", PolicySpec("block", 64)),
    ("balanced:0", PolicySpec("balanced", 0)),
    ("dp:8+fork", PolicySpec("dp", 8, fork=True)),
    ("ldp:3+hints+fork+end", PolicySpec("ldp", 3, fork=True, hints=True, end=True)),
    ("end+end", PolicySpec("end", end=True)),
    ("sqrt+hints", PolicySpec("sqrt", hints=True)),
])
def test_parse_policy_accepts_the_grammar(spec, expected):
    parsed = parse_policy(spec)
    assert parsed == expected
    assert parse_policy(str(parsed)) == parsed  # the canonical form round-trips


@pytest.mark.parametrize("spec", [
    "", "dp", "dp:", "dp:-1", "dp:1.5", "dp:08", "block:0", "log:3", "none:1", "DP:4", "dp:4 ",
    " dp:4", "dp:4+", "dp:4+fork+fork", "dp:4+bogus", "dp:4,block:8", "quadratic:3", "dp:4+FORK",
])
def test_parse_policy_rejects_malformed_specs_naming_them(spec):
    with pytest.raises(ValueError) as error:
        parse_policy(spec)
    assert repr(spec) in str(error.value)


def test_parse_policy_rejects_non_strings():
    with pytest.raises(TypeError, match="policy spec"):
        parse_policy(8)


def test_spec_properties():
    assert parse_policy("dp:8+fork").family == "dp+fork"
    assert [parse_policy(s).budget for s in ("none", "end", "balanced:3", "dp:5", "ldp:2", "block:9",
                                             "log", "sqrt")] == [0, 1, 3, 5, 2, None, None, None]
    assert Planner("dp:8+fork+end").describe() == "dp M=8 +fork +end"
    assert Planner("block:1024").describe() == "block 1024"
    assert Planner("sqrt").describe() == "sqrt"
    assert Planner("ldp:3").budget == 3


@pytest.mark.parametrize("spec, length, expected", [
    ("none", 100, []),
    ("block:4", 10, [4, 8]),
    ("block:5", 10, [5, 10]),
    ("balanced:3", 100, [25, 50, 75]),
    ("balanced:1", 7, [4]),             # round(3.5) -> 4 (half to even)
    ("log", 3000, [768, 1536]),
    ("log", 767, []),
    ("sqrt", 50, [7, 14, 21, 28, 35, 42, 49]),
    ("end", 17, [17]),
    ("block:4+end", 10, [4, 8, 10]),
])
def test_fixed_policies_on_hand_cases(spec, length, expected):
    assert positions(spec, length) == expected


def test_grid_snaps_every_position_down_and_drops_zeros():
    assert positions("block:5", 20, grid=4) == [4, 8, 12, 20]
    assert positions("end", 3, grid=4) == []
    assert positions("none+fork+hints+end", 23, grid=4, overlap=7, hints=[3, 9, 11]) == [4, 8, 20]


def test_fork_adds_the_overlap_when_positive():
    assert positions("block:8+fork", 20, overlap=13) == [8, 13, 16]
    assert positions("block:8+fork", 20, overlap=0) == [8, 16]
    assert positions("block:8+fork", 20) == [8, 16]
    assert positions("block:8", 20, overlap=13) == [8, 16]  # no +fork: overlap unused
    assert positions("none+fork", 20, overlap=20) == [20]


def test_hints_are_added_only_with_the_modifier_but_always_validated():
    assert positions("balanced:1+hints", 20, hints=[3, 3, 17]) == [3, 10, 17]
    assert positions("balanced:1", 20, hints=np.array([3, 17])) == [10]
    with pytest.raises(ValueError, match="hints"):
        positions("balanced:1", 20, hints=[21])
    with pytest.raises(ValueError, match="hints"):
        positions("balanced:1+hints", 20, hints=[0])
    with pytest.raises(TypeError, match="hints"):
        positions("balanced:1+hints", 20, hints=[2.0])
    with pytest.raises(TypeError, match="hints"):
        positions("balanced:1+hints", 20, hints=[True])


def test_positions_are_sorted_unique_int64_in_range():
    planner = Planner("sqrt+fork+hints+end", grid=3, max_length=500)
    rng = np.random.default_rng(1)
    for _ in range(50):
        length = int(rng.integers(1, 501))
        got = planner.positions(length, int(rng.integers(0, length + 1)),
                                rng.integers(1, length + 1, size=3))
        assert got.dtype == np.int64
        assert np.all(np.diff(got) > 0) and np.all(got % 3 == 0)
        assert got.size == 0 or (got[0] >= 1 and got[-1] <= length)


def observe_all(planner, pairs):
    for overlap, length in pairs:
        planner.observe(overlap, length)


def test_dp_is_balanced_until_the_first_solve_then_the_dp_optimum():
    # depths 20, 20, 40 in bins of 8 -> mass 2 at 16, 1 at 40 (lower edges)
    planner = Planner("dp:2", bin_size=8, decay=1.0, resolve_every=3, max_length=64)
    observe_all(planner, [(20, 60), (20, 60)])
    assert planner.solves == 0
    assert planner.positions(60).tolist() == [20, 40]  # balanced:2
    planner.observe(40, 60)
    assert planner.solves == 1
    assert planner.positions(60).tolist() == [16, 40]
    assert planner.positions(30).tolist() == [16]  # the pmf truncated at 30
    single = Planner("dp:1", bin_size=8, decay=1.0, resolve_every=3, max_length=64)
    observe_all(single, [(20, 60), (20, 60), (40, 60)])
    assert single.positions(60).tolist() == [16]  # saves 2*16 + 16 = 48 > 40
    observe_all(single, [(40, 60)] * 3)  # now 2 at 16, 4 at 40: 40 saves 160 > 16*6
    assert single.solves == 2 and single.positions(60).tolist() == [40]


def test_dp_positions_equal_solving_the_histogram_pmf():
    planner = Planner("dp:2", bin_size=8, decay=0.95, resolve_every=40, max_length=64)
    rng = np.random.default_rng(2)
    pairs = [(int(d), 60) for d in rng.integers(0, 61, size=40)]
    observe_all(planner, pairs)
    weights = np.zeros(9)
    for k, (depth, _) in enumerate(pairs):
        weights[depth // 8] += 0.95 ** (len(pairs) - 1 - k)
    pmf = np.zeros(65)
    pmf[::8] = weights
    expected = placement.solve(pmf, 2, grid=8)
    for length in (60, 30, 17):
        assert planner.positions(length).tolist() == expected.positions_for(length).tolist()


@pytest.mark.parametrize("grid, cost", [(1, "linear"), (4, "linear"), (2, "hybrid:1,0.05"),
                                        (3, "linear"), (3, "hybrid:2,0.01")])
def test_binned_solve_is_as_good_as_the_token_level_solve_on_the_grid(grid, cost):
    rng = np.random.default_rng(3)
    planner = Planner("dp:2", bin_size=8, grid=grid, cost=cost, resolve_every=12, max_length=64)
    assert planner.solve_binned == (8 % grid == 0)
    observe_all(planner, [(int(d), 64) for d in rng.integers(0, 65, size=12)])
    pmf = planner._hist.pmfs().sum(axis=0)
    for length in (64, 41, 20):
        truncated = pmf[:length + 1]
        ours = planner.positions(length)
        assert np.all(ours % grid == 0) and np.all(ours <= length)
        if not truncated.any():
            continue
        best = placement.brute_force(truncated, 2, cost=cost, grid=grid)
        assert placement.expected_cost(truncated, ours, cost) == pytest.approx(
            best.expected_cost, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("cost", ["linear", "hybrid:1,0.002"])
def test_a_grid_coarser_than_64_tokens_bins_by_the_grid_and_places_as_well_as_64_token_bins(cost):
    """The default bin is one grid step when the grid is coarser than the paper's 64 tokens (a
    chunk of 256 on a real model): the DP solves 17 bins here instead of 2049 token depths, and its
    positions cost exactly what the token-level solve's do."""
    rng = np.random.default_rng(5)
    kwargs = dict(grid=128, max_length=2048, decay=1.0, resolve_every=30, cost=cost)
    coarse, fine = Planner("dp:3", **kwargs), Planner("dp:3", bin_size=64, **kwargs)
    assert (coarse.bin_size, coarse.solve_binned, fine.solve_binned) == (128, True, False)
    lengths = rng.integers(300, 2049, size=30)
    pairs = [(128 * int(rng.integers(0, n // 128 + 1)), int(n)) for n in lengths]
    for planner in (coarse, fine):
        observe_all(planner, pairs)
        assert planner.solves == 1
    pmf = fine._hist.pmfs().sum(axis=0)
    for length in (2048, 1500, 777, 300):
        ours, theirs = coarse.positions(length), fine.positions(length)
        assert np.all(ours % 128 == 0) and np.all(ours <= length)
        assert placement.expected_cost(pmf[:length + 1], ours, cost) == pytest.approx(
            placement.expected_cost(pmf[:length + 1], theirs, cost), rel=1e-12, abs=1e-12)


def test_ldp_uses_each_buckets_solution_and_falls_back_to_pooled():
    # bucket of length 50: 5 overlaps at 40 (bin 32); bucket of length 200: 2 overlaps at 100 (bin 96).
    pairs = [(40, 50)] * 5 + [(100, 200)] * 2
    kwargs = dict(bin_size=32, decay=1.0, resolve_every=7, max_length=256)
    dp, ldp = Planner("dp:1", **kwargs), Planner("ldp:1", **kwargs)
    strict = Planner("ldp:1", min_bucket_mass=3, **kwargs)
    for planner in (dp, ldp, strict):
        assert planner.positions(200).tolist() == [100]  # balanced:1 before the first solve
        observe_all(planner, pairs)
        assert planner.solves == 1
    assert dp.positions(200).tolist() == [32]    # pooled: 32 * 7 = 224 > 96 * 2
    assert ldp.positions(200).tolist() == [96]   # its own bucket
    assert ldp.positions(50).tolist() == [32]
    assert ldp.positions(120).tolist() == [32]   # empty bucket -> the pooled solution
    assert strict.positions(200).tolist() == [32]  # mass 2 < 3 -> pooled


def test_ldp_solves_all_buckets_in_one_batched_call(monkeypatch):
    calls = []
    real = placement.solve_batch

    def counting(pmfs, budget, **kwargs):
        calls.append(np.asarray(pmfs).shape)
        return real(pmfs, budget, **kwargs)

    monkeypatch.setattr(placement, "solve_batch", counting)
    planner = Planner("ldp:1", bin_size=32, resolve_every=5, max_length=256)
    observe_all(planner, [(10, 20), (30, 40), (60, 70), (90, 100), (100, 256)])
    buckets = planner._hist.num_buckets
    assert buckets == 5  # half-octaves of 64..256
    assert calls == [(buckets + 1, 256 // 32 + 1)]  # the binned pmfs plus the pooled row


def test_manual_resolve_keeps_the_request_path_free():
    planner = Planner("dp:1", bin_size=8, decay=1.0, resolve_every=2, max_length=64,
                      auto_resolve=False)
    observe_all(planner, [(40, 60), (40, 60)])
    assert planner.needs_resolve() and planner.solves == 0
    assert planner.positions(60).tolist() == [30]  # still balanced
    assert planner.resolve() is True
    assert not planner.needs_resolve()
    assert planner.positions(60).tolist() == [40]
    assert Planner("block:4").resolve() is False


def test_executor_resolve_installs_the_solution():
    with ThreadPoolExecutor(max_workers=1) as executor:
        planner = Planner("dp:1", bin_size=8, decay=1.0, resolve_every=2, max_length=64,
                          executor=executor)
        observe_all(planner, [(40, 60), (40, 60)])
    assert planner.solves == 1
    assert planner.positions(60).tolist() == [40]


@pytest.mark.parametrize("call, error, word", [
    (lambda p: p.positions(0), ValueError, "length"),
    (lambda p: p.positions(101), ValueError, "max_length"),
    (lambda p: p.positions(10.0), TypeError, "length"),
    (lambda p: p.positions(10, overlap=11), ValueError, "overlap"),
    (lambda p: p.positions(10, overlap=-1), ValueError, "overlap"),
    (lambda p: p.observe(5, 4), ValueError, "overlap"),
    (lambda p: p.observe(-1, 4), ValueError, "overlap"),
    (lambda p: p.observe(1, 101), ValueError, "max_length"),
    (lambda p: p.observe(1, True), TypeError, "length"),
])
def test_bad_request_arguments_raise(call, error, word):
    with pytest.raises(error, match=word):
        call(Planner("dp:2", max_length=100, bin_size=10))


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(grid=0), ValueError, "grid"),
    (dict(grid=2.0), TypeError, "grid"),
    (dict(bin_size=0), ValueError, "bin_size"),
    (dict(bin_size=200), ValueError, "bin_size"),
    (dict(decay=0.0), ValueError, "decay"),
    (dict(resolve_every=0), ValueError, "resolve_every"),
    (dict(cost="cubic"), ValueError, "cost"),
    (dict(max_length=0), ValueError, "max_length"),
    (dict(min_bucket_mass=-1.0), ValueError, "min_bucket_mass"),
    (dict(executor=object()), TypeError, "executor"),
    (dict(auto_resolve=1), TypeError, "auto_resolve"),
])
def test_bad_constructor_arguments_raise(kwargs, error, word):
    with pytest.raises(error, match=word):
        Planner("dp:2", max_length=kwargs.pop("max_length", 100), **kwargs)


def test_snap_positions():
    assert snap_positions([7, 3, 8, 0, 9], 4).tolist() == [4, 8]
    assert snap_positions([], 4).dtype == np.int64
