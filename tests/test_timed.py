"""Timed replays through the real Engine (experiments/timed.py), the prefill cost model (costmodel.py),
the resume benchmark and the command line, on mamba2-tiny / hybrid-tiny with a tiny trace.

Only accounting and plumbing are asserted, never speed. Every engine of a model pads tokens to
max_length and checkpoint lists to 8 slots, as test_engine's do, so the prefill compiles once per model.
"""

import json
import lzma
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.engine import Engine
from sparse_prefix.experiments import bench_resume, cli_timed, costmodel, timed
from sparse_prefix.models import create
from sparse_prefix.simulate import replay
from sparse_prefix.traces import Request, protocol_order, save_trace

MODELS = {}
CAPACITY = 4
CASES = {"mamba2-tiny": ("dp:2+fork", "block:16"), "hybrid-tiny": ("block:16+hints",)}


def tiny(name):
    if name not in MODELS:
        MODELS[name] = create(name, seed=0)
    return MODELS[name]


def tiny_trace(seed=0, groups=3, per_group=7, vocab=256):
    """Documents of 40-80 tokens, each followed by 3-30 query tokens; a hint at the document's end."""
    rng = np.random.default_rng(seed)
    requests = []
    for g in range(groups):
        doc = rng.integers(0, vocab, size=int(rng.integers(40, 80)))
        for _ in range(per_group):
            query = rng.integers(0, vocab, size=int(rng.integers(3, 30)))
            requests.append(Request(f"doc-{g}", np.concatenate([doc, query]).astype(np.int32), (doc.size,)))
    return requests


@pytest.fixture(scope="module", params=sorted(CASES))
def timed_run(request):
    name = request.param
    model, params = tiny(name)
    result = timed.timed_replay(tiny_trace(), CASES[name], model=model, params=params, seed=1,
                                capacity=CAPACITY)
    return name, model, result


# ----------------------------------------------------------------------------- the harness


def test_engine_accounting_equals_the_simulators_one_pass_replay(timed_run):
    name, model, result = timed_run
    order = protocol_order(tiny_trace(), seed=1, max_tokens=model.max_length)
    for timing in result.timings:
        simulated = replay(order, timing.policy, warm_fraction=0.6, capacity_entries=CAPACITY, eviction="fifo",
                           grid=model.chunk_size, capture="one-pass",
                           planner_options=timed.planner_options_for(model)).records
        np.testing.assert_array_equal(timing.records["length"], simulated["length"])
        np.testing.assert_array_equal(timing.records["resume_position"], simulated["resume_position"])
        np.testing.assert_array_equal(timing.records["recomputed_tokens"], simulated["recomputed_tokens"])
        np.testing.assert_array_equal(timing.records["checkpoints_stored"], simulated["new_checkpoints"])
        assert timing.simulator_mismatches == 0


def test_no_cache_runs_first_and_every_policy_is_timed_without_compiling(timed_run):
    name, _, result = timed_run
    assert [t.policy for t in result.timings] == ["none", *CASES[name]]
    assert result.skipped == ()
    assert result.n_requests == 21 and result.n_warm == 13
    none = result.timings[0]
    assert not none.records["resume_position"].any() and not none.records["checkpoints_stored"].any()
    for timing in result.timings:
        assert timing.compiles == 0
        assert (timing.records["time_s"] > 0).all()
        assert (timing.records["prefill_s"] <= timing.records["time_s"]).all()
        np.testing.assert_allclose(timing.records["prefill_s"],       # the commit runs between the two
                                   timing.records["dispatch_s"] + timing.records["wait_s"])
    cached = result.timings[1:]
    assert all(t.records["resume_position"].sum() > 0 for t in cached)
    assert any(t.records["checkpoints_stored"].sum() > 0 for t in cached)


def test_table_metrics_follow_from_the_records(timed_run):
    _, model, result = timed_run
    cost = costmodel.CostModel(c0=1e-3, a=1e-6, b=1e-9)
    step = timed.step_tokens_of(model)
    assert step == model.chunk_size * model.chunks_per_step
    rows = timed.summary_rows(result, cost, step)
    baseline = result.timings[0].measured_s
    assert rows[0]["speedup"] == 1.0 and rows[0]["ideal_speedup"] == 1.0 and rows[0]["tokens_saved_pct"] == 0
    for row, timing in zip(rows, result.timings):
        r = timing.records
        lengths, resumes = r["length"], r["resume_position"]
        assert row["speedup"] == pytest.approx(baseline / r["time_s"].sum())
        assert row["tokens_saved_pct"] == pytest.approx(100 * resumes.sum() / lengths.sum())
        assert row["token_ideal_x"] == pytest.approx(lengths.sum() / (lengths - resumes).sum())
        assert row["step_ideal_x"] == pytest.approx(np.ceil(lengths / step).sum()
                                                    / np.ceil((lengths - resumes) / step).sum())
        full = cost.c0 + cost.a * lengths + cost.b * lengths ** 2.0
        resumed = cost.c0 + cost.a * (lengths - resumes) + cost.b * (lengths ** 2.0 - resumes ** 2.0)
        assert row["ideal_speedup"] == pytest.approx(full.sum() / resumed.sum())
        assert row["prefill_pct_of_model"] == pytest.approx(100 * resumed.sum() / r["prefill_s"].sum())
        assert row["host_ms_per_request"] == pytest.approx(1e3 * (r["time_s"] - r["prefill_s"]).mean())
        assert row["pct_of_ideal"] == pytest.approx(100 * row["speedup"] / row["ideal_speedup"])
        assert row["checkpoints_per_request"] == pytest.approx(r["checkpoints_stored"].mean())
        assert row["hit_rate_pct"] == pytest.approx(100 * (r["overlap"] > 0).mean())
    cells = timed.table_cells(rows, {"block:16": 1.5})
    assert all(len(c) == len(timed.TABLE_HEADER) for c in cells)
    none = result.timings[0].records                # the second ideal: fitted to the no-cache run itself
    fit = costmodel.fit_cost(none["length"], none["prefill_s"])
    for row, timing in zip(rows, result.timings):
        r = timing.records
        assert row["ideal_no_cache_fit"] == pytest.approx(fit.ideal_speedup(r["length"], r["resume_position"]))
        assert row["pct_of_no_cache_fit_ideal"] == pytest.approx(100 * row["speedup"] / row["ideal_no_cache_fit"])


def test_no_no_cache_run_means_no_second_ideal():
    records = {name: np.arange(1, 5, dtype=np.float64 if name.endswith("_s") else np.int64)
               for name in timed.RECORD_FIELDS}
    records["resume_position"] = np.zeros(4, np.int64)
    pooled = [timed.PooledPolicy(timed.PolicyTiming("dp:1", records, 0.0, 0.0, 0, 0, 0), None, ())]
    assert timed.no_cache_cost(pooled) is None
    rows = timed.pooled_rows(pooled)
    assert rows[0]["ideal_no_cache_fit"] is None and rows[0]["pct_of_no_cache_fit_ideal"] is None


def test_preparing_an_engine_compiles_every_bucket_and_leaves_the_cache_empty():
    from sparse_prefix.engine import Engine

    model, params = tiny("hybrid-tiny")
    engine = Engine(model, params, policy="block:8", capacity_entries=2, background_resolve=False)
    try:
        timed.prepare_engine(engine, checkpoint_slots=8, max_states=16, max_pages=16)
        arrays, refcount = engine.store.export()
        assert all(not np.any(a) for a in arrays.values()) and not refcount.any()
        assert engine.stats()["entries"] == 0 and engine.stats()["requests"] == 0
        with pytest.raises(ValueError, match="fresh engine"):
            engine.prefill(np.arange(20, dtype=np.int32))
            timed.prepare_engine(engine, checkpoint_slots=8, max_states=16, max_pages=16)
    finally:
        engine.close()


def test_a_spent_budget_skips_policies_and_says_why():
    model, params = tiny("mamba2-tiny")
    result = timed.timed_replay(tiny_trace(), ["block:16"], model=model, params=params, seed=0,
                                capacity=CAPACITY, budget_s=1e-6)
    assert result.timings == () and result.baseline_s() is None
    assert [s["policy"] for s in result.skipped] == ["none", "block:16"]
    assert all(s["reason"].startswith("not started") for s in result.skipped)


def test_rounds_replay_the_policies_in_turn_and_pool_their_speedups():
    model, params = tiny("mamba2-tiny")
    result = timed.timed_replay(tiny_trace(), ["block:16"], model=model, params=params, seed=1,
                                capacity=CAPACITY, rounds=2)
    assert [(t.policy, t.round) for t in result.timings] == [("none", 0), ("block:16", 0), ("none", 1),
                                                               ("block:16", 1)]
    assert result.rounds == 2 and all(t.simulator_mismatches == 0 for t in result.timings)
    none, block = result.timings[0::2], result.timings[1::2]
    np.testing.assert_array_equal(block[0].records["resume_position"], block[1].records["resume_position"])
    rows = timed.summary_rows(result)
    assert [row["policy"] for row in rows] == ["none", "block:16"] and rows[1]["rounds"] == 2
    assert rows[1]["speedup"] == pytest.approx(sum(t.measured_s for t in none) / sum(t.measured_s for t in block))
    assert rows[1]["speedup_per_round"] == pytest.approx([n.measured_s / b.measured_s for n, b in zip(none, block)])
    assert rows[1]["requests"] == 2 * (result.n_requests - result.n_warm)
    assert result.baseline_s() == pytest.approx(sum(t.measured_s for t in none))
    with pytest.raises(ValueError, match="rounds"):
        timed.timed_replay(tiny_trace(), ["block:16"], model=model, params=params, seed=1, capacity=CAPACITY,
                           rounds=0)


def test_a_round_without_its_no_cache_run_gives_no_speedup_and_is_left_out():
    def timing(policy, round_, seconds):
        records = {name: np.full(2, 1 if name == "length" else 0, np.float64 if name.endswith("_s") else np.int64)
                   for name in timed.RECORD_FIELDS}
        records["time_s"] = records["prefill_s"] = np.full(2, seconds / 2)
        return timed.PolicyTiming(policy, records, 0.0, 0.0, 0, 0, round_)

    result = timed.TimedReplay((timing("none", 0, 4.0), timing("dp:1", 0, 2.0), timing("dp:1", 1, 1.0)),
                               ({"policy": "none", "round": 1, "reason": "not started"},), 4, 2, 8, 1.0)
    pooled = timed.pool_rounds(result)
    assert [p.timing.policy for p in pooled] == ["none", "dp:1"]
    assert pooled[1].baseline_s == 4.0 and pooled[1].speedup_per_round == (2.0,)
    assert pooled[1].timing.measured_s == 2.0 and pooled[1].timing.records["round"].tolist() == [0, 0]
    alone = timed.TimedReplay((timing("dp:1", 0, 2.0),), (), 4, 2, 8, 1.0)
    row, = timed.summary_rows(alone)
    assert row["speedup"] is None and row["speedup_per_round"] == [] and row["rounds"] == 1


def test_the_first_policys_setup_does_not_predict_the_next_policys_time():
    assert timed.expected_policy_seconds([], []) == 0.0
    assert timed.expected_policy_seconds([10.0], [300.0]) == 10.0       # its compiles are shared
    assert timed.expected_policy_seconds([10.0, 12.0, 9.0], [300.0, 2.0, 1.0]) == 10.0


def test_a_replay_past_its_deadline_stops_before_the_next_request():
    from sparse_prefix.engine import Engine

    model, params = tiny("mamba2-tiny")
    engine = Engine(model, params, policy="none", capacity_entries=CAPACITY, background_resolve=False)
    try:
        with pytest.raises(timed._OutOfBudget, match="after 0 of 3"):
            timed.replay_engine(engine, tiny_trace()[:3], 1, deadline=time.perf_counter() - 1)
        assert engine.stats()["requests"] == 0
    finally:
        engine.close()


def test_bad_input_is_refused_with_the_argument_named():
    model, params = tiny("mamba2-tiny")
    big = [Request("g", np.asarray([1, 600, 2], np.int32))] * 3
    with pytest.raises(ValueError, match="token id 600.*fold-vocab"):
        timed.timed_replay(big, ["none"], model=model, params=params, seed=0, capacity=2)
    with pytest.raises(ValueError, match="policy|spec"):
        timed.timed_replay(tiny_trace(), ["dp:x"], model=model, params=params, seed=0, capacity=2)
    with pytest.raises(ValueError, match="budget_s"):
        timed.timed_replay(tiny_trace(), ["none"], model=model, params=params, seed=0, capacity=2, budget_s=-1)


def test_fold_vocab_keeps_groups_hints_and_shared_prefixes():
    requests = [Request("a", np.asarray([5, 700, 1030], np.int32), (2,)), Request("b", np.asarray([1024], np.int32))]
    folded = timed.fold_vocab(requests, 512)
    assert [r.tokens.tolist() for r in folded] == [[5, 188, 6], [0]]
    assert [(r.group, r.hints) for r in folded] == [("a", (2,)), ("b", ())]


def test_every_policy_of_a_replay_allocates_the_layout_of_the_policy_storing_the_most():
    model, _ = tiny("hybrid-tiny")
    plan = timed.plan_replay(tiny_trace(), ["dp:2", "block:16+hints"], model=model, seed=1, capacity=CAPACITY)
    layouts = {p: Engine.abstract(model, policy=p, capacity_entries=CAPACITY) for p in plan.policies}
    assert plan.layout == layouts["block:16+hints"]
    assert all(plan.layout.num_slots >= layout.num_slots and plan.layout.num_pages == layout.num_pages
               for layout in layouts.values())


def test_store_buckets_cover_every_row_count_up_to_the_capacity():
    assert timed.move_buckets(0, 100) == []
    assert timed.move_buckets(9, 100) == [8, 16]
    assert timed.move_buckets(40, 20) == [8, 16, 20]
    assert timed.pow2_at_least(9, 8) == 16 and timed.pow2_at_least(0, 8) == 8


# ----------------------------------------------------------------------------- the cost model


def test_cost_fit_recovers_known_coefficients():
    lengths = np.asarray([256, 1024, 3072, 6144, 10240, 16384])
    for c0, a, b in ((2e-3, 3e-6, 4e-11), (5e-4, 1e-5, 0.0), (1e-2, 0.0, 2e-10)):
        fit = costmodel.fit_cost(lengths, c0 + a * lengths + b * lengths ** 2.0)
        assert fit.c0 == pytest.approx(c0, rel=1e-6, abs=1e-12)
        assert fit.a == pytest.approx(a, rel=1e-6, abs=1e-15)
        assert fit.b == pytest.approx(b, rel=1e-6, abs=1e-18)


def test_cost_fit_never_returns_a_negative_term():
    lengths = np.asarray([100, 200, 400, 800, 1600])
    concave = 1e-3 + 1e-5 * lengths - 4e-9 * lengths ** 2.0          # would fit b < 0
    fit = costmodel.fit_cost(lengths, concave, relative=False)
    assert fit.b == 0.0 and fit.a > 0 and fit.c0 > 0
    line = np.polyfit(lengths, concave, 1)
    assert (fit.a, fit.c0) == pytest.approx(tuple(line), rel=1e-6)
    falling = 1e-2 - 1e-6 * lengths + 1e-8 * lengths ** 2.0         # would fit a < 0
    fit = costmodel.fit_cost(lengths, falling)
    assert min(fit.c0, fit.a, fit.b) >= 0


def test_a_resume_saves_a_r_plus_b_r2_but_never_the_fixed_cost():
    cost = costmodel.CostModel(c0=1e-3, a=2e-6, b=3e-10)
    assert cost.resume(8192, 4096) == pytest.approx(cost.full(8192) - (2e-6 * 4096 + 3e-10 * 4096 ** 2))
    assert cost.resume(8192, 0) == cost.full(8192)
    assert cost.ideal_speedup([100, 200], [0, 0]) == 1.0
    # attention keeps (1 - 0.81) of its cost at 90% overlap where tokens keep 10%: below the token ideal
    attention_only = costmodel.CostModel(c0=0.0, a=0.0, b=1.0)
    assert attention_only.ideal_speedup([1000], [900]) == pytest.approx(1 / 0.19)
    assert costmodel.token_ideal([1000], [900]) == pytest.approx(10.0)


def test_step_bound_counts_whole_prefill_steps():
    # 1 + 2 + 3 steps without a cache; 1 + 1 + 1 with: a resume inside a step saves nothing of it
    assert costmodel.step_ideal([1000, 2048, 3000], [0, 1024, 2900], 1024) == pytest.approx(2.0)
    assert costmodel.step_ideal([1000], [999], 1024) == 1.0
    assert costmodel.step_ideal([1000, 300], [900, 0], 1) == costmodel.token_ideal([1000, 300], [900, 0])


def test_equal_steps_and_a_fixed_cost_never_beat_the_step_bound():
    """A call charged per whole step (every step alike) plus a fixed cost per call: the speedup is
    at most the step bound, and reaches it when the fixed cost is zero."""
    rng = np.random.default_rng(0)
    step = 64
    for fixed in (0.0, 0.1, 3.0):
        lengths = rng.integers(1, 1000, 40)
        resumes = (rng.random(40) * lengths).astype(np.int64)
        call = lambda start, stop: fixed + -(-(stop - start) // step) * 1.7   # noqa: E731
        speedup = (sum(call(0, n) for n in lengths)
                   / sum(call(r, n) for n, r in zip(lengths, resumes)))
        bound = costmodel.step_ideal(lengths, resumes, step)
        assert speedup <= bound * (1 + 1e-12)
        assert (speedup == pytest.approx(bound)) == (fixed == 0.0)


def test_step_bound_refuses_bad_input():
    with pytest.raises(ValueError, match="step must be a positive int"):
        costmodel.step_ideal([10], [0], 0)
    with pytest.raises(ValueError, match="step must be a positive int"):
        costmodel.step_ideal([10], [0], True)
    with pytest.raises(ValueError, match="0 <= r < L"):
        costmodel.step_ideal([10], [10], 4)
    with pytest.raises(ValueError, match="equal size"):
        costmodel.step_ideal([10, 12], [0], 4)


def test_cost_model_refuses_bad_input():
    with pytest.raises(ValueError, match="CostModel.b"):
        costmodel.CostModel(c0=0.0, a=1.0, b=-1.0)
    with pytest.raises(ValueError, match="3 distinct"):
        costmodel.fit_cost([1, 1, 2], [1.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="times"):
        costmodel.fit_cost([1, 2, 3], [1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="0 <= r < L"):
        costmodel.CostModel(c0=0.0, a=1.0, b=0.0).resume(10, 10)
    with pytest.raises(ValueError, match="lengths"):
        costmodel.calibrate(*tiny("mamba2-tiny"), [1, 2, 10 ** 6])


def test_default_lengths_are_on_the_chunk_grid_up_to_max_length():
    lengths = costmodel.default_lengths(16384, 256)
    assert lengths[0] == 256 and lengths[-1] == 16384 and len(lengths) == 6
    assert all(n % 256 == 0 for n in lengths) and lengths == sorted(set(lengths))


def test_calibrate_times_the_engines_program_and_fits_it():
    model, params = tiny("mamba2-tiny")
    engine = Engine(model, params, policy="none", capacity_entries=CAPACITY, background_resolve=False,
                    min_checkpoint_slots=8, fuse_restore=False)
    engine.warmup((1,))                           # (free after the replays above compiled it)
    engine.close()
    before = model.compile_count
    calibration = costmodel.calibrate(model, params, [16, 32, 64], repeats=2, checkpoint_slots=8)
    assert calibration.lengths == (16, 32, 64) and calibration.width == model.max_length
    assert all(len(s) == 2 and min(s) > 0 for s in calibration.samples)
    assert min(calibration.cost.as_dict().values()) >= 0
    assert model.compile_count == before          # the engine's own program, compiled once
    assert json.dumps(calibration.as_dict())


# ----------------------------------------------------------------------------- resume bench, CLI, imports


def test_resume_bench_resumes_at_the_snapped_overlap():
    assert bench_resume.resume_position(8192, 0.98, 256) == 7936
    with pytest.raises(ValueError, match="overlap"):
        bench_resume.resume_position(64, 1.0, 8)
    result = bench_resume.bench_preset("hybrid-tiny", 64, [0.5], 1, jnp.bfloat16,
                                       calibration_lengths=[16, 32, 64])   # tiny()'s dtype
    (row,) = result["rows"]
    assert row["resume"] == 32 and row["direct_s"] > 0 and row["hit_s"] > 0
    assert row["token_ideal"] == 2.0 and row["ideal_speedup"] >= 1.0
    assert result["calibration"]["lengths"] == [16, 32, 64]
    assert set(row["engine_timings_s"]) == {"plan", "restore", "prefill", "commit", "total"}


def test_cli_writes_the_table_and_json_of_two_rounds_from_a_compressed_trace(tmp_path, capsys):
    from sparse_prefix.cli import main

    trace = tmp_path / "trace.jsonl"
    save_trace(trace, tiny_trace())
    packed = tmp_path / "trace.jsonl.xz"
    packed.write_bytes(lzma.compress(trace.read_bytes()))
    out = tmp_path / "out"
    code = main(["reproduce", "--timed", "--dataset", "quality", "--trace", str(packed), "--preset", "mamba2-tiny",
                 "--policies", "block:16", "--sample-groups", "2", "--seed", "2", "--capacity", "4",
                 "--calibrate-lengths", "16,32,64", "--calibrate-repeats", "1", "--rounds", "2",
                 "--command-buffers", "on", "--out", str(out)])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["command_buffers"] == "on" and payload["config"]["step_tokens"] == 16
    assert set(payload["no_cache_fit"]) == {"c0", "a", "b"}
    assert [p["policy"] for p in payload["policies"]] == ["none", "block:16"]
    assert payload["n_requests"] == 14 and payload["n_warm"] == 8        # 2 of 3 groups drawn
    assert payload["config"]["rounds"] == 2 and payload["policies"][1]["rounds"] == 2
    assert payload["policies"][1]["records"]["round"] == [0] * 6 + [1] * 6
    assert len(payload["policies"][1]["speedup_per_round"]) == 2
    assert payload["calibration"]["lengths"] == [16, 32, 64]
    assert payload["policies"][1]["simulator_mismatches"] == 0
    assert [p["compiles_during_measurement"] for p in payload["policies"]] == [0, 0]
    assert payload["calibration"]["checkpoint_slots"] == payload["checkpoint_slots"]   # the engines' program
    table = (out / "table.md").read_text()
    assert "block:16 speedup per round" in table and "2 rounds pooled" in table
    assert "ideal speedup" in capsys.readouterr().out


def test_cli_refuses_ids_outside_the_vocabulary_before_timing(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [Request("g", np.asarray([1, 600], np.int32))] * 2)
    code = cli_timed.main(["--dataset", "quality", "--trace", str(trace), "--preset", "mamba2-tiny",
                           "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--fold-vocab" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_hybrid_only_settings_on_another_family(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    save_trace(trace, [Request("g", np.asarray([1, 2], np.int32))] * 2)
    code = cli_timed.main(["--dataset", "quality", "--trace", str(trace), "--preset", "mamba2-tiny",
                           "--fit-steps", "off", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "--fit-steps applies to hybrid presets" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_timed_path_imports_without_orbax_or_hypothesis():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('orbax', 'hypothesis', 'matplotlib', 'torch'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import sparse_prefix.experiments.timed, sparse_prefix.experiments.cli_timed\n"
            "import sparse_prefix.experiments.bench_resume, sparse_prefix.engine, sparse_prefix.models\n"
            "import sparse_prefix.experiments.reproduce_report, sparse_prefix.experiments.paper\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
