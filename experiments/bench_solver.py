"""Placement solver benchmark: the jitted JAX DP vs the NumPy O(N^2 M) reference, in the same run.

    python -m sparse_prefix.experiments.bench_solver [--device cpu|gpu] [--json out.json]
    python -m sparse_prefix.experiments.bench_solver --device gpu --profile-hlo --sizes 256 --budgets 30

Times `solve` end to end (validation, prefix sums, the device call, fetching the positions, their
expected cost): warm median of --repeats runs after one compiling call, whose time is reported
apart. The reference is slow, so it runs fewer times: by default 5 times up to N = 256, 3 up to
4096 and once above (--reference-repeats overrides), and not at all above --reference-max depths. The pmf is a fixed random mixture (seeded), the same for both solvers, and the
two answers' expected costs are checked to agree.

--profile-hlo compiles instead of timing: per (N, M), the program `solve` would run, with its while
loops (and whether XLA knows their trip count: an unknown one reads a predicate back to the host every
iteration on a GPU), fusions, command buffers and the kernels one call launches. --schedule picks the
layer schedule (`dp.layer_schedule`) for either mode; --host-backtrack-max sets
`dp.HOST_BACKTRACK_MAX_ELEMENTS` (0: always backtrack on the device, the A/B switch of the host
backtrack that small tables get by default).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import statistics
import time
from typing import Callable

import jax
import numpy as np

from sparse_prefix.placement import reference_solve, solve
from sparse_prefix.placement.costs import LINEAR
from sparse_prefix.placement import dp
from sparse_prefix.placement.dp import search_levels
from sparse_prefix.placement.result import normalized
from sparse_prefix.placement.solver import bucket, device_call


def bench_pmf(n: int, seed: int = 0) -> np.ndarray:
    """A fixed overlap pmf over 0..n: a miss spike, a geometric bulk and a uniform floor."""
    rng = np.random.default_rng(seed)
    depths = np.arange(n + 1)
    pmf = 0.3 * np.exp(-depths / max(n / 8, 1)) + 0.05 * rng.random(n + 1)
    pmf[0] += 0.4 * pmf.sum()
    return pmf


def timed(call: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Wall times (s) of `repeats` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return times, result


def reference_runs(n: int, override: int | None) -> int:
    """How many times the reference runs at depth n."""
    if override is not None:
        return override
    return 5 if n <= 256 else 3 if n <= 4096 else 1


def run(sizes: list[int], budgets: list[int], method: str, repeats: int, reference_repeats: int | None,
        reference_max: int, grid: int = 1, schedule: str = "auto") -> list[dict]:
    """One row per (N, M): JAX compile / warm median, reference median, speedup, agreement."""
    rows = []
    for n in sizes:
        pmf = bench_pmf(n)
        for budget in budgets:
            ours_solve = functools.partial(solve, pmf, budget, method=method, grid=grid,
                                           schedule=schedule)
            start = time.perf_counter()
            ours_solve()
            compile_s = time.perf_counter() - start
            times, ours = timed(ours_solve, repeats)
            row = dict(n=n, budget=budget, grid=grid, method=method, schedule=schedule,
                       levels=search_levels(method, bucket(n)), jax_first_s=compile_s,
                       jax_median_s=statistics.median(times), jax_min_s=min(times), jax_runs=repeats,
                       positions=int(ours.positions.size))
            ref_runs = reference_runs(n, reference_repeats)
            if n <= reference_max and ref_runs > 0:
                ref_times, ref = timed(lambda: reference_solve(pmf, budget, grid=grid), ref_runs)
                row.update(reference_median_s=statistics.median(ref_times), reference_runs=ref_runs,
                           speedup=statistics.median(ref_times) / row["jax_median_s"],
                           cost_rel_diff=abs(ours.expected_cost - ref.expected_cost) / ref.expected_cost)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


HEADER = (f"{'N':>7} {'M':>3} {'passes':>6} {'jax first':>10} {'jax median':>11} {'reference':>10} "
          f"{'speedup':>8} {'cost rel diff':>13}")


def format_row(row: dict) -> str:
    """One table line."""
    ref = row.get("reference_median_s")
    ref_text = f"{ref * 1e3:8.1f}ms" if ref is not None else f"{'-':>10}"
    speed = f"{row['speedup']:7.1f}x" if ref is not None else f"{'-':>8}"
    diff = f"{row['cost_rel_diff']:13.1e}" if ref is not None else f"{'-':>13}"
    return (f"{row['n']:>7} {row['budget']:>3} {row['levels']:>6} {row['jax_first_s']:9.2f}s "
            f"{row['jax_median_s'] * 1e3:9.2f}ms {ref_text} {speed} {diff}")


# Instructions that launch nothing: data plumbing, and control flow (counted through its callees).
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
              "conditional", "after-all", "opt-barrier", "partition-id", "replica-id", "iota"}
_COMPUTATION = re.compile(r"^(ENTRY )?%?(\S+) .*\{$")  # names print with or without %
_OPCODE = re.compile(r" = .*? ([a-z][a-z0-9-]*)\(")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _computations(text: str) -> tuple[dict[str, list[tuple[str, str]]], str]:
    """Optimised HLO text -> ({computation: [(opcode, instruction line)]}, entry computation name)."""
    computations, entry, current = {}, "", None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        opcode = _OPCODE.search(line) if current is not None else None
        if opcode:
            current.append((opcode.group(1), line))
    return computations, entry


def _callees(opcode: str, line: str) -> list[str]:
    """The computations a control-flow instruction runs (while: body then condition)."""
    if opcode == "while":
        return [re.search(rf"{key}=%?([^,\s}}]+)", line).group(1) for key in ("body", "condition")]
    if opcode == "call":
        return re.findall(r"to_apply=%?([^,\s}]+)", line)
    if opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        return re.findall(r"%?([^,\s}]+)", branches.group(1)) if branches else []
    return []


def hlo_profile(text: str) -> dict:
    """Loops, fusions and kernel launches of one call of a compiled program (`compiled.as_text()`).

    Counts instructions reachable from the entry through control flow (while bodies and conditions,
    calls, conditionals) -- not the insides of fusions. A while loop with a known trip count n runs
    its body n times and never its condition (XLA's GPU runtime then needs no predicate); one with an
    unknown trip count is counted as one iteration (body + condition twice) and listed in
    `dynamic_loops`: on a GPU each of its iterations copies the predicate to the host and waits.

    Returns:
      dict: while_loops, trip_counts (list, None = unknown), dynamic_loops, fusions (static count),
      command_buffers (calls of outlined command-buffer computations: one graph launch each), kernels
      (per call, every instruction run that is not plumbing), launches (per call, a command buffer as
      one launch).
    """
    computations, entry = _computations(text)
    counts = dict(while_loops=0, trip_counts=[], dynamic_loops=0, fusions=0, command_buffers=0)
    seen, stack = set(), [entry]
    while stack:  # static counts over the reachable computations
        name = stack.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for opcode, line in computations[name]:
            counts["fusions"] += opcode == "fusion"
            if opcode == "while":
                trips = _TRIP_COUNT.search(line)
                counts["while_loops"] += 1
                counts["trip_counts"].append(int(trips.group(1)) if trips else None)
                counts["dynamic_loops"] += trips is None
            if opcode == "call":
                counts["command_buffers"] += any("command_buffer" in c for c in _callees(opcode, line))
            stack.extend(_callees(opcode, line))

    @functools.lru_cache(maxsize=None)
    def cost(name: str) -> tuple[int, int]:  # (kernels, launches) of one run of a computation
        kernels = launches = 0
        for opcode, line in computations.get(name, []):
            if opcode == "while":
                body, condition = (cost(c) for c in _callees(opcode, line))
                trips = _TRIP_COUNT.search(line)
                runs = (int(trips.group(1)), 0) if trips else (1, 2)
                kernels += runs[0] * body[0] + runs[1] * condition[0]
                launches += runs[0] * body[1] + runs[1] * condition[1]
            elif opcode in ("call", "conditional"):
                for callee in _callees(opcode, line):
                    callee_cost = cost(callee)
                    kernels += callee_cost[0]
                    launches += 1 if "command_buffer" in callee else callee_cost[1]
            elif opcode not in _NO_KERNEL:
                kernels += 1
                launches += 1
        return kernels, launches

    kernels, launches = cost(entry)
    return dict(counts, kernels=kernels, launches=launches)


def profile_rows(sizes: list[int], budgets: list[int], method: str, grid: int, schedule: str
                 ) -> list[dict]:
    """One row per (N, M): the compiled `solve` program's `hlo_profile`, schedule and compile time."""
    rows = []
    for n in sizes:
        pmf = normalized(bench_pmf(n))[None, :]
        for budget in budgets:
            layers = min(budget, n // grid)
            function, args, static = device_call(pmf, LINEAR, layers, grid, method, False, schedule)
            start = time.perf_counter()
            with jax.enable_x64(True):
                text = function.lower(*args, **static).compile().as_text()
            row = dict(n=n, budget=budget, grid=grid, schedule=static["schedule"],
                       backtrack=static["backtrack"],
                       levels=list(static["levels"]), height=static["height"],
                       compile_s=time.perf_counter() - start, **hlo_profile(text))
            rows.append(row)
            print(format_profile(row), flush=True)
    return rows


PROFILE_HEADER = (f"{'N':>7} {'M':>3} {'schedule':>8} {'walk':>6} {'passes':>6} {'compile':>8} "
                  f"{'whiles':>6} "
                  f"{'trip counts':>14} {'fusions':>7} {'cmd bufs':>8} {'kernels/call':>12} "
                  f"{'launches/call':>13}")


def format_profile(row: dict) -> str:
    """One --profile-hlo table line ("?" = a loop of unknown trip count, counted once)."""
    trips = ",".join("?" if n is None else str(n) for n in row["trip_counts"]) or "-"
    passes = "/".join(str(level) for level in row["levels"])
    return (f"{row['n']:>7} {row['budget']:>3} {row['schedule']:>8} {row['backtrack']:>6} "
            f"{passes:>6} "
            f"{row['compile_s']:7.2f}s {row['while_loops']:>6} {trips:>14} {row['fusions']:>7} "
            f"{row['command_buffers']:>8} {row['kernels']:>12} {row['launches']:>13}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None,
                        help="run the JAX solver on this platform (default: jax's default)")
    parser.add_argument("--sizes", default="256,4096,16384", help="comma-separated N (max depth)")
    parser.add_argument("--budgets", default="1,8,32", help="comma-separated M")
    parser.add_argument("--method", default="auto", help="auto, dense or tiled:L")
    parser.add_argument("--grid", type=int, default=1, help="positions on multiples of this")
    parser.add_argument("--repeats", type=int, default=20, help="warm JAX runs (median)")
    parser.add_argument("--reference-repeats", type=int, default=None,
                        help="reference runs (median); default 5 / 3 / 1 for N <= 256 / 4096 / larger")
    parser.add_argument("--reference-max", type=int, default=16384, help="skip the reference above this N")
    parser.add_argument("--schedule", default="auto",
                        help="layer schedule: auto, dynamic, scan or unroll")
    parser.add_argument("--host-backtrack-max", type=int, default=dp.HOST_BACKTRACK_MAX_ELEMENTS,
                        help="tables up to this many entries are fetched and backtracked on the host "
                             "(0: always on the device)")
    parser.add_argument("--profile-hlo", action="store_true",
                        help="compile only: print loops / trip counts / fusions / launches per (N, M)")
    parser.add_argument("--json", default=None, help="write the rows and the machine to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    sizes = [int(x) for x in args.sizes.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    device = jax.devices(args.device)[0] if args.device else jax.devices()[0]
    dp.HOST_BACKTRACK_MAX_ELEMENTS = args.host_backtrack_max
    if args.profile_hlo:
        print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; compiled HLO")
        print(PROFILE_HEADER)
        with jax.default_device(device):
            rows = profile_rows(sizes, budgets, args.method, args.grid, args.schedule)
    else:
        print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
              f"JAX: median of {args.repeats} warm runs; reference: median of "
              f"{args.reference_repeats if args.reference_repeats is not None else '5 / 3 / 1 (N <= 256 / 4096 / more)'} runs")
        print(HEADER)
        with jax.default_device(device):
            rows = run(sizes, budgets, args.method, args.repeats, args.reference_repeats,
                       args.reference_max, args.grid, args.schedule)
    if args.json:
        meta = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                    machine=platform.machine(), python=platform.python_version(),
                    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        with open(args.json, "w") as handle:
            json.dump(dict(meta=meta, rows=rows), handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
