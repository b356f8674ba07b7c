"""Placement API: cost models, baseline placements on hand-written cases, every bad input."""

import numpy as np
import pytest

from sparse_prefix.placement import (Cost, balanced_positions, block_positions, brute_force,
                                     end_positions, expected_cost, hybrid, log_positions, parse_cost,
                                     reference_solve, solve, solve_batch, sqrt_positions)


def test_cost_models_parse_and_evaluate():
    assert parse_cost("linear") == Cost(1.0, 0.0) and str(parse_cost("linear")) == "linear"
    assert parse_cost("hybrid:2,0.5") == hybrid(2, 0.5) == Cost(2.0, 0.5)
    assert parse_cost(str(hybrid(2, 0.5))) == hybrid(2, 0.5)
    assert hybrid(1, 1).g([0, 1, 3]).tolist() == [0.0, 2.0, 12.0]


def test_expected_cost_on_a_hand_computed_case():
    pmf = [0, 1, 0, 1]  # depths 1 and 3, equally likely; a checkpoint at 2
    assert expected_cost(pmf, [2]) == 1.0  # (1 - 0) and (3 - 2)
    assert expected_cost(pmf, [2], "hybrid:1,1") == 4.0  # g = t + t^2: (2 - 0) and (12 - 6)
    assert expected_cost(pmf, []) == 2.0
    tie = [0, 2, 0, 1]  # a checkpoint at 1 saves 2 * 1 + 1 * 1, one at 3 saves 1 * 3: smaller wins
    assert solve(tie, 1).positions.tolist() == reference_solve(tie, 1).positions.tolist() == [1]
    assert solve(tie, 1, cost="hybrid:1,1").positions.tolist() == [3]  # saves 12 vs 3 * 2


@pytest.mark.parametrize("function, args, expected", [
    (block_positions, (10, 3), [3, 6, 9]),
    (block_positions, (9, 3), [3, 6, 9]),            # may equal the length
    (block_positions, (2, 3), []),
    (balanced_positions, (10, 1), [5]),
    (balanced_positions, (10, 3), [2, 5, 8]),         # 2.5 -> 2, 7.5 -> 8 (half to even)
    (balanced_positions, (3, 5), [1, 2]),             # 0.5, 1, 1.5, 2, 2.5 -> 0, 1, 2, 2, 2: deduped
    (balanced_positions, (10, 0), []),
    (log_positions, (3000,), [768, 1536]),
    (log_positions, (3072,), [768, 1536, 3072]),
    (log_positions, (100, 10), [10, 20, 40, 80]),
    (sqrt_positions, (10,), [3, 6, 9]),
    (sqrt_positions, (16,), [4, 8, 12, 16]),
    (sqrt_positions, (0,), []),
    (end_positions, (7,), [7]),
    (end_positions, (0,), []),
])
def test_baselines_on_hand_written_cases(function, args, expected):
    assert function(*args).tolist() == expected
    assert function(*args).dtype == np.int64


def test_baselines_snap_down_to_the_grid():
    assert block_positions(20, 3, grid=4).tolist() == [4, 8, 12, 16]  # 3,6,9,12,15,18 -> 0 dropped
    assert balanced_positions(100, 3, grid=16).tolist() == [16, 48, 64]  # 25, 50, 75
    assert end_positions(7, grid=4).tolist() == [4]
    assert sqrt_positions(10, grid=5).tolist() == [5]


GOOD = np.array([1.0, 2.0, 0.0, 1.0])


@pytest.mark.parametrize("pmf, error, word", [
    ([1.0, np.nan], ValueError, "NaN"),
    ([1.0, np.inf], ValueError, "NaN or inf"),
    ([1.0, -0.5], ValueError, "negative"),
    ([], ValueError, "empty"),
    ([0.0, 0.0], ValueError, "zero total"),
    ([[1.0, 2.0]], ValueError, "1-D"),
    (["a", "b"], TypeError, "real numbers"),
    ([True, False], TypeError, "real numbers"),
    ([1e308, 1e308], ValueError, "too large"),
])
def test_bad_pmf_raises_naming_it(pmf, error, word):
    for solver in (lambda p: solve(p, 1), lambda p: reference_solve(p, 1),
                   lambda p: brute_force(p, 1), lambda p: expected_cost(p, [])):
        with pytest.raises(error, match="pmf") as info:
            solver(pmf)
        assert word in str(info.value)


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(budget=-1), ValueError, "budget"),
    (dict(budget=2.5), TypeError, "budget"),
    (dict(budget=2.0), TypeError, "budget"),
    (dict(budget="3"), TypeError, "budget"),
    (dict(budget=True), TypeError, "budget"),
    (dict(grid=0), ValueError, "grid"),
    (dict(grid=1.5), TypeError, "grid"),
    (dict(cost="quadratic"), ValueError, "cost"),
    (dict(cost=3), TypeError, "cost"),
    (dict(cost="hybrid:1"), ValueError, "hybrid"),
    (dict(cost="hybrid:0,1"), ValueError, "parameter a"),
    (dict(cost="hybrid:1,-1"), ValueError, "parameter b"),
    (dict(cost="hybrid:nan,1"), ValueError, "parameter a"),
    (dict(method="fast"), ValueError, "method"),
    (dict(schedule="fast"), ValueError, "schedule"),
    (dict(schedule=1), TypeError, "schedule"),
])
def test_bad_arguments_raise_naming_them(kwargs, error, word):
    args = dict(budget=2, cost="linear", grid=1) | kwargs
    budget = args.pop("budget")
    with pytest.raises(error, match=word):
        solve(GOOD, budget, **args)
    if not {"method", "schedule"} & args.keys():
        with pytest.raises(error, match=word):
            reference_solve(GOOD, budget, args["cost"], args["grid"])


def test_bad_hybrid_parameters_and_lengths_raise():
    with pytest.raises(ValueError, match="parameter b"):
        hybrid(1, float("inf"))
    with pytest.raises(TypeError, match="parameter a"):
        hybrid("1", 0)
    placement = solve(GOOD, 1)
    with pytest.raises(ValueError, match="length"):
        placement.positions_for(-1)
    with pytest.raises(TypeError, match="length"):
        placement.positions_for(2.5)
    with pytest.raises(ValueError, match="block"):
        block_positions(10, 0)
    with pytest.raises(TypeError, match="length"):
        balanced_positions(10.0, 2)


def test_bad_batch_and_positions_raise():
    with pytest.raises(ValueError, match=r"pmfs .*rows \[1\]"):
        solve_batch(np.array([[1.0, 0.0], [0.0, 0.0]]), 1)
    with pytest.raises(ValueError, match="pmfs must be 2-D"):
        solve_batch(GOOD, 1)
    with pytest.raises(ValueError, match="positions must lie in 1..3"):
        expected_cost(GOOD, [4])
    with pytest.raises(TypeError, match="positions must be integers"):
        expected_cost(GOOD, [1.5])
