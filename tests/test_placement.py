"""Placement solvers agree: JAX DP == NumPy reference == brute force, on the grid, truncated, batched.

Compile budget: every JAX solve here uses N <= 16 (one shape bucket, dense search) except the
tiled-search tests, which share N = 100 (bucket 128) with method "tiled:2". The layer schedules other
than CPU's default ("scan", "unroll") run at table height 4 or 8 only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_prefix.experiments.bench_solver import hlo_profile
from sparse_prefix.placement import (brute_force, expected_cost, hybrid, reference_solve, solve,
                                     solve_batch)
from sparse_prefix.placement import dp
from sparse_prefix.placement.costs import LINEAR
from sparse_prefix.placement.solver import device_call
from sparse_prefix.placement.result import backtrack as backtrack_tables
from sparse_prefix.placement.result import drop_idle
from sparse_prefix.placement.search import Lines, padded_rows, radices, row_argmin

COSTS = ["linear", "hybrid:1,0.25"]
TILED = "tiled:2"


def close(a, b, rel=1e-9):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-12


@st.composite
def small_pmfs(draw, max_depth=12):
    """Random pmfs over 0..N (N <= max_depth) with zeros, some mass, sometimes integer counts.

    No subnormal weights: below float64's normal range a weight has too few mantissa bits for the
    solvers' sums to rank placements (`Placement.positions_for` documents it); a CI run drew
    [0, 0, 5e-324, 1]."""
    n = draw(st.integers(1, max_depth))
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 10.0, allow_subnormal=False),
                                      st.integers(0, 5).map(float)),
                            min_size=n + 1, max_size=n + 1))
    if sum(weights) == 0:
        weights[draw(st.integers(0, n))] = 1.0
    return np.array(weights)


def check_valid(placement, n, budget, grid):
    positions = placement.positions
    assert positions.dtype == np.int64
    assert positions.size <= budget
    assert np.all(np.diff(positions) > 0)
    assert np.all((positions >= 1) & (positions <= n) & (positions % grid == 0))


@settings(max_examples=25, deadline=None)
@given(pmf=small_pmfs(), budget=st.integers(0, 3), cost=st.sampled_from(COSTS),
       grid=st.sampled_from([1, 2, 3]))
def test_jax_and_reference_dp_match_brute_force(pmf, budget, cost, grid):
    n = pmf.size - 1
    best = brute_force(pmf, budget, cost, grid)
    for placement in (solve(pmf, budget, cost=cost, grid=grid),
                      reference_solve(pmf, budget, cost, grid)):
        check_valid(placement, n, budget, grid)
        assert close(placement.expected_cost, best.expected_cost)
        assert close(expected_cost(pmf, placement.positions, cost), placement.expected_cost)


@settings(max_examples=25, deadline=None)
@given(pmf=small_pmfs(max_depth=15), budget=st.integers(1, 3), grid=st.sampled_from([1, 2]))
def test_positions_for_equals_solving_the_truncated_pmf(pmf, budget, grid):
    placement = solve(pmf, budget, grid=grid)
    for length in range(pmf.size + 2):
        truncated = pmf[: length + 1]
        if truncated.sum() == 0:
            assert placement.expected_cost_for(length) == 0.0
            continue
        direct = solve(truncated, budget, grid=grid)
        assert close(expected_cost(truncated, placement.positions_for(length)), direct.expected_cost)
        assert close(placement.expected_cost_for(length), direct.expected_cost)
        assert np.all(placement.positions_for(length) <= length)
    assert np.array_equal(placement.positions_for(pmf.size - 1), placement.positions)


def test_integer_weights_give_identical_tables_and_smaller_position_ties():
    # Uniform counts over 0..12 with 3 checkpoints: (3, 6, 9) and (3, 6, 10) both cost 15/13;
    # integer weights keep the DP exact, so every solver takes the smaller position.
    pmf = np.ones(13)
    jax_placement, numpy_placement = solve(pmf, 3), reference_solve(pmf, 3)
    assert jax_placement.positions.tolist() == numpy_placement.positions.tolist() == [3, 6, 9]
    coarse, final = (np.asarray(t) for t in jax_placement._tables)
    assert np.array_equal(final[:13], numpy_placement._tables[1])
    assert np.array_equal(coarse[:2, :12], numpy_placement._tables[0])


@pytest.mark.parametrize("budget", [5, 7])  # one table height (8): one compilation
def test_uniform_pmf_gets_even_spacing_and_saves_m_over_m_plus_one(budget):
    n = 100  # depths 0..100 uniform: no checkpoint costs 50 tokens on average
    placement = solve(np.ones(n + 1), budget, method=TILED)
    gaps = np.diff(np.concatenate([[0], placement.positions, [n + 1]]))
    assert gaps.max() - gaps.min() <= 1
    saved = 1 - placement.expected_cost / 50.0
    assert abs(saved - budget / (budget + 1)) < 0.02


@pytest.mark.parametrize("grid, cost", [(1, "linear"), (3, "hybrid:0.5,0.01")])
def test_tiled_search_matches_reference_on_random_pmfs(grid, cost):
    rng = np.random.default_rng(grid)
    n = 100
    for trial in range(3):
        pmf = rng.random(n + 1)
        if trial == 1:
            pmf *= rng.random(n + 1) < 0.1  # sparse: long zero runs
            pmf[0] += 0.5
        if trial == 2:
            pmf = rng.integers(0, 4, n + 1).astype(float)  # integer counts: exact ties
            pmf[0] += 1
        ours, ref = solve(pmf, 7, cost=cost, grid=grid, method=TILED), reference_solve(pmf, 7, cost, grid)
        assert close(ours.expected_cost, ref.expected_cost, 1e-12)
        if trial != 1:  # the sparse trial may tie in float; the others have a unique or exact optimum
            assert ours.positions.tolist() == ref.positions.tolist()
        for length in (0, 1, 37, 64, 99):
            if pmf[: length + 1].sum() > 0:
                assert close(ours.expected_cost_for(length), ref.expected_cost_for(length), 1e-12)


def test_solve_batch_equals_a_loop_of_solve():
    rng = np.random.default_rng(0)
    pmfs = rng.random((3, 14)) * (rng.random((3, 14)) < 0.7)
    pmfs[:, 0] += 0.1
    batch = solve_batch(pmfs, 3, cost="hybrid:1,0.25")
    assert batch.positions.shape == (3, 3) and batch.positions.dtype == np.int64
    assert solve_batch(pmfs[:, :4] + 1, 10**12).positions.shape == (3, 3)  # width: the capped budget
    for i, pmf in enumerate(pmfs):
        single = solve(pmf, 3, cost="hybrid:1,0.25")
        assert batch.counts[i] == single.positions.size
        assert batch.positions[i, : batch.counts[i]].tolist() == single.positions.tolist()
        assert np.all(batch.positions[i, batch.counts[i]:] == 0)
        assert close(batch.expected_cost[i], single.expected_cost)
        for length in (0, 5, 13):
            assert batch.positions_for(i, length).tolist() == single.positions_for(length).tolist()
        batch.positions_for(i, 13)[:] = -1          # rows are kept between calls; answers are copies
        assert batch.positions_for(i, 13).tolist() == single.positions_for(13).tolist()
        assert batch.row(i).positions.tolist() == single.positions.tolist()


@pytest.mark.parametrize("schedule", ["dynamic", "unroll"])
def test_vmapped_batch_path_matches_the_reference(schedule):
    # CPU solves a batch with lax.map (tested above); accelerators vmap it, tiled passes included.
    rng = np.random.default_rng(1)
    pmfs = rng.integers(0, 5, (2, 17)).astype(float)  # integer counts: exact, so positions must match
    pmfs[:, 0] += 1
    prefix_mass, prefix_cost = np.cumsum(pmfs, axis=1), np.cumsum(pmfs * np.arange(17), axis=1)
    g = np.broadcast_to(np.arange(17.0), pmfs.shape)
    buffer = dp.pack(np.stack([prefix_mass, prefix_cost, g], axis=1), 3, 16)
    solved = {}
    for backtrack in ("device", "host"):  # positions backtracked there, or the tables fetched flat
        with jax.enable_x64(True):
            solved[backtrack] = jax.device_get(dp.solve_many(
                buffer, grid=2, height=4, levels=(1, 2), schedule=schedule, backtrack=backtrack,
                batching="vmap"))
    found, _, optima = solved["device"]
    coarse, final = dp.split_tables(solved["host"][0], 4, 17)
    for i, (pmf, row, optimum) in enumerate(zip(pmfs, found, optima)):
        positions = drop_idle(np.sort(row[row > 0]).astype(np.int64), pmf, 16)
        reference = reference_solve(pmf, 3, "linear", 2)
        assert positions.tolist() == reference.positions.tolist()
        assert backtrack_tables((coarse[i], final[i]), 3, 2, 16).tolist() == positions.tolist()
        assert close(optimum / pmf.sum(), reference.expected_cost)  # the DP's own F_M(N)


@pytest.mark.parametrize("schedule, host_tables", [("scan", 0), ("unroll", 0), ("unroll", 1 << 16)])
def test_static_layer_schedules_match_the_dynamic_loop_for_every_budget_of_a_height(
        schedule, host_tables, monkeypatch):
    # Height 4 serves budgets 0..4; below 3 coarse layers, the static schedules mask the rest. The
    # positions come from the device backtrack (carried paths), or from the tables on the host.
    monkeypatch.setattr(dp, "HOST_BACKTRACK_MAX_ELEMENTS", host_tables)
    rng = np.random.default_rng(7)
    for trial, grid in enumerate([1, 1, 2, 2]):
        n = int(rng.integers(9, 17))
        pmf = rng.integers(0, 4, n + 1).astype(float) if trial % 2 == 0 else rng.random(n + 1)
        pmf[0] += 1
        for budget in range(5):
            ours = solve(pmf, budget, grid=grid, schedule=schedule)
            loop = solve(pmf, budget, grid=grid, schedule="dynamic")
            assert ours.positions.tolist() == loop.positions.tolist()
            assert ours.expected_cost == loop.expected_cost
            (coarse, final), (loop_coarse, loop_final) = ours._host_tables, loop._host_tables
            layers = min(budget, n // grid)
            assert np.array_equal(final, loop_final)
            assert np.array_equal(coarse[: layers - 1], loop_coarse[: layers - 1])
            for length in range(n + 1):
                assert ours.positions_for(length).tolist() == loop.positions_for(length).tolist()


def test_scan_schedule_runs_the_tiled_search_like_the_reference():
    rng = np.random.default_rng(3)
    pmf = rng.integers(0, 4, 101).astype(float)  # integer counts: exact, so positions must match
    pmf[0] += 1
    for budget in (5, 7):  # one table height (8)
        ours, ref = solve(pmf, budget, method=TILED, schedule="scan"), reference_solve(pmf, budget)
        assert ours.positions.tolist() == ref.positions.tolist()
        for length in (0, 1, 37, 64, 99):
            assert ours.positions_for(length).tolist() == ref.positions_for(length).tolist()


def test_static_schedules_compile_without_a_loop_of_unknown_trip_count():
    pmf = np.ones((1, 13))
    profiles = {}
    for schedule in ("dynamic", "scan", "unroll"):
        function, args, static = device_call(pmf, LINEAR, 3, 1, "dense", False, schedule, "device")
        with jax.enable_x64(True):
            profiles[schedule] = hlo_profile(function.lower(*args, **static).compile().as_text())
    assert profiles["dynamic"]["dynamic_loops"] >= 1  # up to the runtime budget: a predicate per layer
    assert profiles["scan"]["trip_counts"] == [3] and profiles["scan"]["dynamic_loops"] == 0
    assert profiles["unroll"]["while_loops"] == 0
    assert profiles["unroll"]["kernels"] < profiles["scan"]["kernels"]
    function, args, static = device_call(pmf, LINEAR, 3, 1, "dense", False, "unroll", "host")
    with jax.enable_x64(True):
        host = hlo_profile(function.lower(*args, **static).compile().as_text())
    assert host["kernels"] < profiles["unroll"]["kernels"]  # the layers only: no paths carried


def test_static_backtrack_loop_above_the_paths_limit_finds_the_same_positions(monkeypatch):
    monkeypatch.setattr(dp, "PATHS_MAX_ELEMENTS", 0)  # read at trace time: a fresh jit walks the tables
    walk = jax.jit(functools.partial(dp.solve_tables, grid=1, height=4, levels=(1, 1), schedule="scan"))
    rng = np.random.default_rng(5)
    for budget in range(5):
        pmf = rng.integers(0, 4, 17).astype(float)
        pmf[0] += 1
        prefix_mass, prefix_cost = np.cumsum(pmf), np.cumsum(pmf * np.arange(17))
        args = (prefix_mass, prefix_cost, np.arange(17.0), np.int32(budget), np.int32(16))
        with jax.enable_x64(True):
            found = np.asarray(walk(*args)[2])
        positions = drop_idle(np.sort(found[found > 0]).astype(np.int64), pmf, 16)
        assert positions.tolist() == reference_solve(pmf, budget).positions.tolist()
    with jax.enable_x64(True):
        profile = hlo_profile(walk.lower(*args).compile().as_text())
    assert profile["trip_counts"] == [3, 3]  # the layers, then the walk: both of static length


HLO = """
%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %a = f32[8]{0} add(%p, %p)
}

%command_buffer.2 (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %f1 = f32[8]{0} fusion(%p), kind=kLoop, calls=%fused
  ROOT %f2 = f32[8]{0} fusion(%f1), kind=kLoop, calls=%fused
}

%body (t: (s32[], f32[8])) -> (s32[], f32[8]) {
  %t = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%t), index=1
  %y = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused
  %c = f32[8]{0} copy(%y)
  ROOT %r = (s32[], f32[8]{0}) tuple(%x, %c)
}

%cond (t: (s32[], f32[8])) -> pred[] {
  %t = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] fusion(%t), kind=kLoop, calls=%fused
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %cb = f32[8]{0} call(%a), to_apply=%command_buffer.2
  %w = (s32[], f32[8]{0}) while(%u), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"31"}}
  %v = (s32[], f32[8]{0}) while(%u), condition=%cond, body=%body
  ROOT %o = f32[8]{0} fusion(%cb), kind=kLoop, calls=%fused
}
"""


def test_hlo_profile_counts_known_trips_unknown_loops_and_command_buffers():
    profile = hlo_profile(HLO)
    assert profile["trip_counts"] == [31, None] and profile["dynamic_loops"] == 1
    assert profile["fusions"] == 5 and profile["command_buffers"] == 1
    # command buffer 2 kernels (1 launch) + 31 x (fusion + copy) + unknown loop: body once and its
    # condition twice (2 + 2) + the root fusion
    assert profile["kernels"] == 2 + 62 + 4 + 1
    assert profile["launches"] == 1 + 62 + 4 + 1
    assert hlo_profile(HLO.replace("%", "")) == profile  # newer XLA prints names without %


def test_auto_schedule_is_a_budget_loop_on_cpu_and_static_layers_on_accelerators():
    assert dp.layer_schedule("auto", 32, 1, "cpu") == "dynamic"
    assert dp.layer_schedule("auto", 32, 1, "gpu") == "unroll"  # dense, up to UNROLL_MAX_HEIGHT
    assert dp.layer_schedule("auto", 64, 1, "gpu") == "scan"
    assert dp.layer_schedule("auto", 8, 2, "gpu") == "scan"  # tiled layers are not unrolled
    assert dp.layer_schedule("scan", 8, 1, "cpu") == "scan"


def test_idle_positions_are_dropped_and_budget_is_capped():
    pmf = np.zeros(11)
    pmf[5] = 1.0  # all requests overlap exactly 5 tokens
    placement = solve(pmf, 3)
    assert placement.positions.tolist() == [5] and placement.expected_cost == 0.0
    assert solve(np.ones(4), 50).positions.tolist() == [1, 2, 3]  # budget > N is capped
    assert solve([3.0], 2).positions.size == 0  # N = 0: nothing to place


def test_budget_zero_costs_the_mean_of_g():
    pmf = np.array([1.0, 0, 2, 1])
    placement = solve(pmf, 0, cost=hybrid(1, 1))
    assert placement.positions.size == 0
    assert close(placement.expected_cost, (0 + 2 * 6 + 12) / 4)


def test_grid_solution_is_optimal_among_grid_placements_not_a_rounded_token_answer():
    pmf = np.zeros(13)
    pmf[[5, 6]] = [1.0, 1.5]  # token optimum: 5 (saves 12.5 vs 9 at 6); rounded down to grid 3: 3
    assert solve(pmf, 1).positions.tolist() == [5]
    on_grid = solve(pmf, 1, grid=3)
    assert on_grid.positions.tolist() == [6]  # saves 9 > 7.5 at 3: every token is costed
    assert close(on_grid.expected_cost, (1 * 5 + 1.5 * 0) / 2.5)
    assert close(on_grid.expected_cost, brute_force(pmf, 1, "linear", 3).expected_cost)


def test_solver_leaves_the_global_x64_flag_alone():
    solve(np.ones(5), 2)
    assert not jax.config.jax_enable_x64
    assert jnp.zeros(1).dtype == jnp.float32


def test_one_compilation_serves_every_budget_and_size_in_a_bucket():
    solve(np.ones(9), 1, method="dense")
    before = dp.solve_one._cache_size()
    for n, budget in [(9, 2), (12, 4), (16, 3), (10, 1)]:
        solve(np.arange(n + 1.0), budget, cost="hybrid:2,0.5", method="dense")
    assert dp.solve_one._cache_size() == before


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_row_argmin_returns_the_leftmost_minimum_of_monotone_lines(levels):
    rng = np.random.default_rng(levels)
    rows, columns = 22, 9  # padded to 24 rows inside
    slope = np.cumsum(rng.integers(1, 3, columns)).astype(float)
    intercept = rng.integers(-20, 20, columns).astype(float)
    mass_before = rng.integers(0, 5, columns).astype(float)
    row_mass = np.sort(rng.integers(0, 8, rows)).astype(float)
    row_cost = rng.integers(0, 10, rows).astype(float)
    limit = np.minimum(np.sort(rng.integers(-2, columns + 2, rows)), columns - 1).astype(np.int32)
    values = intercept[None] + row_cost[:, None] - slope[None] * (row_mass[:, None] - mass_before[None])
    values = np.where(np.arange(columns)[None] <= limit[:, None], values, np.inf)
    expected = np.where(np.isfinite(values.min(axis=1)), values.argmin(axis=1), -1)
    with jax.enable_x64(True):
        found = jax.jit(row_argmin, static_argnums=4)(Lines(intercept, slope, mass_before), row_mass,
                                                      row_cost, limit, levels)
    assert np.asarray(found).tolist() == expected.tolist()


def test_row_padding_and_radices_factor_exactly():
    assert [padded_rows(n) for n in (1, 5, 17, 25, 4096, 4097)] == [1, 6, 24, 32, 4096, 6144]
    for rows in (16, 24, 6144, 16384):
        for levels in (1, 2, 3, 5):
            factors = radices(rows, levels)
            assert int(np.prod(factors)) == rows and len(factors) <= levels and min(factors) >= 2
