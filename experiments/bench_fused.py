"""Engine hits with and without the fused restore (`Engine(fuse_restore=)`), alternating, one process.

    python -m sparse_prefix.experiments.bench_fused --preset qwen3.5-0.8b --length 8192 --overlap 0.5

Two engines (policy ``none+hints``) serve the same hit: a request of L tokens sharing its first r = o L
(snapped to the chunk grid) with a request stored before with a hint at r. Prints the median hit time
and the engine's host split (plan / restore / dispatch / commit / wait) of each, over `--repeats`
alternating rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    from sparse_prefix.engine import Engine, serving_params
    from sparse_prefix.experiments.bench_resume import _distinct_tails, resume_position
    from sparse_prefix.models import create

    model, params = create(args.preset, dtype=args.dtype)
    params = serving_params(model, params)
    r = resume_position(args.length, args.overlap, model.chunk_size)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, model.vocab_size, r, dtype=np.int32)
    tail_a, tail_b = _distinct_tails(rng, model.vocab_size, args.length - r)
    engines = {}
    for fused in (True, False):
        begin = time.perf_counter()
        engine = Engine(model, params, policy="none+hints", capacity_entries=4, background_resolve=False,
                        fuse_restore=fused)
        engine.warmup([1])
        engine.prefill(np.concatenate([prefix, tail_a]), hints=[r])
        engines[fused] = engine
        print(f"fused={fused}: warm in {time.perf_counter() - begin:.1f} s", flush=True)
    request = np.concatenate([prefix, tail_b])
    times = {True: [], False: []}
    splits = {True: [], False: []}
    for round_ in range(args.repeats + 1):
        for fused, engine in engines.items():
            begin = time.perf_counter()
            result = engine.prefill(request)
            jax.block_until_ready(result.last_logits)
            if round_:
                times[fused].append(time.perf_counter() - begin)
                splits[fused].append(result.stats.timings)
            assert result.stats.resume_position == r
    print(f"device: {jax.devices()[0].device_kind}; {args.preset} L={args.length} r={r}")
    for fused in (True, False):
        split = {key: statistics.median(s[key] for s in splits[fused]) * 1e3
                 for key in ("plan", "restore", "dispatch", "commit", "wait")}
        print(f"fused={fused!s:<5} hit {statistics.median(times[fused]) * 1e3:8.2f} ms  "
              + " ".join(f"{k} {v:.3f}" for k, v in split.items()))
    for engine in engines.values():
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
