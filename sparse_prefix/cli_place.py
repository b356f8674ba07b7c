"""``sparse-prefix place``: the optimal checkpoint positions for an overlap pmf or a trace.

A pmf file holds the weight of each overlap depth t = 0..N in tokens: ``.npy`` (1-D), ``.json`` (a
list of numbers) or ``.csv`` / ``.txt`` (one number per line). From a trace, the pmf is the histogram
of each request's overlap: its longest common prefix with an earlier request of its group (file order,
every earlier request retained), 0 for the first request of a group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def register(subparsers) -> None:
    """Add the ``place`` sub-command."""
    parser = subparsers.add_parser(
        "place", help="optimal checkpoint positions for an overlap pmf or a trace",
        description="Solve the exact placement DP: given the distribution of overlap depths, choose at most "
                    "BUDGET checkpoint positions minimising the expected recomputation.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pmf", type=Path, metavar="FILE", help="overlap pmf: .npy, .json list, .csv/.txt")
    source.add_argument("--trace", type=Path, metavar="FILE", help="a JSONL trace (overlaps within groups)")
    parser.add_argument("--budget", type=int, required=True, metavar="M", help="checkpoints to place (>= 0)")
    parser.add_argument("--cost", default="linear", help="linear (default) or hybrid:a,b (g(t) = a t + b t^2)")
    parser.add_argument("--grid", type=int, default=1, metavar="N", help="positions on multiples of N")
    parser.add_argument("--max-tokens", type=int, default=16384, help="trace: truncate requests (default 16384)")
    parser.add_argument("--data-dir", metavar="DIR", help="the shared data folder (tokenizers)")
    parser.add_argument("--tokenizer", default="qwen", help="for text traces (default qwen)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.set_defaults(func=run)


def load_pmf(path: Path) -> np.ndarray:
    """Read a pmf file (see the module docstring) as float64[N+1]; ValueError on malformed content."""
    if not path.is_file():
        raise FileNotFoundError(f"--pmf: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ValueError(f"--pmf: {path} is not a readable .npy array ({error})") from None
    elif suffix == ".json":
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--pmf: {path} is not valid JSON ({error.msg}, line {error.lineno})") from None
        if not isinstance(values, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"--pmf: {path} must hold a JSON list of numbers")
    elif suffix in (".csv", ".txt"):
        values = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                values.append(float(line.strip().rstrip(",")))
            except ValueError:
                raise ValueError(f"--pmf: {path} line {number}: {line.strip()!r} is not a number") from None
    else:
        raise ValueError(f"--pmf: {path} has an unknown extension; use .npy, .json, .csv or .txt")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"--pmf: {path} must hold a 1-D list of at least 2 weights (depths 0..N), "
                         f"got shape {values.shape}")
    return values


def trace_overlap_pmf(requests) -> np.ndarray:
    """Weights float64[N+1] of each request's overlap depth (see the module docstring); N = longest request."""
    from sparse_prefix.index import PrefixIndex
    from sparse_prefix.planner import Planner

    longest = max(r.length for r in requests)
    planner = Planner("none", max_length=longest)
    index = PrefixIndex(capacity_entries=len(requests), eviction="fifo", capture="separate")
    counts = np.zeros(longest + 1, dtype=np.float64)
    for request in requests:
        plan = index.plan(request.tokens, group=request.group, planner=planner)
        counts[plan.overlap] += 1
        index.commit(plan)
    return counts


def run(args: argparse.Namespace) -> int:
    """Solve and print the positions (and the expected cost)."""
    from sparse_prefix import placement

    if args.pmf is not None:
        pmf, source = load_pmf(args.pmf), str(args.pmf)
    else:
        from sparse_prefix.traces import load_trace

        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens: must be >= 1, got {args.max_tokens}")
        requests = [r.truncated(args.max_tokens)
                    for r in load_trace(args.trace, tokenizer=args.tokenizer, data_dir=args.data_dir)]
        pmf, source = trace_overlap_pmf(requests), str(args.trace)
    solution = placement.solve(pmf, args.budget, cost=args.cost, grid=args.grid)
    positions = [int(p) for p in solution.positions]
    baseline = float(placement.expected_cost(pmf, [], cost=args.cost))
    if args.json:
        print(json.dumps({"source": source, "budget": args.budget, "cost": str(args.cost), "grid": args.grid,
                          "max_depth": int(pmf.size - 1), "positions": positions,
                          "expected_cost": float(solution.expected_cost), "expected_cost_without": baseline}))
        return 0
    print(f"{len(positions)} positions (budget {args.budget}, cost {args.cost}, grid {args.grid}, "
          f"depths 0..{pmf.size - 1}):")
    print(" ".join(str(p) for p in positions) if positions else "(none)")
    saved = 100.0 * (1 - solution.expected_cost / baseline) if baseline > 0 else 0.0
    print(f"expected cost E[g(t) - g(c(t))]: {solution.expected_cost:.2f} (no checkpoints: {baseline:.2f}; "
          f"{saved:.1f}% of the overlap's cost saved)")
    return 0
