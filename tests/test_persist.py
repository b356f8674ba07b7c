"""Snapshots: a complete save loads back whole; interrupted, corrupted, missing or foreign ones are refused."""

import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest

from sparse_prefix import persist
from sparse_prefix.persist import SnapshotError, load_snapshot, params_digest, save_snapshot

PRINT = {"model": "toy", "params_sha256": "abc", "chunk_size": 4, "library_version": "0", "layout": {}}


def arrays_of(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"slab": rng.normal(size=(3, 4)).astype(np.float32),
            "conv": rng.normal(size=(3, 2)).astype(ml_dtypes.bfloat16),
            "refs": rng.integers(0, 3, size=(5,)).astype(np.int32)}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


def test_a_saved_snapshot_loads_back_bitwise_with_its_metadata(tmp_path):
    arrays = arrays_of(0)
    save_snapshot(tmp_path, arrays, {"entries": [1, 2]}, PRINT)
    got, meta = load_snapshot(tmp_path, PRINT)
    assert_same(got, arrays)
    assert meta == {"entries": [1, 2]}


def test_zero_size_arrays_round_trip_with_their_shape_and_dtype(tmp_path):
    arrays = {"tokens": np.zeros((0,), np.int32), "pages": np.zeros((0, 4), ml_dtypes.bfloat16),
              "slab": np.ones((2,), np.float32)}
    save_snapshot(tmp_path, arrays, {}, PRINT)
    assert_same(load_snapshot(tmp_path, PRINT)[0], arrays)
    save_snapshot(tmp_path, {"only_empty": np.zeros((0,), np.int64)}, {}, PRINT)
    assert_same(load_snapshot(tmp_path, PRINT)[0], {"only_empty": np.zeros((0,), np.int64)})


def test_an_interrupted_save_leaves_the_previous_snapshot_whole(tmp_path, monkeypatch):
    save_snapshot(tmp_path, arrays_of(1), {"generation": 1}, PRINT)

    def die_midway(path, arrays):          # the process dies while orbax writes
        (path / "partial").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(persist, "_save_arrays", die_midway)
    with pytest.raises(KeyboardInterrupt):
        save_snapshot(tmp_path, arrays_of(2), {"generation": 2}, PRINT)
    got, meta = load_snapshot(tmp_path, PRINT)
    assert_same(got, arrays_of(1))
    assert meta == {"generation": 1}


def test_a_save_killed_after_writing_but_before_switching_is_ignored(tmp_path, monkeypatch):
    save_snapshot(tmp_path, arrays_of(3), {"generation": 1}, PRINT)
    real_replace = persist.os.replace

    def die_on_switch(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(persist.os, "replace", die_on_switch)
    with pytest.raises(KeyboardInterrupt):
        save_snapshot(tmp_path, arrays_of(4), {"generation": 2}, PRINT)
    monkeypatch.setattr(persist.os, "replace", real_replace)
    assert len(list(tmp_path.glob("snapshot-*"))) == 2      # the new one is complete but not current
    assert load_snapshot(tmp_path, PRINT)[1] == {"generation": 1}
    save_snapshot(tmp_path, arrays_of(5), {"generation": 3}, PRINT)
    assert len(list(tmp_path.glob("snapshot-*"))) == 1      # leftovers are cleaned on the next save
    assert load_snapshot(tmp_path, PRINT)[1] == {"generation": 3}


def test_a_corrupted_file_fails_the_checksums(tmp_path):
    folder = save_snapshot(tmp_path, arrays_of(6), {}, PRINT)
    victim = max((p for p in folder.rglob("*") if p.is_file() and p.name != "MANIFEST.json"),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="checksums"):
        load_snapshot(tmp_path, PRINT)


def test_a_tampered_manifest_or_pointer_is_refused(tmp_path):
    folder = save_snapshot(tmp_path, arrays_of(7), {}, PRINT)
    manifest = folder / "MANIFEST.json"
    manifest.write_text(json.dumps({}))
    with pytest.raises(SnapshotError, match="manifest"):
        load_snapshot(tmp_path, PRINT)
    (tmp_path / "LATEST").write_text("not json")
    with pytest.raises(SnapshotError, match="unreadable"):
        load_snapshot(tmp_path, PRINT)


def test_a_missing_snapshot_says_so(tmp_path):
    with pytest.raises(SnapshotError, match="no snapshot"):
        load_snapshot(tmp_path / "nowhere", PRINT)


def test_a_snapshot_of_other_weights_or_layout_is_refused_naming_the_field(tmp_path):
    save_snapshot(tmp_path, arrays_of(8), {}, PRINT)
    with pytest.raises(SnapshotError, match="params_sha256"):
        load_snapshot(tmp_path, dict(PRINT, params_sha256="def"))
    with pytest.raises(SnapshotError, match="layout"):
        load_snapshot(tmp_path, dict(PRINT, layout={"num_slots": 3}))


def test_params_digest_sees_every_bit_and_the_tree_structure():
    params = {"w": np.ones((2, 2), np.float32), "b": np.zeros((2,), np.float32)}
    base = params_digest(params)
    flipped = {"w": params["w"].copy(), "b": params["b"]}
    flipped["w"].view(np.uint32)[0, 0] ^= 1
    assert params_digest(flipped) != base
    assert params_digest({"w2": params["w"], "b": params["b"]}) != base
    assert params_digest({"w": params["w"].astype(ml_dtypes.bfloat16), "b": params["b"]}) != base
    assert params_digest(dict(params)) == base


# ----------------------------------------------------------------------------- whole-engine snapshots

from engine_toy import ToyLM, uncached  # noqa: E402
from sparse_prefix.engine import Engine  # noqa: E402

TOY = ToyLM(chunk_size=4, vocab_size=32, max_length=48)
TOY_PARAMS = TOY.init_params(0)


def toy_requests(seed: int, count: int) -> list:
    rng = np.random.default_rng(seed)
    doc = rng.integers(1, 32, size=30)
    return [np.concatenate([doc[:rng.integers(4, 30)], rng.integers(1, 32, size=rng.integers(1, 15))])
            .astype(np.int32) for _ in range(count)]


def toy_engine(params=TOY_PARAMS) -> Engine:
    return Engine(TOY, params, policy="dp:2+fork", capacity_entries=4, background_resolve=False,
                  planner_options={"resolve_every": 3})


def summary(engine: Engine) -> tuple:
    entries = tuple((e.group, e.length, e.checkpoints) for e in engine.index.entries())
    return entries, engine.stats(), engine.store.page_refcounts().tolist(), engine.planner.observations


def test_an_engine_snapshot_restores_the_warm_cache_whole(tmp_path):
    source = toy_engine()
    for tokens in toy_requests(0, 12):
        source.prefill(tokens)
    source.save(tmp_path)
    restored = toy_engine()
    restored.load(tmp_path)
    assert summary(restored) == summary(source)
    assert source.planner.solves > 0 and restored.planner.solves == source.planner.solves
    lengths = range(1, TOY.max_length + 1)            # the saved solution, not a re-solve of today's counts
    assert [restored.planner.positions(n).tolist() for n in lengths] == \
           [source.planner.positions(n).tolist() for n in lengths]
    for tokens in toy_requests(1, 6):                 # both continue identically and exactly
        want, got = source.prefill(tokens), restored.prefill(tokens)
        assert got.stats == dataclasses.replace(want.stats, timings=got.stats.timings)
        np.testing.assert_array_equal(got.last_logits, uncached(TOY, TOY_PARAMS, [tokens])[0])
        np.testing.assert_array_equal(got.last_logits, want.last_logits)


def test_an_interrupted_engine_save_leaves_the_last_complete_snapshot(tmp_path, monkeypatch):
    engine = toy_engine()
    for tokens in toy_requests(2, 6):
        engine.prefill(tokens)
    engine.save(tmp_path)
    saved = summary(engine)
    for tokens in toy_requests(3, 6):
        engine.prefill(tokens)

    def die_midway(path, arrays):
        (path / "half-written").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(persist, "_save_arrays", die_midway)
    with pytest.raises(KeyboardInterrupt):
        engine.save(tmp_path)
    restored = toy_engine()
    restored.load(tmp_path)
    assert summary(restored) == saved


def assert_empty_and_working(engine: Engine) -> None:
    assert engine.index.entries() == () and engine.store.pages_in_use == 0
    assert engine.stats()["requests"] == 0
    tokens = toy_requests(4, 1)[0]
    np.testing.assert_array_equal(engine.prefill(tokens).last_logits,
                                  uncached(TOY, engine.params, [tokens])[0])
    assert engine.prefill(tokens).stats.resume_position > 0


def test_a_snapshot_of_other_weights_is_refused_leaving_an_empty_working_cache(tmp_path):
    source = toy_engine()
    for tokens in toy_requests(5, 5):
        source.prefill(tokens)
    source.save(tmp_path)
    other = toy_engine(TOY.init_params(1))
    for tokens in toy_requests(6, 3):
        other.prefill(tokens)
    with pytest.raises(SnapshotError, match="params_sha256"):
        other.load(tmp_path)
    assert_empty_and_working(other)


def test_a_corrupted_or_missing_engine_snapshot_leaves_an_empty_working_cache(tmp_path):
    source = toy_engine()
    for tokens in toy_requests(7, 5):
        source.prefill(tokens)
    folder = source.save(tmp_path)
    victim = max((p for p in (folder / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-3] + b"\x00\x01\x02")
    target = toy_engine()
    for tokens in toy_requests(8, 3):
        target.prefill(tokens)
    with pytest.raises(SnapshotError, match="checksums"):
        target.load(tmp_path)
    assert_empty_and_working(target)
    with pytest.raises(SnapshotError, match="no snapshot"):
        target.load(tmp_path / "absent")
    assert_empty_and_working(target)
