"""The trace simulator: hand-computed totals on a tiny trace, sweeps, and result files."""

import csv
import functools
import json

import numpy as np
import pytest

from sparse_prefix.simulate import METRICS, replay, sweep, write_csv, write_json
from sparse_prefix.traces import Request, protocol_order
from sparse_prefix.workloads import documents

A = list(range(1, 11))  # group A's document: tokens 1..10


def tiny_trace():
    """Five requests, two groups (identical tokens in different groups never match).

    r0 A [1..10]              miss; block:4 stores 4, 8
    r1 B [1..6]               miss (other group); stores 4
    r2 A [1..7, 99, 100]      LCP(r0) = 7 -> resume 4 from r0; stores 4, 8
    r3 B [1..8]               LCP(r1) = 6 -> resume 4 from r1; stores 4, 8
    r4 A [1..10, 50, 51]      LCP(r0) = 10 -> resume 8 from r0 (LCP(r2) = 7 only reaches 4); stores 4, 8, 12
    """
    return [
        Request("A", A),
        Request("B", A[:6]),
        Request("A", A[:7] + [99, 100]),
        Request("B", A[:8]),
        Request("A", A + [50, 51]),
    ]


def test_hand_computed_totals_separate_capture():
    result = replay(tiny_trace(), "block:4", warm_fraction=0.4, capacity_entries=10, capture="separate")
    assert result.n_warm == 2
    records = result.records
    assert records["length"].tolist() == [9, 8, 12]
    assert records["overlap"].tolist() == [7, 6, 10]
    assert records["resume_position"].tolist() == [4, 4, 8]
    assert records["recomputed_tokens"].tolist() == [5, 4, 4]
    assert records["new_checkpoints"].tolist() == [2, 2, 3]
    assert records["resident_checkpoints"].tolist() == [5, 7, 10]
    assert result.tokens_saved_pct == pytest.approx(100 * 16 / 29)
    assert result.savings_x == pytest.approx(29 / 13)
    assert result.hit_rate_pct == 100.0
    assert result.checkpoints_per_request == pytest.approx(7 / 3)
    assert result.resident_checkpoints == pytest.approx(22 / 3)
    assert result.state_bytes_per_request is None


def test_fifo_eviction_changes_the_resume_point():
    # Capacity 2: r0 is evicted when r2 commits, r1 when r3 commits; r4 then only shares 7 tokens
    # with r2, whose deepest usable checkpoint is 4.
    result = replay(tiny_trace(), "block:4", warm_fraction=0.4, capacity_entries=2, capture="separate")
    assert result.records["overlap"].tolist() == [7, 6, 7]
    assert result.records["resume_position"].tolist() == [4, 4, 4]
    assert result.records["resident_checkpoints"].tolist() == [3, 4, 5]
    assert result.tokens_saved_pct == pytest.approx(100 * 12 / 29)


def test_one_pass_capture_inherits_instead_of_storing_again():
    # r2 inherits r0's state at 4 and stores only 8; r3 inherits r1's 4, stores 8; r4 inherits r0's
    # 4 and 8 and stores 12.
    result = replay(tiny_trace(), "block:4", warm_fraction=0.4, capacity_entries=10, capture="one-pass",
                    bytes_per_checkpoint=1000)
    assert result.records["new_checkpoints"].tolist() == [1, 1, 1]
    assert result.records["resident_checkpoints"].tolist() == [4, 5, 6]
    assert result.records["resume_position"].tolist() == [4, 4, 8]
    assert result.state_bytes_per_request == pytest.approx(1000.0)


def test_grid_snaps_positions_down():
    # grid 3: block:4's 4, 8 snap to 3, 6 (r0 keeps 3, 6; r1 keeps 3); r2 (LCP 7) resumes at 6 from
    # r0, r3 (LCP 6 with r1) at 3, r4 (LCP 10 with r0) at 6.
    result = replay(tiny_trace(), "block:4", warm_fraction=0.4, capacity_entries=10, grid=3)
    assert result.records["resume_position"].tolist() == [6, 3, 6]


def test_no_checkpoints_saves_nothing_but_still_hits():
    result = replay(tiny_trace(), "none", warm_fraction=0.4)
    assert result.tokens_saved_pct == 0.0 and result.savings_x == 1.0
    assert result.hit_rate_pct == 100.0 and result.checkpoints_per_request == 0.0


@pytest.mark.parametrize(
    "kwargs, error",
    [({"warm_fraction": 1.0}, ValueError), ({"warm_fraction": 0.99}, ValueError),
     ({"bytes_per_checkpoint": -1}, ValueError), ({"capacity_entries": 0}, ValueError)],
)
def test_replay_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        replay(tiny_trace(), "block:4", **kwargs)


def test_replay_rejects_bad_policy_and_empty_trace():
    with pytest.raises(ValueError):
        replay(tiny_trace(), "block:")
    with pytest.raises(ValueError):
        replay([], "none")


# --- sweeps ---------------------------------------------------------------------------------------

SMALL = functools.partial(documents, scale=0.06)  # 3 documents, ~45 requests


@pytest.fixture(scope="module")
def small_sweep():
    return sweep(SMALL, ["block:2048", "block:1024", "none"], seeds=[0, 1], capacity_entries=4)


def test_sweep_equals_replays_of_each_seeds_protocol_order(small_sweep):
    for position, seed in enumerate([0, 1]):
        ordered = protocol_order(SMALL(seed), seed=seed)
        direct = replay(ordered, "block:1024", capacity_entries=4)
        for metric in ("tokens_saved_pct", "checkpoints_per_request", "hit_rate_pct"):
            assert small_sweep[1].per_seed[metric][position] == pytest.approx(direct.metrics[metric])


def test_sweep_summaries_mean_and_sample_sd(small_sweep):
    block = small_sweep[1]
    assert block.policy == "block:1024" and block.seeds == (0, 1)
    values = np.asarray(block.per_seed["tokens_saved_pct"])
    assert block.mean["tokens_saved_pct"] == pytest.approx(values.mean())
    assert block.sd["tokens_saved_pct"] == pytest.approx(values.std(ddof=1))
    assert "state_bytes_per_request" not in block.mean
    assert small_sweep[1].mean["tokens_saved_pct"] > small_sweep[0].mean["tokens_saved_pct"] > 0


def test_sweep_validates_policies_and_seeds_before_running():
    with pytest.raises(ValueError):
        sweep(SMALL, ["dp:x"], seeds=1)
    with pytest.raises(ValueError):
        sweep(SMALL, ["none"], seeds=0)
    with pytest.raises(ValueError):
        sweep(SMALL, ["none"], seeds=[1, 1])


def test_sweep_in_two_processes_matches_one():
    trace = SMALL(3)
    one = sweep(trace, ["block:512"], seeds=2, capacity_entries=4)
    two = sweep(trace, ["block:512"], seeds=2, capacity_entries=4, workers=2)
    assert one == two


def test_result_files(tmp_path, small_sweep):
    write_json(tmp_path / "r.json", small_sweep, {"workload": "documents"})
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["config"] == {"workload": "documents"}
    assert [p["policy"] for p in payload["policies"]] == ["block:2048", "block:1024", "none"]
    assert payload["policies"][1]["mean"] == small_sweep[1].mean
    write_csv(tmp_path / "r.csv", small_sweep)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 3 and rows[2]["policy"] == "none"
    assert float(rows[1]["tokens_saved_pct_mean"]) == pytest.approx(small_sweep[1].mean["tokens_saved_pct"])
    assert set(METRICS) - {"state_bytes_per_request"} <= {k[: -len("_mean")] for k in rows[0] if k.endswith("_mean")}
