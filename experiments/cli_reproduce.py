"""``sparse-prefix reproduce``: the paper's Pareto frontier on real data, beside its published points.

    sparse-prefix reproduce --dataset quality [--seeds 5] [--out DIR] [--policies ...] [--quick]

Writes to ``--out`` (default ``results/reproduce-<dataset>``): ``table.md`` (one table per capture
mode, the acceptance targets, the paper comparison), ``pareto.png`` (paper protocol, with the paper's
published points), ``pareto-one-pass.png`` (the engine's capture) and ``results.json`` (everything).
``--export FILE`` instead writes the pre-tokenised trace as JSONL (for machines without ../shared).
``--timed`` instead times the replay through the real Engine and a model preset (`cli_timed.py`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

DATASETS = ("quality", "system-prompts")


def register(subparsers) -> None:
    """Add the ``reproduce`` sub-command."""
    parser = subparsers.add_parser(
        "reproduce", help="the paper's Pareto frontier on QuALITY / System Prompts, beside its points",
        description="Replay a real data set (read from the shared folder, tokenised with the Qwen BPE) under "
                    "the paper's policies, ours and the serving systems' placements, with the paper's protocol "
                    "(capture 'separate', FIFO) and the engine's ('one-pass'); write tables, Pareto PNGs with "
                    "the paper's published points, and a JSON of all.")
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--seeds", type=int, metavar="N", help="replay seeds 0..N-1 (default 5; 2 with --quick)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="results folder (default results/reproduce-<dataset>)")
    parser.add_argument("--policies", nargs="+", metavar="NAME",
                        help="run sets (paper, ours, peers, quick), run labels ('dp:8 bins=1', 'vLLM all') or "
                             "policy specs (default: paper ours peers)")
    parser.add_argument("--quick", action="store_true",
                        help="a small policy set that still checks every target, 2 seeds, paper protocol only")
    parser.add_argument("--captures", nargs="+", choices=("separate", "one-pass"),
                        help="capture modes (default both; --quick: separate)")
    parser.add_argument("--capacity", type=int, metavar="N", help="cache entries (default 20 QuALITY, 50 System Prompts)")
    parser.add_argument("--sample-groups", type=int, metavar="N",
                        help="draw N groups per seed (e.g. 34 System Prompts ~ the paper's 1,000-request pool)")
    parser.add_argument("--file-groups", type=int, metavar="N", help="use only the first N groups of the data file")
    parser.add_argument("--limit", type=int, default=1000, help="requests replayed per seed (default 1000)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="truncate requests (default 16384)")
    parser.add_argument("--data-dir", metavar="DIR", help="the shared data folder (default ../shared)")
    parser.add_argument("--tokenizer", default="qwen", help="qwen (default), gpt2 or a tokenizer.json path")
    parser.add_argument("--hub", action="store_true", help="read QuALITY from the Hugging Face hub (needs `datasets`)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the tokenised-trace cache")
    parser.add_argument("--export", type=Path, metavar="FILE",
                        help="only write the pre-tokenised trace as JSONL to FILE (e.g. traces/quality.jsonl)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: up to 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from sparse_prefix.experiments.cli_timed import add_arguments as add_timed_arguments

    add_timed_arguments(parser, standalone=False)   # --timed and its options (experiments/cli_timed.py)
    parser.set_defaults(func=run)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name}: must be >= 1, got {value}")


def run(args: argparse.Namespace) -> int:
    """Run the reproduction and write the results folder."""
    if args.timed:                                  # the replay timed through the Engine (cli_timed.py)
        from sparse_prefix.experiments.cli_timed import run as run_timed

        return run_timed(args)
    from sparse_prefix.experiments import reproduce, reproduce_report as report
    from sparse_prefix.experiments.paper import paper_run
    from sparse_prefix.experiments.requests import export_trace, load_requests

    for name in ("seeds", "capacity", "sample_groups", "file_groups", "limit", "max_tokens", "workers"):
        _check_positive(name.replace("_", "-"), getattr(args, name))
    load_options = dict(data_dir=args.data_dir, tokenizer=args.tokenizer, hub=args.hub,
                        cache=not args.no_cache, groups=args.file_groups)
    if args.export is not None:
        count = export_trace(args.export, args.dataset, **load_options)
        print(f"wrote {count} requests to {args.export}")
        return 0
    started = time.time()
    seeds = args.seeds or (2 if args.quick else 5)
    captures = tuple(args.captures or (("separate",) if args.quick else reproduce.CAPTURES))
    capacity = args.capacity or reproduce.CAPACITY[args.dataset]
    hybrid_cost = reproduce.hybrid_cost_spec()
    names = args.policies or (["quick"] if args.quick else ["paper", "ours", "peers"])
    runs = reproduce.runs_from_names(names, hybrid_cost)
    requests = load_requests(args.dataset, **load_options)
    bytes_per_checkpoint = reproduce.checkpoint_bytes()
    results = reproduce.run_reproduction(
        requests, runs, capacity=capacity, seeds=seeds, captures=captures, groups=args.sample_groups,
        limit=args.limit, max_tokens=args.max_tokens, workers=args.workers,
        bytes_per_checkpoint=bytes_per_checkpoint, progress=not args.quiet,
        reduce_one_pass=args.policies is None and not args.quick)
    stats = reproduce.trace_stats(requests, seeds=seeds, groups=args.sample_groups, limit=args.limit,
                                  max_tokens=args.max_tokens)
    paper = paper_run(args.dataset)
    checks = {capture: reproduce.acceptance(results[capture], runs) for capture in captures}
    comparison = report.paper_comparison(results["separate"], paper) if "separate" in results else []
    suffix = f"-g{args.sample_groups}" if args.sample_groups else ""
    out = args.out or Path("results") / f"reproduce-{args.dataset}{suffix}"
    command = "sparse-prefix " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    config = {"dataset": args.dataset, "seeds": seeds, "capacity_entries": capacity, "captures": list(captures),
              "sample_groups": args.sample_groups, "file_groups": args.file_groups, "limit": args.limit,
              "max_tokens": args.max_tokens, "tokenizer": args.tokenizer, "hub": args.hub,
              "bytes_per_checkpoint": bytes_per_checkpoint, "memory_preset": reproduce.MEMORY_PRESET,
              "hybrid_cost": hybrid_cost, "date": datetime.date.today().isoformat(), "command": command,
              "seconds": round(time.time() - started, 1)}
    _write(out, args.dataset, config, stats, runs, results, checks, comparison, paper, report)
    return 0


def _write(out, dataset, config, stats, runs, results, checks, comparison, paper, report) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"# Reproduction: {dataset}\n",
                f"{config['date']}, `{config['command'] or 'sparse-prefix reproduce'}`; {config['seeds']} seeds, "
                f"capacity {config['capacity_entries']} entries (FIFO unless stated), "
                f"{stats['measured_requests']:.0f} measured of {stats['replayed_requests']:.0f} replayed requests "
                f"over {stats['replayed_groups']:.0f} groups, measured mean length "
                f"{stats['measured_mean_length']:.0f} tokens (paper: {paper.mean_length:.0f}); "
                f"one checkpoint = {config['bytes_per_checkpoint'] / 2**20:.2f} MiB ({config['memory_preset']}).\n"]
    for capture, summaries in results.items():
        header, rows = report.table_rows(summaries, runs, paper)
        title = f"{dataset}, capture {capture}" + (" (the paper's protocol)" if capture == "separate" else
                                                   " (the engine)")
        report.print_table(header, rows, title)
        lines = report.acceptance_lines(checks[capture])
        for line in lines:
            print(f"  {line}")
        sections += [f"## {title}\n", report.markdown_table(header, rows)]
        sections += ["Acceptance:\n"] + [f"- {line}" for line in lines] + [""]
        png = out / ("pareto.png" if capture == "separate" else f"pareto-{capture}.png")
        report.pareto_png(summaries, runs, png, paper=paper if capture == "separate" else None,
                          title=f"{dataset}: {config['seeds']} seeds, capacity {config['capacity_entries']}, "
                                f"capture {capture}" + ("; black hollow = the paper's published points"
                                                        if capture == "separate" else ""))
    if comparison:
        sections += ["## Against the paper's published points (paper protocol)\n",
                     report.markdown_table(
                         ["policy", "paper ckpts", "ours ckpts", "paper saved %", "ours saved %", "gap (points)"],
                         [[r["policy"], f"{r['paper_checkpoints']:.2f}", f"{r['ours_checkpoints']:.2f}",
                           f"{r['paper_saved_pct']:.1f}", f"{r['ours_saved_pct']:.1f}",
                           f"{r['saved_gap_points']:+.1f}"] for r in comparison])]
    (out / "table.md").write_text("\n".join(sections) + "\n")
    report.write_json(out / "results.json", config=config, stats=stats, runs=runs, results=results,
                      checks=checks, comparison=comparison, paper=paper)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'} and the Pareto PNGs in {out}")
