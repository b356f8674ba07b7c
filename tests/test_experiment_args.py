"""The GPU probes' argument parsers (the scripts themselves only mean something on a GPU)."""

import pytest

from sparse_prefix.experiments.bench_attention import parse_variants
from sparse_prefix.experiments.probe_hybrid import parse_variant
from sparse_prefix.experiments.probe_step_fit import parse_cases


def test_attention_variants_name_the_kernel_arguments_and_an_empty_item_is_the_default():
    assert parse_variants(";p=4,w=4;bk=128,s=1,bq=32") == [
        {}, {"parts": 4, "num_warps": 4}, {"block_k": 128, "num_stages": 1, "block_q": 32}]


@pytest.mark.parametrize("text", ["p=four", "x=1", "p", "w=-2"])
def test_attention_variants_refuse_unknown_keys_and_non_integers(text):
    with pytest.raises(ValueError, match="variant entries"):
        parse_variants(text)


def test_hybrid_probe_variants_take_the_key_parts_setting():
    assert parse_variant("kp=4,G=1") == {"kp": 4, "G": 1}
    with pytest.raises(ValueError, match="unknown variant setting"):
        parse_variant("parts=4")


def test_step_fit_cases_read_tokens_and_resume_points():
    assert parse_cases("256:0, 164:8028,100") == [(256, 0), (164, 8028), (100, 0)]


@pytest.mark.parametrize("preset", ["hybrid-tiny", "mamba2-tiny"])
def test_profiler_stable_inputs_keep_every_setting_but_donation_and_leave_the_state_usable(preset):
    import numpy as np

    from sparse_prefix.experiments.profile_prefill import undonated
    from sparse_prefix.models import create

    model, params = create(preset, seed=0)
    stable = undonated(model)
    assert type(stable) is type(model) and stable.config == model.config
    for name in ("step_loop", "min_checkpoint_slots", "backend", "fit_steps", "gemm", "command_buffers"):
        assert getattr(stable, name, None) == getattr(model, name, None)
    state = stable.init_state(1)
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    first, _, _ = stable.prefill(params, tokens, state, np.zeros((1, 0), np.int32))
    again, _, _ = stable.prefill(params, tokens, state, np.zeros((1, 0), np.int32))   # not donated
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    with pytest.raises(TypeError, match="hybrid or mamba2"):
        undonated(object())


def test_engine_hit_requests_share_exactly_the_resume_prefix_with_the_base():
    import numpy as np

    from sparse_prefix.experiments.profile_prefill import engine_hit_requests

    base, hits = engine_hit_requests(64, 24, vocab_size=16, calls=5, seed=3)
    assert base.shape == (64,) and len(hits) == 5
    for i, hit in enumerate(hits):
        np.testing.assert_array_equal(hit[:24], base[:24])
        assert hit[24] != base[24] and all(hit[24] != other[24] for other in hits[i + 1:])
    with pytest.raises(ValueError, match="resume"):
        engine_hit_requests(64, 64, vocab_size=16, calls=2)
    with pytest.raises(ValueError, match="calls"):
        engine_hit_requests(64, 8, vocab_size=4, calls=4)


def test_profiled_engine_hits_resume_at_the_hinted_checkpoint_and_report_their_timings():
    from sparse_prefix.engine import Engine
    from sparse_prefix.experiments.profile_prefill import engine_hit_requests, serve_engine_hits
    from sparse_prefix.models import create

    model, params = create("hybrid-tiny", seed=0)
    base, hits = engine_hit_requests(40, 16, vocab_size=int(model.vocab_size), calls=3)
    engine = Engine(model, params, policy="none+hints", eviction="lru", capacity_entries=6,
                    background_resolve=False)
    started = []
    try:
        timings = serve_engine_hits(engine, base, hits, 16, before=started.append)
    finally:
        engine.close()
    assert started == [0, 1, 2] and len(timings) == 3
    assert all(t["dispatch"] + t["wait"] == pytest.approx(t["prefill"]) for t in timings)
    engine = Engine(model, params, policy="none+hints", eviction="lru", capacity_entries=6,
                    background_resolve=False)
    try:                                                   # answers dropped between calls: same hits
        assert len(serve_engine_hits(engine, base, hits, 16, hold_answers=False)) == 3
    finally:
        engine.close()
