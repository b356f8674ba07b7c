"""+fill (dp / ldp): the DP's idle budget spent on the largest uncovered gaps (`fill_gaps`)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_prefix import Planner
from sparse_prefix.planner import PolicySpec, fill_gaps, parse_policy


def longest_piece(positions, length):
    return int(np.diff(np.concatenate([[0], np.asarray(positions, np.int64), [length]])).max())


def test_fill_gaps_splits_the_largest_gaps_evenly():
    assert fill_gaps(np.array([100]), 1000, 5).tolist() == [100, 280, 460, 640, 820]
    assert fill_gaps(np.array([], np.int64), 1000, 4).tolist() == [200, 400, 600, 800]
    assert fill_gaps(np.array([640]), 1000, 3, grid=64).tolist() == [192, 384, 640]


def test_fill_gaps_never_removes_positions_or_goes_beyond_the_budget():
    assert fill_gaps(np.array([5, 9]), 10, 1).tolist() == [5, 9]
    assert fill_gaps(np.array([1, 2]), 4, 10).tolist() == [1, 2, 3]  # only 3 lies strictly inside


def test_fill_gaps_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="positions"):
        fill_gaps(np.array([11]), 10, 3)
    with pytest.raises(ValueError, match="budget"):
        fill_gaps(np.array([1]), 10, -1)
    with pytest.raises(ValueError, match="length"):
        fill_gaps(np.array([1]), 0, 1)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 14), budget=st.integers(0, 6), grid=st.sampled_from([1, 2, 3]),
       data=st.data())
def test_fill_gaps_minimises_the_longest_uncovered_stretch(length, budget, grid, data):
    top = length // grid
    lattice = list(range(1, top + 1))
    fixed = sorted(data.draw(st.sets(st.sampled_from(lattice), max_size=budget)) if lattice else [])
    filled = fill_gaps(np.asarray(fixed, np.int64) * grid, length, budget, grid)
    assert filled.tolist() == sorted(set(filled.tolist()))
    assert set((np.asarray(fixed) * grid).tolist()) <= set(filled.tolist())
    assert np.all(filled % grid == 0) and np.all((filled >= 1) & (filled <= length))
    free = [p for p in lattice if p not in fixed and p < top]
    assert filled.size == len(fixed) + min(budget - len(fixed), len(free))
    best = min(longest_piece(sorted(fixed + list(extra)), top)
               for extra in itertools.combinations(free, filled.size - len(fixed)))
    assert longest_piece(filled // grid, top) == best


def test_fill_is_a_dp_and_ldp_modifier_only():
    assert parse_policy("ldp:30+fill") == PolicySpec("ldp", 30, fill=True)
    assert str(parse_policy("dp:4+fill+fork")) == "dp:4+fork+fill"
    assert parse_policy("ldp:3+fill").budget == 3
    for spec in ("block:64+fill", "none+fill", "balanced:3+fill", "end+fill"):
        with pytest.raises(ValueError, match="fill") as error:
            parse_policy(spec)
        assert repr(spec) in str(error.value)


@pytest.mark.parametrize("kind", ["dp", "ldp"])
def test_fill_tops_an_idle_dp_up_to_its_budget_keeping_the_solved_positions(kind):
    plain, filled = (Planner(f"{kind}:6{mod}", max_length=4096, resolve_every=5) for mod in ("", "+fill"))
    for planner in (plain, filled):
        for _ in range(10):
            planner.observe(1024, 4000)  # all mass at one depth: the DP needs one position
    solved = plain.positions(4000).tolist()
    topped = filled.positions(4000).tolist()
    assert solved == [1024]
    assert len(topped) == 6 and set(solved) <= set(topped)
    assert longest_piece(topped, 4000) < 1024
    assert filled.positions(4000, 2000, [3000]).tolist() == topped  # no +fork / +hints: nothing added
