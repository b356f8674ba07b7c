"""The ``sparse-prefix`` CLI end to end: simulate and place, outputs, and one-line errors on bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest

from sparse_prefix import cli
from sparse_prefix.traces import save_trace
from sparse_prefix.workloads import documents


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "docs.jsonl"
    save_trace(path, documents(0, scale=0.06))
    return path


def test_simulate_workload_writes_table_json_csv_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["simulate", "--workload", "documents", "--scale", "0.06", "--seeds", "2", "--policy",
                     "block:1024", "dp:2", "none", "--capacity", "4", "--out", str(out), "--workers", "1",
                     "--quiet", "--bytes-per-checkpoint", "1048576"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "results.csv", "results.json"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((out / "results.json").read_text())
    assert [p["policy"] for p in payload["policies"]] == ["block:1024", "dp:2", "none"]
    assert payload["config"]["capacity_entries"] == 4 and payload["config"]["seeds"] == 2
    block = payload["policies"][0]["mean"]
    assert block["state_bytes_per_request"] == pytest.approx(block["checkpoints_per_request"] * 2**20)
    printed = capsys.readouterr().out
    assert "tokens saved %" in printed and "dp:2" in printed and "results.json" in printed


def test_simulate_trace_file(tmp_path, trace_file):
    out = tmp_path / "out"
    assert cli.main(["simulate", "--trace", str(trace_file), "--seeds", "1", "--policy", "block:2048",
                     "--out", str(out), "--quiet", "--workers", "1"]) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["source"] == "docs" and payload["policies"][0]["mean"]["tokens_saved_pct"] > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--workload", "nope"], "unknown family 'nope'"),
        (["simulate", "--workload", "documents", "--policy", "dp:x"], "dp:x"),
        (["simulate", "--workload", "documents", "--seeds", "0"], "--seeds: must be >= 1"),
        (["simulate", "--workload", "documents", "--scale", "-1"], "--scale"),
        (["simulate", "--trace", "/nonexistent/trace.jsonl"], "does not exist"),
        (["place", "--pmf", "/nonexistent/pmf.json", "--budget", "2"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_malformed_trace_line_is_reported_with_its_number(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"group": "a", "tokens": [1, 2]}\n{"group": "a", "tokens": [1, -2]}\n')
    assert cli.main(["simulate", "--trace", str(path), "--seeds", "1"]) == 2
    assert "line 2" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        cli.main(["simulate"])  # neither --workload nor --trace
    assert info.value.code == 2


def test_console_entry_point_prints_no_traceback():
    run = subprocess.run([sys.executable, "-m", "sparse_prefix.cli", "simulate", "--workload", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "unknown family" in run.stderr


# --- place --------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".txt", ".csv", ".npy"])
def test_place_reads_every_pmf_format(tmp_path, capsys, suffix):
    pmf = [0.5, 0, 0, 0, 0.1, 0, 0, 0, 0.2, 0, 0, 0.2]
    path = tmp_path / f"pmf{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(pmf))
    elif suffix == ".npy":
        np.save(path, np.asarray(pmf))
    else:
        path.write_text("\n".join(str(v) for v in pmf) + "\n")
    assert cli.main(["place", "--pmf", str(path), "--budget", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    # Depths 4 (0.1), 8 (0.2), 11 (0.2): checkpoints at 8 and 11 leave only depth 4 uncovered.
    assert answer["positions"] == [8, 11]
    assert answer["expected_cost"] == pytest.approx(0.4)
    assert answer["expected_cost_without"] == pytest.approx(4.2)


def test_place_text_output_and_hybrid_cost(tmp_path, capsys):
    path = tmp_path / "pmf.json"
    path.write_text(json.dumps([1, 0, 0, 0, 1, 0, 0, 0, 1]))
    assert cli.main(["place", "--pmf", str(path), "--budget", "1", "--cost", "hybrid:1,0.5", "--grid", "4"]) == 0
    printed = capsys.readouterr().out
    assert "1 positions" in printed and "\n8\n" in printed


def test_place_from_trace_uses_within_group_overlaps(tmp_path, capsys):
    # Two documents (30 and 70 tokens), three questions each: overlaps 0, 30, 30 and 0, 70, 70.
    lines = [{"group": g, "tokens": list(range(1, n + 1)) + [1000 + q]} for g, n in (("a", 30), ("b", 70))
             for q in range(3)]
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["place", "--trace", str(path), "--budget", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["positions"] == [30, 70] and answer["max_depth"] == 71
    assert answer["expected_cost"] == pytest.approx(0.0, abs=1e-9)
    assert answer["expected_cost_without"] == pytest.approx((2 * 30 + 2 * 70) / 6)


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("[1, -1, 2]", ".json", "negative"),
        ("[0, 0, 0]", ".json", "mass"),
        ("[1, NaN, 2]", ".json", "NaN"),
        ("1\nabc\n", ".txt", "line 2"),
        ("{\"a\": 1}", ".json", "list of numbers"),
        ("[1]", ".json", "at least 2"),
        ("1,2", ".yaml", "unknown extension"),
    ],
)
def test_place_rejects_bad_pmf_files(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f"pmf{suffix}"
    path.write_text(content)
    assert cli.main(["place", "--pmf", str(path), "--budget", "1"]) == 2
    assert message in capsys.readouterr().err


def test_place_rejects_negative_budget(tmp_path, capsys):
    path = tmp_path / "pmf.json"
    path.write_text("[1, 1, 1]")
    assert cli.main(["place", "--pmf", str(path), "--budget", "-1"]) == 2
    assert "budget" in capsys.readouterr().err
