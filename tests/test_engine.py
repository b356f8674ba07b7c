"""Engine answers are bitwise those of an uncached prefill, on mamba2-tiny and hybrid-tiny.

Every engine of a model shares two compiled prefills per batch size (tokens padded to max_length,
checkpoint lists to 0 or 8 slots); references use the 8-slot shapes, so this file compiles few programs.
"""

import dataclasses

import jax
import numpy as np
import pytest

from engine_toy import ToyLM, uncached
from engine_toy import _prefill as toy_prefill
from sparse_prefix.engine import Engine, Sampling
from sparse_prefix.models import create
from sparse_prefix.simulate import replay
from sparse_prefix.traces import Request

MODELS = {}
REFERENCES = {}


def tiny(name):
    if name not in MODELS:
        MODELS[name] = create(name, seed=0)
    return MODELS[name]


def reference(name, rows):
    """Uncached logits of a batch of rows (memoised: every policy replays the same trace)."""
    key = (name,) + tuple(np.asarray(r).tobytes() for r in rows)
    if key not in REFERENCES:
        model, params = tiny(name)
        REFERENCES[key] = uncached(model, params, rows)
    return REFERENCES[key]


def trace(name, count=14, seed=0):
    """Requests over two documents that fork at many depths (some on, some off the chunk grid)."""
    model, _ = tiny(name)
    rng = np.random.default_rng(seed)
    top = min(model.vocab_size, 256)
    docs = {g: rng.integers(0, top, size=70) for g in ("a", "b")}
    out = []
    for i in range(count):
        group = "ab"[rng.integers(2)]
        cut = int(rng.integers(5, 70))
        tokens = np.concatenate([docs[group][:cut], rng.integers(0, top, size=rng.integers(1, 40))])
        hints = (cut,) if i % 2 else ()
        out.append(Request(group=group, tokens=tokens.astype(np.int32), hints=hints))
    return out


def planner_options(model):
    """The engine's Planner and the simulator's pick the same default bin for the model's max_length."""
    return {"resolve_every": 3}


def engine_for(name, policy, eviction="lru", capacity=3, **kwargs):
    model, params = tiny(name)
    kwargs.setdefault("planner_options", planner_options(model))
    return Engine(model, params, policy=policy, eviction=eviction, capacity_entries=capacity,
                  background_resolve=False, **kwargs)


def run_trace(engine, requests, namespaced=False):
    results = []
    for request in requests:
        results.append(engine.prefill(request.tokens, hints=request.hints,
                                      namespace=request.group if namespaced else None))
    return results


CASES = [("none", "fifo"), ("block:16", "lru"), ("dp:2", "fifo"), ("ldp:2+fork", "lru"),
         ("block:32+hints", "utility"), ("dp:3+fork+hints", "lru")]


@pytest.mark.parametrize("name", ["hybrid-tiny", "mamba2-tiny"])
@pytest.mark.parametrize("policy,eviction", CASES)
def test_answers_are_bitwise_uncached_and_recompute_matches_the_simulator(name, policy, eviction):
    model, _ = tiny(name)
    requests = trace(name)
    engine = engine_for(name, policy, eviction)
    results = run_trace(engine, requests, namespaced=True)
    for request, result in zip(requests, results):
        np.testing.assert_array_equal(result.last_logits, reference(name, [request.tokens])[0])
        assert result.stats.resume_position % model.chunk_size == 0
    simulated = replay(requests, policy, warm_fraction=0.0, capacity_entries=3, eviction=eviction,
                       grid=model.chunk_size, capture="one-pass",
                       planner_options={"max_length": model.max_length, **planner_options(model)})
    np.testing.assert_array_equal([r.stats.recomputed_tokens for r in results],
                                  simulated.records["recomputed_tokens"])
    np.testing.assert_array_equal([r.stats.checkpoints_stored for r in results],
                                  simulated.records["new_checkpoints"])
    if policy != "none":
        assert sum(r.stats.resume_position for r in results) > 0


@pytest.mark.parametrize("name", ["hybrid-tiny", "mamba2-tiny"])
def test_the_fused_and_the_separate_restore_serve_the_same_bitwise_answers(name):
    """`fuse_restore=True` traces the store's gather into the prefill program (one dispatch); it gives
    the answers and stores of the separate path (store.restore, then model.prefill), bitwise."""
    requests = trace(name, count=8, seed=2)
    fused, separate = engine_for(name, "ldp:2+fork", fuse_restore=True), engine_for(name, "ldp:2+fork")
    assert fused.fused and not separate.fused
    for request in requests:
        a, b = (engine.prefill(request.tokens, hints=request.hints) for engine in (fused, separate))
        np.testing.assert_array_equal(a.last_logits, b.last_logits)
        np.testing.assert_array_equal(a.last_logits, reference(name, [request.tokens])[0])
        assert (a.stats.resume_position, a.stats.checkpoints_stored) == \
            (b.stats.resume_position, b.stats.checkpoints_stored)
    assert fused.stats()["hits"] > 0
    with pytest.raises(TypeError, match="fuse_restore"):
        engine_for(name, "none", fuse_restore=1)
    assert engine_for(name, "none").fused == (jax.default_backend() == "gpu")     # "auto"


def test_engines_given_one_layout_share_their_compiled_programs_whatever_the_policy():
    """`layout=` fixes the store's shapes, so an engine of another policy reuses the fused program the
    first one compiled (the fused test above compiled it for this layout) and answers bitwise."""
    model, params = tiny("hybrid-tiny")
    layout = Engine.abstract(model, policy="ldp:2+fork", capacity_entries=3)
    requests = trace("hybrid-tiny", count=6, seed=3)
    wanted = [reference("hybrid-tiny", [request.tokens])[0] for request in requests]
    engine_for("hybrid-tiny", "ldp:2+fork", fuse_restore=True, layout=layout).warmup((1,))
    compiled = model.compile_count
    engine = engine_for("hybrid-tiny", "dp:2", fuse_restore=True, layout=layout)
    assert engine.layout == layout and engine.store.num_slots == layout.num_slots
    for request, want in zip(requests, wanted):
        np.testing.assert_array_equal(engine.prefill(request.tokens).last_logits, want)
    assert engine.stats()["hits"] > 0 and model.compile_count == compiled
    with pytest.raises(TypeError, match="layout must be a CacheLayout"):
        engine_for("hybrid-tiny", "dp:2", layout={"num_slots": 4})
    with pytest.raises(ValueError, match="another model"):
        engine_for("hybrid-tiny", "dp:2", layout=Engine.abstract(tiny("mamba2-tiny")[0], capacity_entries=3))
    with pytest.raises(ValueError, match="not both"):
        engine_for("hybrid-tiny", "dp:2", layout=layout, capacity_bytes=10**6)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        engine_for("hybrid-tiny", "dp:2", layout=dataclasses.replace(layout, num_slots=0))


@pytest.mark.parametrize("name", ["hybrid-tiny", "mamba2-tiny"])
def test_a_batch_equals_an_uncached_batch_of_the_same_size(name):
    requests = trace(name, count=10, seed=1)
    engine = engine_for(name, "block:16+fork", capacity=4)
    for first, second in zip(requests[::2], requests[1::2]):
        rows = [first.tokens, second.tokens]
        result = engine.prefill(rows)
        assert result.last_logits.shape[0] == 2 and len(result.stats) == 2
        np.testing.assert_array_equal(result.last_logits, reference(name, rows))
    assert engine.stats()["hits"] > 0


def test_a_forced_hash_collision_never_serves_a_wrong_state():
    requests = trace("hybrid-tiny", seed=2)
    honest = run_trace(engine_for("hybrid-tiny", "block:16+fork"), requests)
    colliding = engine_for("hybrid-tiny", "block:16+fork",
                           index_options={"hash_fn": lambda block: 0, "block_size": 4})
    for request, want, got in zip(requests, honest, run_trace(colliding, requests)):
        np.testing.assert_array_equal(got.last_logits, reference("hybrid-tiny", [request.tokens])[0])
        fields = ("overlap_depth", "resume_position", "recomputed_tokens", "checkpoints_stored")
        assert [getattr(got.stats, f) for f in fields] == [getattr(want.stats, f) for f in fields]
    assert sum(r.stats.resume_position for r in honest) > 0


def test_namespaces_never_resume_from_each_other():
    request = trace("hybrid-tiny", count=1, seed=3)[0]
    engine = engine_for("hybrid-tiny", "block:8", capacity=8)
    first = engine.prefill(request.tokens, namespace="tenant-a")
    other = engine.prefill(request.tokens, namespace="tenant-b")
    again = engine.prefill(request.tokens, namespace="tenant-a")
    assert first.stats.overlap_depth == 0 and other.stats.overlap_depth == 0
    assert again.stats.overlap_depth == request.length and again.stats.resume_position > 0
    default = Engine(*tiny("hybrid-tiny"), policy="block:8", capacity_entries=8, namespace="tenant-c",
                     background_resolve=False)
    assert default.prefill(request.tokens).stats.overlap_depth == 0
    for result in (first, other, again):
        np.testing.assert_array_equal(result.last_logits, reference("hybrid-tiny", [request.tokens])[0])


def cache_state(engine):
    arrays, refcount = engine.store.export()
    return (engine.index.entries(), engine.index.stats(), engine.planner.observations,
            refcount.tolist(), {k: v.tobytes() for k, v in arrays.items()}, engine.stats())


def test_bad_input_is_refused_and_leaves_store_and_index_unchanged():
    model, _ = tiny("hybrid-tiny")
    engine = engine_for("hybrid-tiny", "dp:2+fork+hints")
    run_trace(engine, trace("hybrid-tiny", count=4, seed=4))
    before = cache_state(engine)
    good = np.arange(20, dtype=np.int32)
    bad_calls = [
        (ValueError, "outside 0..255", dict(tokens=np.array([1, 2, 256]))),
        (ValueError, "outside", dict(tokens=np.array([-1, 2]))),
        (ValueError, "empty", dict(tokens=np.zeros((0,), np.int32))),
        (ValueError, "more than max_length", dict(tokens=np.ones(model.max_length + 1, np.int32))),
        (TypeError, "integer token ids", dict(tokens=np.ones(4, np.float32))),
        (TypeError, "integer token ids", dict(tokens=np.array([True, False]))),
        (ValueError, "1-D", dict(tokens=np.ones((2, 2, 2), np.int32))),
        (ValueError, r"tokens\[1\]", dict(tokens=[good, np.array([], np.int32)])),
        (ValueError, "hints must lie", dict(tokens=good, hints=(0,))),
        (ValueError, "hints must lie", dict(tokens=good, hints=(21,))),
        (TypeError, "hints must be integer", dict(tokens=good, hints=(2.5,))),
        (ValueError, "one sequence per row", dict(tokens=[good, good], hints=(3,))),
        (TypeError, "namespace", dict(tokens=good, namespace=7)),
    ]
    for error, match, kwargs in bad_calls:
        with pytest.raises(error, match=match):
            engine.prefill(**kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(good, 0)
    with pytest.raises(ValueError, match="exceeds max_length"):
        engine.generate(good, model.max_length)
    assert cache_state(engine) == before


def test_generate_decodes_like_the_model_and_caches_the_turn_for_the_next_one():
    model, params = tiny("hybrid-tiny")
    engine = engine_for("hybrid-tiny", "dp:2+fork", capacity=4)
    prompt = trace("hybrid-tiny", count=1, seed=5)[0].tokens
    out = engine.generate(prompt, 6)
    assert out.tokens.shape == (6,) and out.cached.checkpoints_stored >= 1
    state_tokens = list(prompt)
    expected = []
    logits = reference("hybrid-tiny", [prompt])[0]
    for _ in range(6):                                   # the uncached greedy loop, by hand
        expected.append(int(np.argmax(logits)))
        state_tokens.append(expected[-1])
        logits = reference("hybrid-tiny", [np.asarray(state_tokens, np.int32)])[0]
    turn = np.concatenate([prompt, out.tokens])
    assert out.tokens.tolist() == expected
    follow = np.concatenate([turn, [7, 8, 9]]).astype(np.int32)
    result = engine.prefill(follow)
    assert result.stats.resume_position == turn.size // model.chunk_size * model.chunk_size
    np.testing.assert_array_equal(result.last_logits, reference("hybrid-tiny", [follow])[0])
    sampled = engine.generate(prompt, 3, Sampling(temperature=1.0, top_k=5, seed=1))
    assert sampled.tokens.shape == (3,) and sampled.prompt.resume_position > 0


def test_warmup_compiles_ahead_and_sizes_are_planned_before_allocating():
    model, params = tiny("hybrid-tiny")
    layout = Engine.abstract(model, policy="block:16+fork", capacity_entries=5)
    profile = model.memory_profile()
    assert layout.slot_bytes == profile.checkpoint_bytes
    assert layout.page_bytes == profile.kv_bytes_per_token * model.chunk_size
    assert layout.num_pages == 5 * (model.max_length // model.chunk_size)
    bounded = Engine.abstract(model, policy="block:16+fork", capacity_entries=5, capacity_bytes=60_000)
    assert bounded.allocated_bytes <= 60_000 and bounded.num_pages < layout.num_pages
    with pytest.raises(ValueError, match="holds no checkpoint"):
        Engine.abstract(model, capacity_bytes=10)
    engine = Engine(model, params, policy="block:16+fork", capacity_entries=5, background_resolve=False)
    assert engine.store.allocated_bytes == layout.allocated_bytes
    engine.warmup((1,))
    compiled = model.compile_count
    run_trace(engine, trace("hybrid-tiny", count=6, seed=6))
    assert model.compile_count == compiled
    stats = engine.stats()
    assert stats["requests"] == 6 and 0 < stats["resident_bytes"] <= stats["allocated_bytes"]
    assert stats["hit_rate"] == stats["hits"] / 6


class ShapeRecorder:
    """A model wrapper that records the (batch, checkpoint slots) of every prefill call."""

    def __init__(self, model):
        self._model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def prefill(self, params, tokens, state, checkpoints, lengths=None):
        self.calls.append(np.shape(checkpoints))
        return self._model.prefill(params, tokens, state, checkpoints, lengths)


def test_a_request_storing_nothing_gets_no_emission_buffers_and_two_programs_serve_a_batch_size():
    toy = ToyLM(chunk_size=4, vocab_size=32, max_length=48)
    recorder = ShapeRecorder(toy)
    engine = Engine(recorder, toy.init_params(0), policy="block:16", capacity_entries=5,
                    background_resolve=False)
    engine.warmup((1, 2))
    compiled, warm_calls = toy_prefill._cache_size(), len(recorder.calls)
    short, long, fresh = (np.arange(a, b, dtype=np.int32) for a, b in ((1, 11), (11, 31), (2, 22)))
    results = [engine.prefill(short), engine.prefill(long), engine.prefill([short[:9], short[:7]]),
               engine.prefill([fresh, short])]
    assert [r.stats.checkpoints_stored for r in results[:2]] == [0, 1]
    assert [[s.checkpoints_stored for s in r.stats] for r in results[2:]] == [[0, 0], [1, 0]]
    assert recorder.calls[warm_calls:] == [(1, 0), (1, 8), (2, 0), (2, 8)]
    assert toy_prefill._cache_size() == compiled          # K = 0 and K = 8 per batch size, both warmed
    for result, rows in zip(results, ([short], [long], [short[:9], short[:7]], [fresh, short])):
        np.testing.assert_array_equal(np.reshape(result.last_logits, (len(rows), -1)),
                                      uncached(toy, engine.params, rows))
