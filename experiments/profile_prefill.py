"""Where a prefill's device time goes: a jax.profiler trace of warm calls, summarised per kernel.

    python -m sparse_prefix.experiments.profile_prefill --preset mamba2-1.3b --length 8192 \
        [--emit 0] [--chunk-size 256 --chunks-per-step 8] [--top 30] [--trace-dir DIR]

Runs the public `model.prefill` twice to warm up, then `--calls` times under
`jax.profiler.trace(..., create_perfetto_trace=True)`, reads the Perfetto JSON the profiler writes and
prints the device kernels grouped by name (total time, count, share) and by coarse kind (GEMM,
elementwise/loop fusion, reduction, copy/scatter/DUS, other), plus the device time against the wall
time (a large gap means the device idles between launches).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np

KINDS = (("gemm", re.compile(r"gemm|cublas|cutlass|matmul|dot|sm90_xmma|nvjet", re.I)),
         ("reduce", re.compile(r"reduce|reduction", re.I)),
         ("copy/scatter/dus", re.compile(r"copy|scatter|dynamic.update|dynamic_update|memset|transpose",
                                         re.I)),
         ("fusion (elementwise)", re.compile(r"fusion|loop_|input_", re.I)))


def kind_of(name: str) -> str:
    """A coarse kind for a kernel name."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def device_events(trace_dir: str) -> list[dict]:
    """Complete ('X') events on GPU/TPU device processes of the newest Perfetto trace under trace_dir."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as handle:
        trace = json.load(handle)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    device_pids = {event["pid"] for event in events
                   if event.get("ph") == "M" and event.get("name") == "process_name"
                   and re.search(r"GPU|TPU|device:", str(event.get("args", {}).get("name", "")))}
    return [event for event in events if event.get("ph") == "X" and event.get("pid") in device_pids
            and "dur" in event]


def summarise(events: list[dict], calls: int, wall_s: float, top: int) -> None:
    """Print per-name and per-kind device time (per call)."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in events:
        by_name[event["name"]].append(float(event["dur"]))
    total = sum(sum(v) for v in by_name.values())
    print(f"device kernel time {total / 1e3 / calls:.2f} ms per call, wall {wall_s * 1e3 / calls:.2f} ms "
          f"per call, {len(events) / calls:.0f} kernels per call")
    kinds: dict[str, float] = collections.Counter()
    for name, durations in by_name.items():
        kinds[kind_of(name)] += sum(durations)
    for kind, value in sorted(kinds.items(), key=lambda item: -item[1]):
        print(f"  {kind:22s} {value / 1e3 / calls:9.2f} ms  {value / total:6.1%}")
    print(f"\n{'kernel':70s} {'ms/call':>9s} {'count':>7s} {'share':>6s}")
    for name, durations in sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]:
        print(f"{name[:70]:70s} {sum(durations) / 1e3 / calls:9.3f} {len(durations) // calls:7d} "
              f"{sum(durations) / total:6.1%}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mamba2-1.3b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--emit", type=int, default=0, help="on-grid checkpoints per call")
    parser.add_argument("--chunk-size", type=int, default=0)
    parser.add_argument("--chunks-per-step", type=int, default=0)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    from sparse_prefix.models import create
    model, params = create(args.preset, dtype=np.dtype(args.dtype) if args.dtype != "bfloat16"
                           else jax.numpy.bfloat16)
    if args.chunk_size or args.chunks_per_step:
        model = model.with_chunking(args.chunk_size or model.chunk_size,
                                    args.chunks_per_step or model.config.chunks_per_step)
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (1, args.length), dtype=np.int32)
    grid = model.chunk_size
    positions = np.unique(np.linspace(0, args.length, args.emit + 2)[1:-1].astype(np.int64)
                          // grid * grid) if args.emit else np.zeros(0, np.int64)
    checkpoints = positions[positions > 0].astype(np.int32)

    def call():
        state = model.init_state(1)
        logits, final, emitted = model.prefill(params, tokens, state, checkpoints)
        jax.block_until_ready((logits, final, emitted))

    call()
    call()
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="sp-trace-")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.calls):
            call()
    wall = time.perf_counter() - start
    print(f"{args.preset} L={args.length} K={len(checkpoints)} C={model.chunk_size} "
          f"device={jax.devices()[0].device_kind}")
    summarise(device_events(trace_dir), args.calls, wall, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
