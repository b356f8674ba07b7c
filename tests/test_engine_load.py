"""The Engine under load: thousands of requests, tiny capacity, threads, in-flight pins (ToyLM)."""

import threading
from collections import Counter

import jax
import numpy as np
import pytest

from engine_toy import ToyLM, uncached
from sparse_prefix.engine import Engine

MODEL = ToyLM(chunk_size=4, vocab_size=32, max_length=48)
PARAMS = MODEL.init_params(0)


def workload(seed: int, count: int, groups: int = 5) -> list[np.ndarray]:
    """Requests that share document prefixes and branch; token 0 is never used (the gate token)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, MODEL.vocab_size, size=rng.integers(8, 30)) for _ in range(groups)]
    out = []
    for _ in range(count):
        doc = docs[rng.integers(groups)]
        cut = rng.integers(1, doc.size + 1)
        tail = rng.integers(1, MODEL.vocab_size, size=rng.integers(0, MODEL.max_length - cut + 1))
        out.append(np.concatenate([doc[:cut], tail]).astype(np.int32))
    return out


def check_invariants(engine: Engine) -> None:
    """Capacity, slot and page accounting all agree; nothing is pinned or leaked between requests."""
    entries = engine.index.entries()
    assert len(entries) <= engine.index.capacity_entries
    held = Counter(slot for entry in entries for _, slot in entry.checkpoints)
    assert dict(held) == engine.index.refcounts()
    assert all(0 <= slot < engine.layout.num_slots for slot in held)
    assert all(entry.pins == 0 for entry in entries)
    pages = Counter()
    with engine.index._lock:
        for entry in engine.index._entries.values():
            pages.update(entry.payload)
            deepest = max((p for p, _ in entry.checkpoints), default=0)
            assert len(entry.payload) == deepest // engine.chunk_size
    refcount = engine.store.page_refcounts()
    assert {p: int(refcount[p]) for p in np.flatnonzero(refcount)} == dict(pages)
    assert engine.stats()["in_flight"] == 0


def test_thousands_of_requests_keep_capacity_accounting_and_memory_flat():
    engine = Engine(MODEL, PARAMS, policy="block:8+fork", eviction="lru", capacity_entries=6,
                    capacity_bytes=4_000, background_resolve=False)
    assert engine.layout.num_pages < 6 * engine.layout.pages_per_sequence   # pages are the bottleneck
    requests = workload(0, 2000)
    live = []
    for i, tokens in enumerate(requests):
        result = engine.prefill(tokens)
        if i % 97 == 0:
            np.testing.assert_array_equal(result.last_logits, uncached(MODEL, PARAMS, [tokens])[0])
            check_invariants(engine)
        if i in (500, 1999):
            live.append(len(jax.live_arrays()))
    check_invariants(engine)
    stats = engine.stats()
    assert stats["requests"] == 2000 and stats["hit_rate"] > 0.5
    assert stats["evictions"] > 100 and stats["page_evictions"] > 0
    assert stats["resident_bytes"] <= stats["allocated_bytes"] <= 4_000
    assert live[1] <= live[0] + 2


def test_concurrent_callers_get_exact_answers():
    engine = Engine(MODEL, PARAMS, policy="dp:3+fork", eviction="fifo", capacity_entries=5,
                    background_resolve=True, planner_options={"resolve_every": 4})
    requests = workload(1, 160)
    expected = {i: uncached(MODEL, PARAMS, [tokens])[0] for i, tokens in enumerate(requests)}
    failures = []

    def worker(offset):
        for i in range(offset, len(requests), 4):
            got = np.asarray(engine.prefill(requests[i]).last_logits)
            if not np.array_equal(got, expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    check_invariants(engine)
    engine.close()                                  # waits for a re-solve still running
    assert engine.stats()["hits"] > 40 and engine.planner.solves > 0


def test_a_pinned_resume_entry_survives_eviction_pressure_while_its_request_runs():
    model = ToyLM(chunk_size=4, vocab_size=32, max_length=48)
    engine = Engine(model, PARAMS, policy="block:8", eviction="fifo", capacity_entries=3,
                    background_resolve=False)
    shared = np.arange(1, 21, dtype=np.int32)
    engine.prefill(shared)                                        # entry holding 8 and 16
    slow = np.concatenate([shared, [0, 6, 7]]).astype(np.int32)  # its suffix holds the gate token
    model.gate = threading.Event()
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=engine.prefill(slow)))
    thread.start()
    while engine.stats()["in_flight"] == 0:
        thread.join(0.01)
    for tokens in workload(2, 30):                                # heavy traffic, 3 entries
        engine.prefill(tokens)
        assert any(entry.pins == 1 and entry.length == shared.size for entry in engine.index.entries())
    model.gate.set()
    thread.join()
    assert box["result"].stats.resume_position == 16
    np.testing.assert_array_equal(box["result"].last_logits, uncached(model, PARAMS, [slow])[0])
    check_invariants(engine)


@pytest.mark.parametrize("eviction", ["fifo", "utility"])
def test_every_eviction_policy_keeps_the_accounting(eviction):
    engine = Engine(MODEL, PARAMS, policy="ldp:2+fork+hints", eviction=eviction, capacity_entries=4,
                    capacity_bytes=1_500, background_resolve=False, planner_options={"resolve_every": 5})
    for i, tokens in enumerate(workload(3, 300)):
        hints = (int(tokens.size // 2),) if tokens.size > 1 else ()
        result = engine.prefill(tokens, hints=hints)
        if i % 50 == 0:
            np.testing.assert_array_equal(result.last_logits, uncached(MODEL, PARAMS, [tokens])[0])
    check_invariants(engine)
    assert engine.stats()["evictions"] > 50


def test_a_slow_background_resolve_never_stalls_requests(monkeypatch):
    import time

    from sparse_prefix import placement

    started, release = threading.Event(), threading.Event()
    real_solve = placement.solve

    def slow_solve(*args, **kwargs):
        started.set()
        release.wait(timeout=30)
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(placement, "solve", slow_solve)
    engine = Engine(MODEL, PARAMS, policy="dp:2+fork", capacity_entries=4, background_resolve=True,
                    planner_options={"resolve_every": 2})
    requests = workload(4, 40)
    for tokens in requests[:2]:
        engine.prefill(tokens)
    assert started.wait(timeout=10)                 # a re-solve is now stuck in the background
    begin = time.perf_counter()
    for tokens in requests[2:]:
        result = engine.prefill(tokens)
        np.testing.assert_array_equal(result.last_logits, uncached(MODEL, PARAMS, [tokens])[0])
    assert time.perf_counter() - begin < 25 and engine.planner.solves == 0
    release.set()
    engine.close()
    assert engine.planner.solves >= 1


def test_a_failed_state_write_drops_the_cache_rather_than_serve_unwritten_states(monkeypatch):
    engine = Engine(MODEL, PARAMS, policy="block:8", capacity_entries=4, background_resolve=False)
    requests = workload(5, 6)
    for tokens in requests[:3]:
        engine.prefill(tokens)

    def lost_device(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.store, "insert", lost_device)
    fresh = np.arange(1, 30, dtype=np.int32)        # stores states at 8, 16, 24
    with pytest.raises(RuntimeError, match="device lost"):
        engine.prefill(fresh)
    monkeypatch.undo()
    assert engine.index.entries() == () and engine.store.pages_in_use == 0
    assert engine.stats()["in_flight"] == 0
    for tokens in [fresh] + requests[3:]:
        np.testing.assert_array_equal(engine.prefill(tokens).last_logits,
                                      uncached(MODEL, PARAMS, [tokens])[0])
    check_invariants(engine)
