"""State export of the host-side objects: histograms, Planner and PrefixIndex round-trip through plain
data (JSON + arrays) and continue exactly like the originals; bad or foreign states are refused by name."""

import json

import numpy as np
import pytest

from sparse_prefix import Planner
from sparse_prefix.histogram import LengthBucketedHistogram, OverlapHistogram
from sparse_prefix.index import PrefixIndex
from sparse_prefix.persist import join_arrays, split_arrays
from sparse_prefix.planner import default_bin_size


def through_json(state):
    """What a snapshot does to a state: arrays out, the rest through JSON, arrays back in."""
    tree, arrays = split_arrays(state, "s")
    return join_arrays(json.loads(json.dumps(tree)), arrays)


# ----------------------------------------------------------------------------- histograms


def test_histograms_round_trip_and_continue_bitwise():
    rng = np.random.default_rng(0)
    pooled, buckets = OverlapHistogram(100, bin_size=8, decay=0.5), LengthBucketedHistogram(100, bin_size=8)
    for _ in range(1500):          # past the lazy scale's renormalisation
        length = int(rng.integers(1, 101))
        depth = int(rng.integers(0, length + 1))
        pooled.observe(depth)
        buckets.observe(depth, length)
    copies = [type(h).from_state_dict(through_json(h.state_dict())) for h in (pooled, buckets)]
    for _ in range(50):
        length = int(rng.integers(1, 101))
        depth = int(rng.integers(0, length + 1))
        for hist in (pooled, copies[0]):
            hist.observe(depth)
        for hist in (buckets, copies[1]):
            hist.observe(depth, length)
    np.testing.assert_array_equal(copies[0].binned(), pooled.binned())
    np.testing.assert_array_equal(copies[1].binned(), buckets.binned())
    assert copies[0].count == pooled.count and copies[1].count == buckets.count


@pytest.mark.parametrize("change, field", [
    (dict(type="Planner"), "'type'"),
    (dict(version=2), "'version'"),
    (dict(bin_size=4), "'bin_size'"),
    (dict(decay=0.9), "'decay'"),
    (dict(scale=0.0), "'scale'"),
    (dict(count=-1), "'count'"),
    (dict(raw=np.zeros(3)), "'raw'"),
    (dict(raw=np.full(13, np.nan)), "'raw'"),
    (dict(raw=np.full(13, -1.0)), "'raw'"),
    (dict(count=0), "'raw'"),
])
def test_a_bad_histogram_state_is_refused_naming_the_field(change, field):
    hist = OverlapHistogram(100, bin_size=8, decay=0.5)
    hist.observe(3)
    before = hist.state_dict()
    with pytest.raises(ValueError, match=field):
        hist.load_state_dict({**before, **change})
    np.testing.assert_array_equal(hist.binned(), OverlapHistogram.from_state_dict(before).binned())


# ----------------------------------------------------------------------------- planner


def feed(planner, seed, count, max_length):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        length = int(rng.integers(1, max_length + 1))
        planner.observe(int(rng.integers(0, length + 1)) // 8 * 8, length)


def lengths_positions(planner):
    return [planner.positions(n, n // 2).tolist() for n in range(1, planner.max_length + 1)]


@pytest.mark.parametrize("spec, kwargs, length", [
    ("dp:2+fork", dict(bin_size=8, max_length=64), 64),
    ("ldp:1", dict(bin_size=32, max_length=256), 200),
    ("dp:2", dict(bin_size=8, grid=3, max_length=64), 64),       # token-level solve
    ("block:8+end", dict(max_length=64), 64),
])
def test_a_loaded_planner_places_exactly_like_the_saved_one_without_a_new_solve(spec, kwargs, length):
    kwargs = dict(kwargs, decay=0.5, resolve_every=5)
    source = Planner(spec, **kwargs)
    for depth in [length // 4] * 20 + [length * 3 // 4] * 3:      # the last 3 are not solved yet
        source.observe(depth, length)
    state = through_json(source.state_dict())
    loaded = Planner(spec, **kwargs)
    loaded.load_state_dict(state)
    again = Planner.from_state_dict(state)
    for planner in (loaded, again):
        assert planner.solves == source.solves and planner.observations == source.observations
        assert lengths_positions(planner) == lengths_positions(source)
    if source.spec.uses_histogram:        # a re-solve of today's counts would place elsewhere
        again.resolve()
        assert lengths_positions(again) != lengths_positions(source)
    for planner in (source, loaded):      # both re-solve at the same observation, alike
        for depth in (length // 2, length // 2):
            planner.observe(depth, length)
    assert loaded.solves == source.solves
    assert lengths_positions(loaded) == lengths_positions(source)


def test_a_bad_or_foreign_planner_state_is_refused_naming_the_field():
    source = Planner("dp:2+fork", bin_size=8, max_length=64, resolve_every=5)
    feed(source, 3, 10, 64)
    state = source.state_dict()
    target = Planner("dp:2+fork", bin_size=8, max_length=64, resolve_every=5)
    tampered = {**state, "solution": {**state["solution"], "positions": state["solution"]["positions"] + 8}}
    cases = [
        (Planner("dp:3+fork", bin_size=8, max_length=64, resolve_every=5), state, "'policy'"),
        (Planner("dp:2+fork", bin_size=8, max_length=64, resolve_every=6), state, "'resolve_every'"),
        (target, {**state, "observations": 11}, "'histogram'"),
        (target, {**state, "snapshot_at": 99}, "'snapshot_at'"),
        (target, tampered, "'solution.positions'"),
        (target, {**state, "histogram": {**state["histogram"], "raw": np.zeros((2, 2))}}, "'histogram'"),
        (Planner("block:8", max_length=64), {**state, "policy": "block:8", "bin_size": 4,
                                                                  "resolve_every": 10}, "'histogram'"),
    ]
    for planner, bad, field in cases:
        with pytest.raises(ValueError, match=field):
            planner.load_state_dict(bad)
    assert target.observations == 0 and target.solves == 0      # all or nothing


def test_the_default_bin_size_fits_any_max_length_so_tiny_models_need_no_setting():
    assert default_bin_size(16384) == 64 and default_bin_size(16384, 64) == 64
    assert default_bin_size(16384, 256) == 256 and default_bin_size(16384, 100) == 100   # grid-wide
    assert default_bin_size(48, 4) == 4 and default_bin_size(128, 8) == 8
    assert default_bin_size(3, 4) == 3 and default_bin_size(1) == 1
    for max_length in (7, 48):                             # below the paper's 64-token bins
        planner = Planner("ldp:2", max_length=max_length, resolve_every=1)
        assert 1 <= planner.bin_size <= max_length
        planner.observe(max_length // 2, max_length)
        assert planner.solves == 1 and np.all(planner.positions(max_length) <= max_length)
    with pytest.raises(ValueError, match="bin_size"):
        Planner("dp:2", max_length=32, bin_size=64)         # an explicit bin is still checked


# ----------------------------------------------------------------------------- index


def requests(seed, count):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 5, size=40) for _ in range(3)]
    for _ in range(count):
        doc = docs[rng.integers(3)]
        cut = int(rng.integers(0, 40))
        tail = rng.integers(0, 5, size=int(rng.integers(1 if cut == 0 else 0, 12)))
        yield "ab"[rng.integers(2)], np.concatenate([doc[:cut], tail]).astype(np.int32)


def serve(index, planner, stream):
    """Plan + commit every request; returns everything observable about each step."""
    out = []
    for group, tokens in stream:
        plan = index.plan(tokens, group, (), planner)
        result = index.commit(plan, payload=(len(tokens), int(tokens[0])))
        out.append((plan.match, plan.resume_position, plan.resume_slot, plan.emit_positions.tolist(),
                    plan.inherited, result.entry_id, result.slots, result.evicted, result.freed_slots))
    return out


@pytest.mark.parametrize("eviction, capacity_slots", [("lru", 24), ("fifo", None), ("utility", 30)])
def test_a_loaded_index_continues_exactly_like_the_saved_one(eviction, capacity_slots):
    options = dict(capacity_entries=6, capacity_slots=capacity_slots, eviction=eviction, grid=2,
                   block_size=4)
    source = PrefixIndex(**options)
    serve(source, Planner("block:6+fork", max_length=64), requests(4, 40))
    state = through_json(source.state_dict())
    loaded = PrefixIndex.from_state_dict(state)
    assert loaded.entries() == source.entries() and loaded.refcounts() == source.refcounts()
    assert loaded.stats() == source.stats() and loaded.state_dict()["clock"] == state["clock"]
    later = list(requests(5, 40))
    planner = Planner("block:6+fork", max_length=64)
    assert serve(loaded, planner, later) == serve(source, planner, later)


def test_a_bad_index_state_is_refused_naming_the_field_and_changes_nothing():
    source = PrefixIndex(capacity_entries=6, capacity_slots=24, grid=2, block_size=4)
    serve(source, Planner("block:6+fork", max_length=64), requests(6, 12))
    state = source.state_dict()
    entries = state["entries"]
    held = {(id(f), s) for f in entries for _, s in f["checkpoints"]}
    shared = next(e for e in entries[1:] if e["checkpoints"] and
                  any((id(f), e["checkpoints"][0][1]) in held for f in entries if f is not e))

    def with_entry(i, **change):
        return {**state, "entries": [dict(e, **change) if j == i else e for j, e in enumerate(entries)]}

    i = entries.index(shared)
    position, slot = shared["checkpoints"][0]
    cases = [
        (with_entry(0, checkpoints=[[3, 0]]), "checkpoints"),                 # off the grid
        (with_entry(0, checkpoints=[[2, 24]]), "checkpoints"),                # slot out of range
        (with_entry(0, group=[1]), "group"),
        (with_entry(0, length=10**6), "length"),
        (with_entry(0, payload=["x"]), "payload"),
        (with_entry(i, checkpoints=[[position + 2, slot]] + shared["checkpoints"][1:]), "slot"),
        ({**state, "tokens": np.append(state["tokens"], 1)}, "tokens"),
        (with_entry(0, created=entries[1]["created"], last_used=entries[1]["created"]), "order"),
        ({**state, "grid": 4}, "'grid'"),
        ({**state, "stats": {"lookups": 1}}, "'stats'"),
        ({**state, "version": 0}, "'version'"),
    ]
    target = PrefixIndex(capacity_entries=6, capacity_slots=24, grid=2, block_size=4)
    for bad, field in cases:
        with pytest.raises(ValueError, match=field):
            target.load_state_dict(bad)
    assert target.entries() == () and target.stats()["lookups"] == 0
    open_plan = target.plan(np.arange(5), "a")
    with pytest.raises(RuntimeError, match="open"):
        target.load_state_dict(state)
    target.abort(open_plan)
    target.load_state_dict(state)
    assert target.entries() == source.entries()
    tuple_group = PrefixIndex(capacity_entries=2)
    tuple_group.commit(tuple_group.plan([1], ("a", 1)))
    with pytest.raises(TypeError, match="group"):
        tuple_group.state_dict()
