"""The Engine's host cost on a hit (issue 7): counted device dispatches and waits, never timed.

A hit issues exactly one gather and one prefill, then the compiled slice of its logits (queued
before the commit's writes, so the answer never waits for them), a request that stores states adds
one scatter of states and one of KV pages, the model is handed host-side lengths (so its checks
never wait for the gather), and the engine waits on the device once, after its commit. A device failure surfacing at that wait drops the cache rather than serve unwritten
states. ToyLM programs compile in well under a second, shared with tests/test_engine.py.
"""

import jax
import numpy as np
import pytest

import sparse_prefix.engine as engine_module
import sparse_prefix.store as store_module
from engine_toy import ToyLM, uncached
from sparse_prefix.engine import Engine


class Recorder:
    """Wraps a model: logs each prefill with the type of the state's length it was handed."""

    def __init__(self, model, events: list):
        self._model, self.events, self.length_types = model, events, []
        self.fail_wait = False

    def __getattr__(self, name):
        return getattr(self._model, name)

    def prefill(self, params, tokens, state, checkpoints, lengths=None):
        self.events.append("prefill")
        self.length_types.append(type(state.length))
        logits, final, emitted = self._model.prefill(params, tokens, state, checkpoints, lengths)
        return (_FailingWait() if self.fail_wait else logits), final, emitted


class _FailingWait:
    """Stands for logits whose device computation fails when waited on."""

    def block_until_ready(self):
        raise RuntimeError("device failure")


@pytest.fixture()
def counted(monkeypatch):
    """(engine, recorder, events): every store dispatch and every wait of the engine is logged."""
    events: list = []
    for name in ("_gather_state", "_insert_rows", "_write_pages"):
        original = getattr(store_module, name)

        def logged(*args, _original=original, _name=name, **kwargs):
            events.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(store_module, name, logged)
    first_row = engine_module._first_row

    def logged_first_row(logits):
        events.append("_first_row")
        return logits if isinstance(logits, _FailingWait) else first_row(logits)

    monkeypatch.setattr(engine_module, "_first_row", logged_first_row)
    block = jax.block_until_ready

    def logged_block(x):
        events.append("wait")
        return block(x)

    monkeypatch.setattr(engine_module.jax, "block_until_ready", logged_block)
    toy = ToyLM(chunk_size=4, vocab_size=32, max_length=48)
    recorder = Recorder(toy, events)
    engine = Engine(recorder, toy.init_params(0), policy="none+hints", capacity_entries=4,
                    background_resolve=False)
    return engine, recorder, events


PREFIX = np.arange(1, 17, dtype=np.int32)


def test_a_hit_dispatches_one_gather_and_one_prefill_and_waits_once(counted):
    engine, recorder, events = counted
    engine.prefill(np.concatenate([PREFIX, [3, 4, 5]]), hints=[16])
    events.clear()
    hit = engine.prefill(np.concatenate([PREFIX, [7, 8, 9, 10]]))
    assert hit.stats.resume_position == 16 and hit.stats.checkpoints_stored == 0
    assert events == ["_gather_state", "prefill", "_first_row", "wait"]
    np.testing.assert_array_equal(hit.last_logits, uncached(recorder, engine.params,
                                                            [np.concatenate([PREFIX, [7, 8, 9, 10]])])[0])


def test_a_storing_request_cuts_its_answer_before_one_scatter_of_states_and_one_of_pages(counted):
    engine, _, events = counted
    result = engine.prefill(np.concatenate([PREFIX, [3, 4, 5]]), hints=[8, 16])
    assert result.stats.checkpoints_stored == 2
    assert events == ["_gather_state", "prefill", "_first_row", "_insert_rows", "_write_pages", "wait"]


def test_a_batch_returns_the_prefills_own_logits_without_a_slice(counted):
    engine, _, events = counted
    result = engine.prefill([np.concatenate([PREFIX, [3]]), np.concatenate([PREFIX, [4, 5]])])
    assert "_first_row" not in events and result.last_logits.shape[0] == 2


def test_the_model_gets_host_lengths_so_its_checks_never_wait_for_the_gather(counted):
    engine, recorder, _ = counted
    engine.prefill(np.concatenate([PREFIX, [3]]), hints=[16])
    engine.prefill(np.concatenate([PREFIX, [5, 6]]))
    assert recorder.length_types == [np.ndarray, np.ndarray]
    state = engine.store.restore([-1, -1], [0, 4])
    assert isinstance(state.length, np.ndarray) and state.length.dtype == np.int32
    np.testing.assert_array_equal(state.length, [0, 4])
    engine.store.recycle(state.kv)


def test_a_device_failure_at_the_wait_drops_the_cache_instead_of_serving_unwritten_states(counted):
    engine, recorder, _ = counted
    engine.prefill(np.concatenate([PREFIX, [3]]), hints=[16])
    recorder.fail_wait = True
    with pytest.raises(RuntimeError, match="device failure"):
        engine.prefill(np.concatenate([PREFIX, [5, 6]]), hints=[8])
    recorder.fail_wait = False
    assert engine.stats()["entries"] == 0 and engine.stats()["in_flight"] == 0
    request = np.concatenate([PREFIX, [9, 9]])
    again = engine.prefill(request)
    assert again.stats.resume_position == 0
    np.testing.assert_array_equal(again.last_logits, uncached(recorder, engine.params, [request])[0])
