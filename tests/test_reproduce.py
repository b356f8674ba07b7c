"""The reproduction: policy runs, acceptance checks, the replay protocol on real data, the command."""

from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest

from sparse_prefix.experiments import anchored, paper, reproduce
from sparse_prefix.experiments.reproduce import PolicyRun
from sparse_prefix.paths import shared_dir
from sparse_prefix.simulate import PolicySummary
from sparse_prefix.traces import Request, protocol_order, split_warm

try:
    shared_dir()
    HAVE_SHARED = True
except FileNotFoundError:
    HAVE_SHARED = False
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason="../shared (the real data) is absent")


def _summary(policy: str, checkpoints: float, saved: float) -> PolicySummary:
    mean = {"checkpoints_per_request": checkpoints, "tokens_saved_pct": saved}
    return PolicySummary(policy, (0,), mean, {k: 0.0 for k in mean}, {k: (v,) for k, v in mean.items()})


# ------------------------------------------------------------------------------------------ runs


def test_default_runs_cover_the_papers_grid_ours_and_the_peers_with_unique_labels():
    runs = reproduce.default_runs("hybrid:1,1e-05")
    labels = [run.label for run in runs]
    assert len(set(labels)) == len(labels)
    paper_specs = {run.spec for run in runs if run.origin == "paper"}
    assert paper_specs == set(paper.paper_policies())
    by_label = {run.label: run for run in runs}
    assert by_label["vLLM all"].spec == "block:528"
    assert by_label["Marconi"].eviction == "utility" and by_label["Marconi"].spec == "end+fork"
    assert by_label["dp:3 bins=1"].planner_options == (("bin_size", 1),)
    assert by_label["dp:3 grid=64"].grid == 64
    assert by_label["dp:3 cost=hybrid"].planner_options == (("cost", "hybrid:1,1e-05"),)


def test_every_published_point_names_a_replayed_paper_policy():
    labels = {run.label for run in reproduce.paper_runs()}
    for run in paper.PAPER_RUNS.values():
        assert {p.policy for p in run.points} <= labels


def test_runs_from_names_mixes_sets_labels_and_specs_and_rejects_bad_specs():
    runs = reproduce.runs_from_names(["peers", "dp:8 grid=64", "ldp:4+hints"])
    assert [r.label for r in runs] == ["vLLM all", "SGLang", "Marconi", "dp:8 grid=64", "ldp:4+hints"]
    with pytest.raises(ValueError, match="policy spec"):
        reproduce.runs_from_names(["dp:x"])


def test_checkpoint_bytes_are_three_gdn_states_and_conv_windows():
    state = 3 * 16 * 128 * 128 * 4             # float32 [H, Dk, Dv] per GDN layer
    conv = 3 * 3 * (2 * 16 * 128 + 16 * 128) * 2  # W-1 = 3 rows of q, k, v channels in fp16
    assert reproduce.checkpoint_bytes() == state + conv


def test_hybrid_cost_is_attention_flops_over_twice_the_linear_flops():
    a, b = (float(v) for v in reproduce.hybrid_cost_spec().removeprefix("hybrid:").split(","))
    assert a == 1.0
    attention = 4 * 8 * 256                      # one attention layer: 8 heads x 256, QK and PV
    mlp = 4 * 3 * 1024 * 3584                    # four SwiGLU blocks
    gdn = 3 * (1024 * 3 * 2048 + 1024 * 2048 + 2 * 1024 * 16 + 4 * 6144 + 2048 * 1024)  # qkv, z, a/b, conv, out
    gated_attention = 1024 * 2 * 2048 + 2 * 1024 * 512 + 2048 * 1024                 # q + gate, k, v, out
    linear = 2 * (mlp + gdn + gated_attention) + 3 * 4 * 16 * 128 * 128              # + GDN state update/read
    assert math.isclose(b, attention / (2 * linear), rel_tol=0.01)


def test_tasks_group_equal_settings_in_small_chunks_and_reduce_one_pass():
    runs = reproduce.default_runs("hybrid:1,1e-05")
    tasks = reproduce._tasks(runs, reproduce.CAPTURES, True, {"seeds": 2})
    for capture, members, kwargs in tasks:
        assert 1 <= len(members) <= reproduce.TASK_SIZE
        assert len({run.settings for run in members}) == 1 and kwargs["capture"] == capture
        assert kwargs["grid"] == members[0].grid and kwargs["eviction"] == members[0].eviction
    separate = [run.label for c, members, _ in tasks if c == "separate" for run in members]
    one_pass = [run.label for c, members, _ in tasks if c == "one-pass" for run in members]
    assert sorted(separate) == sorted(run.label for run in runs)
    assert sorted(one_pass) == sorted(run.label for run in reproduce.one_pass_runs(runs))
    assert "balanced:1" not in one_pass and "dp:1" in one_pass and "Marconi" in one_pass


# ------------------------------------------------------------------------------------ acceptance


def test_frontier_is_a_staircase_over_points_with_no_more_checkpoints():
    points = [(1.0, 30.0), (3.0, 40.0), (2.0, 35.0)]
    assert reproduce.frontier_at(points, 0.5) is None
    assert reproduce.frontier_at(points, 1.0) == 30.0
    assert reproduce.frontier_at(points, 2.9) == 35.0
    assert reproduce.frontier_at(points, 100.0) == 40.0


def _acceptance(values: dict[str, tuple[float, float]]):
    runs = [run for run in reproduce.default_runs() if run.label in values]
    summaries = {label: _summary(label, *point) for label, point in values.items()}
    return reproduce.acceptance(summaries, runs)


def test_acceptance_passes_when_dp_and_ldp_dominate_and_fails_when_a_baseline_wins():
    values = {"dp:1": (1.0, 30.0), "dp:3": (3.0, 40.0), "balanced:1": (1.0, 25.0), "log": (3.5, 39.0),
              "block:64": (100.0, 40.5), "block:1024": (5.0, 39.0), "ldp:1": (1.0, 32.0), "ldp:8": (4.0, 40.5),
              "none+fork+hints": (1.5, 40.0)}
    checks = _acceptance(values)
    assert all(checks[name]["passed"] for name in ("dp_dominates_heuristics", "dp_near_ceiling",
                                                   "ldp_dominates_block", "hints_fork_near_ceiling"))
    assert checks["dp_dominates_heuristics"]["margins"]["log"] == pytest.approx(1.0)
    worse = _acceptance(values | {"log": (3.5, 41.0), "none+fork+hints": (2.5, 40.5), "ldp:8": (4.0, 38.0)})
    assert not worse["dp_dominates_heuristics"]["passed"]
    assert not worse["hints_fork_near_ceiling"]["passed"]
    assert worse["ldp_dominates_block"]["margins"]["block:1024"] == pytest.approx(-1.0)


def test_ldp_frontier_counts_fill_runs_but_not_fork_or_hints_runs():
    values = {"block:64": (100.0, 40.5), "block:1024": (5.0, 39.0), "ldp:8": (4.0, 40.0),
              "ldp:30+fill": (30.0, 40.5), "ldp:3+fork+hints": (4.0, 45.0)}
    checks = _acceptance(values)
    assert checks["ldp_dominates_block"]["passed"]
    assert checks["ldp_dominates_block"]["margins"] == {"block:64": pytest.approx(0.0),
                                                        "block:1024": pytest.approx(1.0)}
    without_fill = _acceptance({k: v for k, v in values.items() if k != "ldp:30+fill"})
    assert without_fill["ldp_dominates_block"]["margins"]["block:64"] == pytest.approx(-0.5)
    assert [r.label for r in reproduce.our_runs() if r.family == "ldp+fill"] == [
        f"ldp:{m}+fill" for m in reproduce.PAPER_DP_BUDGETS]


def test_acceptance_fails_when_no_dp_point_has_so_few_checkpoints():
    checks = _acceptance({"dp:1": (1.2, 30.0), "balanced:1": (1.0, 20.0)})
    assert not checks["dp_dominates_heuristics"]["passed"]
    assert checks["dp_dominates_heuristics"]["margins"]["balanced:1"] is None


def test_subset_groups_draws_whole_groups_per_seed():
    requests = [Request(f"g{i % 6}", np.arange(1, 4 + i)) for i in range(24)]
    first = reproduce.subset_groups(requests, 2, seed=0)
    assert len({r.group for r in first}) == 2 and len(first) == 8
    assert first == reproduce.subset_groups(requests, 2, seed=0)
    assert reproduce.subset_groups(requests, 10, seed=0) == requests
    draws = {frozenset(r.group for r in reproduce.subset_groups(requests, 2, seed=s)) for s in range(6)}
    assert len(draws) > 1


# ----------------------------------------------------------------------------- real data protocol


@pytest.fixture(scope="module")
def quality_slice(tmp_path_factory):
    from sparse_prefix.experiments.requests import load_requests

    return load_requests("quality", groups=5, cache_dir=tmp_path_factory.mktemp("cache"))


@needs_shared
def test_protocol_keeps_order_within_groups_and_splits_sixty_forty(quality_slice):
    order = protocol_order(quality_slice, seed=3, limit=50)
    assert len(order) == 50
    position = {id(r): i for i, r in enumerate(quality_slice)}
    by_group = collections.defaultdict(list)
    for request in order:
        by_group[request.group].append(position[id(request)])
    assert all(indices == sorted(indices) for indices in by_group.values())
    warm, measured = split_warm(order)
    assert (len(warm), len(measured)) == (30, 20)


@needs_shared
def test_replay_resumes_at_most_at_the_second_to_last_token(quality_slice):
    from sparse_prefix.simulate import replay

    order = protocol_order(quality_slice, seed=0)
    result = replay(order, "block:64", capacity_entries=20)
    records = result.records
    assert np.all(records["resume_position"] <= records["length"] - 1)
    assert np.all(records["resume_position"] <= records["overlap"])
    assert records["hit"].mean() > 0.5  # a few articles, many questions each


@needs_shared
def test_reproduce_command_writes_tables_plots_and_json(tmp_path):
    from sparse_prefix.cli import main

    out = tmp_path / "out"
    status = main(["reproduce", "--dataset", "quality", "--file-groups", "3", "--seeds", "2", "--limit", "36",
                   "--workers", "1", "--quiet", "--out", str(out), "--policies", "dp:1", "block:64",
                   "block:4096", "balanced:1", "ldp:1", "none+fork+hints", "vLLM all", "Marconi"])
    assert status == 0
    payload = json.loads((out / "results.json").read_text())
    assert set(payload["results"]) == {"separate", "one-pass"}
    separate = {row["label"]: row for row in payload["results"]["separate"]}
    assert separate["Marconi"]["eviction"] == "utility" and separate["dp:1"]["seeds"] == [0, 1]
    assert separate["block:64"]["mean"]["checkpoints_per_request"] > 20
    assert set(payload["acceptance"]["separate"]) >= {"dp_dominates_heuristics", "hints_fork_near_ceiling"}
    assert [r["policy"] for r in payload["paper_comparison"]] == ["dp:1", "balanced:1", "block:4096", "block:64"]
    assert payload["stats"]["replayed_requests"] == 36
    table = (out / "table.md").read_text()
    assert "| dp:1 | paper |" in table and "0.78" in table  # the paper's dp:1 checkpoints beside ours
    for png in ("pareto.png", "pareto-one-pass.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


@needs_shared
def test_reproduce_command_rejects_a_bad_count(capsys):
    from sparse_prefix.cli import main

    assert main(["reproduce", "--dataset", "quality", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- end-anchored dp


def _observe_suffixes(planner, suffixes, length=1000):
    for suffix in suffixes:
        planner.observe(length - suffix, length)


def test_anchored_planner_places_balanced_until_its_first_solve():
    planner = anchored.AnchoredPlanner(2, max_suffix=512, resolve_every=4)
    _observe_suffixes(planner, [100] * 3)
    assert planner.suffix_distances() is None
    assert planner.positions(300).tolist() == [100, 200]


def test_anchored_planner_covers_the_longer_suffix_when_that_saves_more():
    # Requests of 1000 tokens; 3/4 of hits share all but their last 10 tokens, 1/4 all but 80. One
    # checkpoint at L-10 saves 990 on 3/4 and nothing on 1/4 (742 expected); at L-80 it saves 920 on
    # all of them: u = 80 wins. On 50-token requests L - 80 < 1: nothing to place.
    planner = anchored.AnchoredPlanner(1, max_suffix=512, bin_size=1, resolve_every=4)
    _observe_suffixes(planner, [10, 10, 80, 10])
    assert planner.suffix_distances().tolist() == [80]
    assert planner.positions(1000).tolist() == [920]
    assert planner.positions(50).tolist() == []
    two = anchored.AnchoredPlanner(2, max_suffix=512, bin_size=1, resolve_every=4, grid=64)
    _observe_suffixes(two, [10, 10, 80, 10])
    assert two.positions(1000).tolist() == [896, 960]  # 920 and 990 snapped down to the grid


def test_anchored_planner_rounds_suffix_distances_up_to_its_bins():
    planner = anchored.AnchoredPlanner(1, max_suffix=512, bin_size=16, resolve_every=2)
    _observe_suffixes(planner, [50, 50])
    assert planner.suffix_distances().tolist() == [64]  # 50 rounds up to the next multiple of 16
    assert planner.positions(1000).tolist() == [936]


def test_anchored_planner_ignores_misses_and_rejects_bad_input():
    planner = anchored.AnchoredPlanner(1, max_suffix=512, resolve_every=1)
    planner.observe(0, 5000)
    assert planner.suffix_distances() is None
    with pytest.raises(ValueError, match="overlap"):
        planner.observe(6000, 5000)
    for spec in ("adp:0", "adp:x", "dp:3"):
        with pytest.raises(ValueError, match="spec|M"):
            anchored.parse_anchored(spec)


def _shared_prefix_trace(groups=6, per_group=8, prefix=700, seed=0):
    rng = np.random.default_rng(seed)
    requests = []
    for g in range(groups):
        shared = rng.integers(0, 1000, prefix + 60 * g)
        for _ in range(per_group):
            tail = rng.integers(0, 1000, int(rng.integers(20, 200)))
            requests.append(Request(f"g{g}", np.concatenate([shared, tail]), (shared.size,)))
    return requests


def test_replay_with_matches_the_simulator_for_a_spec_built_planner():
    from sparse_prefix.planner import Planner
    from sparse_prefix.simulate import replay

    order = protocol_order(_shared_prefix_trace(), seed=1)
    for spec in ("block:128+fork", "none+hints"):
        expected = replay(order, spec, capacity_entries=10).metrics
        ours = anchored.replay_with(order, Planner(spec, max_length=16384), capacity_entries=10)
        assert ours == dict(expected)


def test_anchored_sweep_summarises_seeds_like_the_simulator():
    summaries = anchored.sweep_anchored(_shared_prefix_trace(), ["adp:1"], seeds=2, capacity_entries=10,
                                        planner_options={"max_suffix": 512, "resolve_every": 2})
    # prefixes of 700-1000 tokens, tails of 20-200: one checkpoint near L - 200 serves most hits
    (summary,) = summaries
    assert summary.policy == "adp:1" and summary.seeds == (0, 1)
    assert summary.mean["hit_rate_pct"] > 50 and summary.mean["tokens_saved_pct"] > 50
    assert summary.mean["checkpoints_per_request"] <= 1.0
