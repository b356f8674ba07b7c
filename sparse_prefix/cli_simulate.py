"""``sparse-prefix simulate``: replay a workload or trace under placement policies (token accounting).

Writes ``results.json``, ``results.csv`` and ``pareto.png`` to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

DEFAULT_POLICIES = (
    "none", "end", "log", "sqrt",
    "balanced:1", "balanced:4",
    "block:4096", "block:2048", "block:1024", "block:512",
    "dp:1", "dp:3", "dp:8", "dp:20",
    "ldp:1", "ldp:3", "ldp:8",
    "dp:3+fork+hints",
)
_TABLE_COLUMNS = (
    ("checkpoints_per_request", "ckpts / request", "{:.2f}"),
    ("tokens_saved_pct", "tokens saved %", "{:.1f}"),
    ("savings_x", "savings x", "{:.2f}"),
    ("hit_rate_pct", "hit rate %", "{:.1f}"),
    ("resident_checkpoints", "resident ckpts", "{:.0f}"),
    ("state_bytes_per_request", "state MiB / request", "{:.1f}"),
)


def register(subparsers) -> None:
    """Add the ``simulate`` sub-command."""
    parser = subparsers.add_parser(
        "simulate", help="replay a workload or trace under checkpoint placement policies",
        description="Replay a built-in workload or a JSONL trace with the paper's protocol (groups shuffled "
                    "per seed, first 60%% warm, last 40%% measured) under each policy; print a table and write "
                    "results.json, results.csv and pareto.png.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workload", metavar="NAME",
                        help="a built-in family: documents, system-prompts, chat, agent-tree, uniform")
    source.add_argument("--trace", metavar="FILE", type=Path, help="a JSONL trace file")
    parser.add_argument("--policy", metavar="SPEC", nargs="+", action="extend", dest="policies",
                        help="policy specs, e.g. dp:8 block:1024 ldp:3+fork (default: a sweep of %d)"
                        % len(DEFAULT_POLICIES))
    parser.add_argument("--seeds", type=int, default=5, metavar="N", help="replay seeds 0..N-1 (default 5)")
    parser.add_argument("--capacity", type=int, metavar="N",
                        help="cache capacity in entries (default: 20, or 50 for system-prompts)")
    parser.add_argument("--eviction", choices=("fifo", "lru", "utility"), default="fifo")
    parser.add_argument("--grid", type=int, default=1, metavar="N",
                        help="snap every checkpoint down to a multiple of N (the model's chunk grid)")
    parser.add_argument("--capture", choices=("separate", "one-pass"), default="separate",
                        help="separate: every planned state is stored (the paper); one-pass: the engine's")
    parser.add_argument("--scale", type=float, default=1.0, help="workload size multiplier (default 1)")
    parser.add_argument("--limit", type=int, default=1000, help="requests replayed per seed (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="truncate requests (default 16384)")
    parser.add_argument("--bytes-per-checkpoint", type=float, metavar="B",
                        help="size of one checkpoint state, to report state memory per request")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes (default: up to 2)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default results/simulate-<name>)")
    parser.add_argument("--data-dir", metavar="DIR", help="the shared data folder (tokenizers)")
    parser.add_argument("--tokenizer", default="qwen",
                        help="for text traces: qwen, gpt2 or a tokenizer.json path (default qwen)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _source(args):
    """(requests or builder, name, default capacity)."""
    from sparse_prefix import workloads

    if args.workload is not None:
        if args.workload not in workloads.WORKLOADS:
            raise ValueError(f"--workload: unknown family {args.workload!r}; choose one of "
                             f"{', '.join(workloads.WORKLOADS)}")
        if not args.scale > 0:
            raise ValueError(f"--scale: must be > 0, got {args.scale}")
        builder = functools.partial(workloads.WORKLOADS[args.workload], scale=args.scale)
        return builder, args.workload, workloads.DEFAULT_CAPACITY[args.workload]
    from sparse_prefix.traces import load_trace

    return load_trace(args.trace, tokenizer=args.tokenizer, data_dir=args.data_dir), args.trace.stem, 20


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table, write the outputs."""
    from sparse_prefix import plots, simulate
    from sparse_prefix.planner import parse_policy

    for name in ("seeds", "capacity", "grid", "limit", "max_tokens", "workers"):
        _check_positive("--" + name.replace("_", "-"), getattr(args, name))
    policies = list(dict.fromkeys(args.policies or DEFAULT_POLICIES))
    for policy in policies:
        parse_policy(policy)
    source, name, default_capacity = _source(args)
    capacity = args.capacity or default_capacity
    out = args.out or Path("results") / f"simulate-{name}"
    config = {"source": name, "workload": args.workload, "trace": str(args.trace) if args.trace else None,
              "scale": args.scale, "seeds": args.seeds, "capacity_entries": capacity, "eviction": args.eviction,
              "grid": args.grid, "capture": args.capture, "limit": args.limit, "max_tokens": args.max_tokens,
              "bytes_per_checkpoint": args.bytes_per_checkpoint}
    summaries = simulate.sweep(
        source, policies, seeds=args.seeds, limit=args.limit, max_tokens=args.max_tokens,
        workers=args.workers, progress=not args.quiet, capacity_entries=capacity, eviction=args.eviction,
        grid=args.grid, capture=args.capture, bytes_per_checkpoint=args.bytes_per_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    simulate.write_json(out / "results.json", summaries, config)
    simulate.write_csv(out / "results.csv", summaries)
    title = f"{name}: {args.seeds} seeds, capacity {capacity} ({args.eviction}), capture {args.capture}"
    plots.pareto_plot(summaries, out / "pareto.png", title=title)
    print_table(summaries, title)
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'pareto.png'}")
    return 0


def print_table(summaries, title: str) -> None:
    """A rich table of mean ± sd per metric, one row per policy."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("policy")
    columns = [c for c in _TABLE_COLUMNS if any(c[0] in s.mean for s in summaries)]
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for summary in summaries:
        cells = []
        for metric, _, fmt in columns:
            scale = 1 / 2**20 if metric == "state_bytes_per_request" else 1.0
            mean, sd = summary.mean[metric] * scale, summary.sd[metric] * scale
            cells.append(fmt.format(mean) + (" ± " + fmt.format(sd) if len(summary.seeds) > 1 else ""))
        table.add_row(summary.policy, *cells)
    # Off a terminal rich would wrap at 80 columns; a results table reads better unwrapped.
    Console(width=None if sys.stdout.isatty() else 132).print(table)
