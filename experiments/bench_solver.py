"""Placement solver benchmark: the jitted JAX DP vs the NumPy O(N^2 M) reference, in the same run.

    python -m sparse_prefix.experiments.bench_solver [--device cpu|gpu] [--json out.json]

Times `solve` end to end (validation, prefix sums, the device call, fetching the positions, their
expected cost): warm median of --repeats runs after one compiling call, whose time is reported
apart. The reference is slow, so it runs fewer times: by default 5 times up to N = 256, 3 up to
4096 and once above (--reference-repeats overrides), and not at all above --reference-max depths. The pmf is a fixed random mixture (seeded), the same for both solvers, and the
two answers' expected costs are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import jax
import numpy as np

from sparse_prefix.placement import reference_solve, solve
from sparse_prefix.placement.dp import search_levels
from sparse_prefix.placement.solver import bucket


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
        reference_max: int, grid: int = 1) -> list[dict]:
    """One row per (N, M): JAX compile / warm median, reference median, speedup, agreement."""
    rows = []
    for n in sizes:
        pmf = bench_pmf(n)
        for budget in budgets:
            start = time.perf_counter()
            solve(pmf, budget, method=method, grid=grid)
            compile_s = time.perf_counter() - start
            times, ours = timed(lambda: solve(pmf, budget, method=method, grid=grid), repeats)
            row = dict(n=n, budget=budget, grid=grid, method=method,
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
    parser.add_argument("--json", default=None, help="write the rows and the machine to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    sizes = [int(x) for x in args.sizes.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    device = jax.devices(args.device)[0] if args.device else jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; "
          f"JAX: median of {args.repeats} warm runs; reference: median of "
          f"{args.reference_repeats if args.reference_repeats is not None else '5 / 3 / 1 (N <= 256 / 4096 / more)'} runs")
    print(HEADER)
    with jax.default_device(device):
        rows = run(sizes, budgets, args.method, args.repeats, args.reference_repeats, args.reference_max,
                   args.grid)
    if args.json:
        meta = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                    machine=platform.machine(), python=platform.python_version(),
                    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        with open(args.json, "w") as handle:
            json.dump(dict(meta=meta, rows=rows), handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
