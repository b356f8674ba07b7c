"""``sparse-prefix reproduce --timed`` (or ``python -m sparse_prefix.experiments.timed``): timed replays.

    sparse-prefix reproduce --timed --dataset system-prompts --trace traces/system-prompts.jsonl.xz \
        --sample-groups 34 --preset qwen3.5-0.8b-group [--policies none dp:12 ...] [--seed 0] \
        [--limit N] [--budget-s 480] [--out DIR]

Plans the replay (`timed.plan_replay`: protocol order, simulator pass, checkpoint slots), calibrates
the cost model on the very prefill program the engines will run (unless ``--no-calibrate``), runs
`timed.run_replay`, prints the table (policy, checkpoints per request, tokens saved %, measured s,
speedup, ideal speedup, % of ideal, ...) and writes ``table.md`` and ``results.json`` to ``--out``
(default ``results/timed-<dataset>-<preset>``), rewritten after every policy so a run cut short still
leaves its results. Reads only the pre-tokenised ``--trace`` (from ``sparse-prefix reproduce --export``,
optionally compressed: ``xz -k traces/*.jsonl`` shrinks both data sets from 126 MB to 2.5 MB, since
requests of a group repeat its document) when given, so it runs without ../shared; needs only jax,
numpy, flax and rich. `add_arguments(parser, standalone=False)` and `run` serve the ``--timed`` flag
of ``sparse-prefix reproduce`` (which already has --dataset, --policies, --limit, --out, ...).
"""

from __future__ import annotations

import argparse
import bz2
import datetime
import gzip
import json
import lzma
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATASETS = ("quality", "system-prompts")
CAPACITY = {"quality": 20, "system-prompts": 50}

FUSE = {"auto": "auto", "yes": True, "no": False}     # --fuse-restore -> Engine(fuse_restore=)


def add_arguments(parser: argparse.ArgumentParser, *, standalone: bool) -> None:
    """The timed-replay options; `standalone` also adds those `reproduce` already has."""
    from sparse_prefix.experiments.timed import DEFAULT_POLICIES

    group = parser.add_argument_group("timed replays (--timed)")
    if standalone:
        group.add_argument("--dataset", required=True, choices=DATASETS)
        group.add_argument("--policies", nargs="+", metavar="SPEC")
        group.add_argument("--limit", type=int, default=1000, help="requests replayed (default 1000)")
        group.add_argument("--out", type=Path, metavar="DIR")
        group.add_argument("--capacity", type=int, metavar="N")
        group.add_argument("--max-tokens", type=int, default=16384)
        group.add_argument("--data-dir", metavar="DIR")
        group.add_argument("--tokenizer", default="qwen")
        group.add_argument("--quiet", action="store_true")
        group.add_argument("--sample-groups", type=int, metavar="N",
                           help="replay N groups drawn by the seed, as `reproduce --sample-groups` (e.g. 34 "
                                "System Prompts ~ the paper's 1,000-request pool)")
    else:
        group.add_argument("--timed", action="store_true",
                           help="time the replay through the real Engine and model (policies are specs; "
                                f"default {' '.join(DEFAULT_POLICIES)})")
    group.add_argument("--trace", type=Path, metavar="FILE",
                       help="pre-tokenised JSONL trace (from --export; .xz, .gz or .bz2 compressed too); "
                            "default: tokenise the shared data")
    group.add_argument("--preset", default="qwen3.5-0.8b-group", help="model preset (default qwen3.5-0.8b-group)")
    group.add_argument("--dtype", default="bfloat16", help="compute dtype of the model (default bfloat16)")
    group.add_argument("--seed", type=int, default=0, help="the protocol order's seed (default 0)")
    group.add_argument("--eviction", default="fifo", choices=("fifo", "lru", "utility"))
    group.add_argument("--budget-s", type=float, metavar="S",
                       help="stop starting policies (and abandon one in flight) past S seconds in all")
    group.add_argument("--rounds", type=int, default=1, metavar="N",
                       help="replay the whole policy list N times round-robin and pool the rounds (the "
                            "table's speedups are pooled; results.json keeps each round's; default 1)")
    group.add_argument("--calibrate-lengths", metavar="N,N,...",
                       help="lengths timed for the cost model (default 6 on the chunk grid up to max_length)")
    group.add_argument("--calibrate-repeats", type=int, default=3, help="timed calls per length (default 3)")
    group.add_argument("--no-calibrate", action="store_true", help="skip the cost model (no ideal speedups)")
    group.add_argument("--fold-vocab", action="store_true",
                       help="take token ids modulo the model's vocabulary (smoke runs on tiny presets)")
    group.add_argument("--background-resolve", action="store_true",
                       help="re-solve the DP on the engine's thread (serving mode) instead of inline")
    group.add_argument("--step-loop", choices=("auto", "static", "dynamic"), default="auto",
                       help="the model's prefill step loop (auto: static on a GPU; static compiles once per "
                            "step count, and a fused restore once more per policy's store shape)")
    group.add_argument("--fit-steps", choices=("auto", "on", "off"), default=None,
                       help="HybridLM(fit_steps=): a one-chunk call runs one chunk (hybrid presets; "
                            "default: the model's, off; on / auto are faster and not bitwise on GPUs)")
    group.add_argument("--gemm", choices=("auto", "cublas", "xla"), default=None,
                       help="HybridLM(gemm=): the prefill's matmul kernels (hybrid presets; default: "
                            "the model's, auto = cuBLAS on a GPU)")
    group.add_argument("--command-buffers", choices=("auto", "on", "off"), default=None,
                       help="the prefill's XLA command buffers (CUDA graphs) on a GPU (default: the "
                            "model's; auto = on for hybrids, off for Mamba2)")
    group.add_argument("--fuse-restore", choices=("auto", "yes", "no"), default="auto",
                       help="Engine(fuse_restore=): trace the store's gather into the prefill's program "
                            "(auto: on a GPU)")


def _positive(name: str, value: Any) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"--{name}: must be > 0, got {value}")


_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


def read_trace(path: Path) -> list:
    """`sparse_prefix.traces.load_trace` of a JSONL trace, decompressing .xz / .gz / .bz2 files first."""
    from sparse_prefix.traces import load_trace

    path = Path(path)
    opener = _OPENERS.get(path.suffix)
    if opener is None:
        return load_trace(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / path.stem
        with opener(path, "rb") as source, open(plain, "wb") as target:
            shutil.copyfileobj(source, target)
        return load_trace(plain)


def load_trace_requests(args: argparse.Namespace) -> list:
    """The trace: ``--trace`` if given (no shared folder needed), else the shared data set; then
    ``--sample-groups`` groups drawn by the seed."""
    if args.trace is not None:
        requests = read_trace(args.trace)
    else:
        from sparse_prefix.experiments.requests import load_requests

        requests = load_requests(args.dataset, data_dir=args.data_dir, tokenizer=args.tokenizer,
                                 hub=getattr(args, "hub", False), cache=not getattr(args, "no_cache", False),
                                 groups=getattr(args, "file_groups", None))
    if args.sample_groups is not None:
        from sparse_prefix.experiments.reproduce import subset_groups

        requests = subset_groups(requests, args.sample_groups, args.seed)
    return requests


def run(args: argparse.Namespace) -> int:
    """Calibrate, replay every policy, print and write the results."""
    import jax
    import jax.numpy as jnp

    from sparse_prefix.experiments import costmodel, timed
    from sparse_prefix.models import create

    for name in ("limit", "capacity", "max_tokens", "budget_s", "calibrate_repeats", "sample_groups", "rounds"):
        _positive(name.replace("_", "-"), getattr(args, name))
    started = time.perf_counter()
    policies = args.policies or list(timed.DEFAULT_POLICIES)
    capacity = args.capacity or CAPACITY[args.dataset]
    requests = load_trace_requests(args)
    model, params = create(args.preset, dtype=jnp.dtype(args.dtype))
    overrides = {"step_loop": args.step_loop} if args.step_loop != "auto" else {}
    for name in ("fit_steps", "gemm", "command_buffers"):
        if getattr(args, name) is not None:
            if not hasattr(model, name):
                raise ValueError(f"--{name.replace('_', '-')} applies to hybrid presets, "
                                 f"not {args.preset}")
            overrides[name] = getattr(args, name)
    if overrides:
        kept = {name: getattr(model, name) for name in ("fit_steps", "gemm", "command_buffers")
                if hasattr(model, name)}
        model = type(model)(model.config, **{**kept, **overrides})
    if args.fold_vocab:
        requests = timed.fold_vocab(requests, int(model.vocab_size))
    timed.check_vocab(requests, int(model.vocab_size))       # before any device time is spent
    device = jax.devices()[0]
    out = args.out or Path("results") / f"timed-{args.dataset}-{args.preset}"
    config = {"dataset": args.dataset, "trace": None if args.trace is None else str(args.trace),
              "sample_groups": args.sample_groups,
              "preset": args.preset, "dtype": args.dtype, "seed": args.seed, "capacity_entries": capacity,
              "eviction": args.eviction, "limit": args.limit, "max_tokens": args.max_tokens,
              "fold_vocab": args.fold_vocab, "background_resolve": args.background_resolve,
              "fuse_restore": args.fuse_restore, "step_loop": getattr(model, "step_loop", None),
              "fit_steps": getattr(model, "fit_steps", None), "gemm": getattr(model, "gemm", None),
              "command_buffers": getattr(model, "command_buffers", None),
              "step_tokens": timed.step_tokens_of(model),
              "budget_s": args.budget_s, "rounds": args.rounds, "device": f"{device.device_kind} ({device.platform})",
              "jax": jax.__version__, "date": datetime.date.today().isoformat(),
              "command": " ".join(shlex.quote(a) for a in sys.argv)}
    print(f"device: {config['device']}, jax {jax.__version__}; {args.preset} ({args.dtype}), "
          f"{len(requests)} requests in the trace", flush=True)
    plan = timed.plan_replay(requests, policies, model=model, seed=args.seed, capacity=capacity,
                             eviction=args.eviction, limit=args.limit, max_tokens=args.max_tokens)
    print(f"{len(plan.order)} requests ({plan.n_warm} warm), {len(plan.policies)} policies simulated, "
          f"{plan.checkpoint_slots} checkpoint slots per call, {time.perf_counter() - started:.0f} s so far",
          flush=True)
    calibration = None
    if not args.no_calibrate:
        lengths = ([int(x) for x in args.calibrate_lengths.split(",")] if args.calibrate_lengths
                   else costmodel.default_lengths(int(model.max_length), int(model.chunk_size)))
        calibration = costmodel.calibrate(model, params, lengths, repeats=args.calibrate_repeats,
                                          checkpoint_slots=plan.checkpoint_slots)
        fit = calibration.cost
        print(f"cost model: t(n) = {fit.c0 * 1e3:.2f} ms + {fit.a * 1e6:.3f} us n + {fit.b * 1e9:.4f} ns n^2 "
              f"(max residual {costmodel.max_relative_residual(calibration):.1%}, "
              f"{time.perf_counter() - started:.0f} s so far)", flush=True)
    budget = None if args.budget_s is None else max(args.budget_s - (time.perf_counter() - started), 1e-3)

    def save(result) -> None:
        write_results(out, config, result, calibration, quiet=True)
        last = result.timings[-1]
        where = f" (round {last.round + 1} of {args.rounds})" if args.rounds > 1 else ""
        print(f"  {last.policy}{where}: {last.measured_s:.2f} s measured ({last.setup_s:.0f} s setup, "
              f"{last.warm_s:.0f} s warm), {time.perf_counter() - started:.0f} s so far", flush=True)

    result = timed.run_replay(plan, model=model, params=params, budget_s=budget,
                              background_resolve=args.background_resolve, on_policy=save,
                              fuse_restore=FUSE[args.fuse_restore], rounds=args.rounds)
    config["seconds"] = round(time.perf_counter() - started, 1)
    write_results(out, config, result, calibration, quiet=args.quiet)
    return 0


def write_results(out: Path, config: dict, result: Any, calibration: Any, *, quiet: bool) -> None:
    """Write table.md and results.json under `out`; print the table unless `quiet`."""
    from sparse_prefix.experiments import timed
    from sparse_prefix.experiments.paper import PAPER_RUNS
    from sparse_prefix.experiments.reproduce_report import markdown_table, print_table

    cost = None if calibration is None else calibration.cost
    pooled = timed.pool_rounds(result)
    step_tokens = config.get("step_tokens")
    rows = timed.pooled_rows(pooled, cost, step_tokens)
    paper = PAPER_RUNS.get(config["dataset"])
    paper_speedups = {p.policy: p.time_speedup for p in paper.points} if paper else {}
    cells = timed.table_cells(rows, paper_speedups)
    title = (f"{config['dataset']}, {config['preset']} ({config['dtype']}) on {config['device']}: "
             f"{result.n_requests - result.n_warm} measured of {result.n_requests} requests, mean length "
             f"{result.mean_length:.0f}, capacity {config['capacity_entries']} ({config['eviction']}), "
             f"seed {config['seed']}" + (f", {result.rounds} rounds pooled" if result.rounds > 1 else ""))
    if not quiet:
        print_table(timed.TABLE_HEADER, cells, title)
        for entry in result.skipped:
            print(f"  skipped {entry['policy']}: {entry['reason']}")
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"- skipped {e['policy']}" + (f" (round {e['round'] + 1})" if "round" in e else "")
             + f": {e['reason']}" for e in result.skipped]
    if result.rounds > 1:
        notes += [f"- {row['policy']} speedup per round: "
                  + " / ".join(f"{x:.2f}x" for x in row["speedup_per_round"]) for row in rows[1:]]
    fit = timed.no_cache_cost(pooled)
    if fit is not None:
        notes.append(f"- ideal fitted to the no-cache requests' own prefill times (c0 = {fit.c0:.4g} s, "
                     f"a = {fit.a:.4g} s, b = {fit.b:.4g} s), % of it: " + ", ".join(
                         f"{row['policy']} {row['pct_of_no_cache_fit_ideal']:.0f}" for row in rows[1:]
                         if row["pct_of_no_cache_fit_ideal"] is not None))
    if step_tokens is not None:
        notes.append(f"- step bound = sum ceil(L / S) / sum ceil((L - r) / S), S = {step_tokens} tokens per "
                     "prefill step: the speedup if a request cost only its steps (no policy beats it on "
                     "this step grid, up to the few % deeper steps cost more)")
    if cost is not None:
        notes.append(f"- cost model t(n) = c0 + a n + b n^2: c0 = {cost.c0:.4g} s, a = {cost.a:.4g} s, "
                     f"b = {cost.b:.4g} s; ideal = sum t(L) / sum [c0 + a (L - r) + b (L^2 - r^2)]")
    (out / "table.md").write_text(f"# Timed replay\n\n{title}; `{config['command']}`, {config['date']}\n\n"
                                  + markdown_table(timed.TABLE_HEADER, cells) + "\n" + "\n".join(notes) + "\n")
    payload = {"config": config, "calibration": None if calibration is None else calibration.as_dict(),
               "n_requests": result.n_requests, "n_warm": result.n_warm,
               "checkpoint_slots": result.checkpoint_slots, "mean_length": result.mean_length,
               "no_cache_fit": None if fit is None else fit.as_dict(),
               "policies": [dict(row, records=timed.records_as_lists(p.timing)) for row, p in zip(rows, pooled)],
               "skipped": list(result.skipped)}
    (out / "results.json").write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    if not quiet:
        print(f"wrote {out / 'table.md'} and {out / 'results.json'}")


def main(argv=None) -> int:
    """``python -m sparse_prefix.experiments.timed``: the same options as ``reproduce --timed``."""
    parser = argparse.ArgumentParser(prog="python -m sparse_prefix.experiments.timed",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser, standalone=True)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"timed: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
