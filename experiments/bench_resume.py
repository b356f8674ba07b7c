"""Resume speed through the Engine: time to answer at 50/90/98% overlap vs a full prefill, against the
cost-model ideal, and the engine's overhead on a hit (issue 7, "Resume" and "Engine overhead").

Run on the device machine (or CPU with tiny presets):

    python -m sparse_prefix.experiments.bench_resume --presets qwen3.5-0.8b,qwen3.5-0.8b-group \
        --length 8192 --overlaps 0.5,0.9,0.98 --repeats 10 --out results/resume.json

Per preset: the cost model t(n) = c0 + a n + b n^2 is calibrated on the same compiled prefill the
engine runs (`costmodel.calibrate`, lengths on the chunk grid up to `--length`). An Engine with policy
``none+hints`` (it stores exactly the hinted positions) then serves:

  * full: a request of L random tokens that shares nothing cached (median of `--repeats`);
  * per overlap o: r = o L snapped down to the chunk grid; request A = P + tail_A with a hint at r (its
    state at r is stored), then request B = P + tail_B (|P| = r, tails differ from their first token)
    is timed `--repeats` times; each B resumes at r and recomputes L - r tokens.

Measured speedup = full / hit; the cost-model ideal is t(L) / (c0 + a (L - r) + b (L^2 - r^2)) (see
`costmodel`); % of ideal = measured / ideal. The engine's overhead on a hit is the hit's time minus a
direct `model.prefill` of the same suffix from the same state at r (same program, state prepared
outside the timed region): index lookup, hashing, planning, the state gather, commit and the store
scatters. The direct call runs the very program the hit runs (the same checkpoint width: 0, as a hit
of ``none+hints`` without hints stores nothing). Every time is a warm median of calls synchronised on
the logits (`block_until_ready`).

Where a hit's time goes (printed per row, host clock, medians): plan (index lookup, hashing,
planning), restore (the gather's host work and dispatch), dispatch (`model.prefill` until it returned),
commit (index commit, scatter dispatch, KV recycling: it overlaps the prefill on the device), wait
(blocked on the logits); next to them the direct call's dispatch and wait, and the gather's device time
alone (a restore synchronised on its result). Host overhead = plan + restore + dispatch - direct
dispatch; a wait longer than the direct one is device time (the gather, or a slower program).

``--shrink`` runs a hybrid preset's layer pattern, chunking and max_length with tiny widths (d 32), so
a CPU shows the per-layer host costs of the 24-layer stack without its compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.experiments.costmodel import calibrate, default_lengths, max_relative_residual, time_calls

CHECKPOINT_SLOTS = 8

FUSE = {"auto": "auto", "yes": True, "no": False}     # --fuse-restore -> Engine(fuse_restore=)


def resume_position(length: int, overlap: float, chunk_size: int) -> int:
    """overlap * length snapped down to the chunk grid (at least one chunk, below length)."""
    if not 0.0 < overlap < 1.0:
        raise ValueError(f"overlap must lie in (0, 1), got {overlap}")
    r = int(overlap * length) // chunk_size * chunk_size
    if not 0 < r < length:
        raise ValueError(f"overlap {overlap} of length {length} leaves no resume point on the grid of {chunk_size}")
    return r


def _distinct_tails(rng: np.random.Generator, vocab: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two random tails of `size` ids whose first ids differ (so the shared prefix ends exactly)."""
    a = rng.integers(0, vocab, size=size, dtype=np.int32)
    b = rng.integers(0, vocab, size=size, dtype=np.int32)
    b[0] = (a[0] + 1) % vocab
    return a, b


def shrink(model):
    """A hybrid model of the same layer pattern, chunking and max_length with tiny widths (d = 32,
    vocabulary 512, one GDN head pair of 16, attention 2 q / 1 kv head of 16), float32: CPU runs that
    keep every per-layer and per-leaf cost of the engine and drop the model's compute."""
    import dataclasses

    from sparse_prefix.models.hybrid import HybridLM

    config = getattr(model, "config", None)
    if not isinstance(model, HybridLM) or config.mamba is not None:
        raise ValueError(f"--shrink supports hybrid G/A presets only, got {type(model).__name__}")
    gdn = config.gdn and dataclasses.replace(config.gdn, d_model=32, num_k_heads=1, num_v_heads=1,
                                             head_k_dim=16, head_v_dim=16)
    attention = config.attention and dataclasses.replace(config.attention, d_model=32, num_heads=2,
                                                         num_kv_heads=1, head_dim=16,
                                                         rotary_dim=min(config.attention.rotary_dim, 8))
    tiny = dataclasses.replace(config, vocab_size=512, d_model=32, d_ff=64, gdn=gdn, attention=attention,
                               dtype="float32")
    return HybridLM(tiny, dtype=jnp.float32)


def _engine_times(engine, tokens: np.ndarray, namespace: str, repeats: int, expect_resume: int
                  ) -> tuple[list[float], dict[str, float]]:
    """Wall seconds of `repeats` warm engine.prefill calls and the median of each engine timing."""
    def call(_):
        result = engine.prefill(tokens, namespace=namespace)
        jax.block_until_ready(result.last_logits)
        if result.stats.resume_position != expect_resume:
            raise RuntimeError(f"expected a resume at {expect_resume}, the engine resumed at "
                               f"{result.stats.resume_position}")
        stats.append(result.stats.timings)

    stats: list = []
    times = time_calls(lambda: None, call, repeats, warmup=1)
    stats = stats[1:]
    return times, {key: statistics.median(s[key] for s in stats) for key in stats[0]}


def _direct_times(model, params, prefix: np.ndarray, suffix: np.ndarray, repeats: int, slots: int = 0
                  ) -> tuple[list[float], float]:
    """Wall seconds of model.prefill(suffix) from the state after `prefix` (engine shapes, `slots`
    checkpoint slots: the width of the engine's call) and the median host time until it returned."""
    width = int(model.max_length)

    def padded(tokens):
        return np.pad(tokens[None, :], ((0, 0), (0, width - tokens.size)))

    _, state, _ = model.prefill(params, padded(prefix), model.init_state(1),
                                np.zeros((1, CHECKPOINT_SLOTS), np.int32), np.asarray([prefix.size], np.int32))
    state = jax.block_until_ready(state)
    suffix_tokens, suffix_length = padded(suffix), np.asarray([suffix.size], np.int32)
    checkpoints = np.zeros((1, slots), np.int32)
    dispatch: list[float] = []

    def setup():
        return jax.block_until_ready(jax.tree_util.tree_map(jnp.copy, state))

    def call(fresh):
        start = time.perf_counter()
        logits, _, _ = model.prefill(params, suffix_tokens, fresh, checkpoints, suffix_length)
        dispatch.append(time.perf_counter() - start)
        jax.block_until_ready(logits)

    times = time_calls(setup, call, repeats, warmup=1)
    return times, statistics.median(dispatch[1:])


def _gather_times(engine, namespace: str, tokens: np.ndarray, repeats: int) -> float:
    """Median seconds of the hit's restore alone, synchronised on its result (the gather's device time
    plus its dispatch); the scratch KV goes back to the store each time."""
    times = []
    for _ in range(repeats + 1):
        plan = engine.index.plan(tokens, group=namespace, pin=True)
        try:
            start = time.perf_counter()
            state = jax.block_until_ready(engine._restore([plan]))
            times.append(time.perf_counter() - start)
            engine.store.recycle(state.kv)
        finally:
            engine.index.abort(plan)
    return statistics.median(times[1:])


def bench_preset(preset: str, length: int, overlaps: list[float], repeats: int, dtype, seed: int = 0,
                 calibration_lengths: list[int] | None = None, shrunk: bool = False,
                 fuse_restore: bool | str = "auto") -> dict:
    """Calibration, the full prefill and every overlap's hit for one preset (see the module doc).

    Args:
      preset: a model preset.  length: L.  overlaps: shares of L in (0, 1).  repeats: timed calls each.
      dtype: the compute dtype.  seed: token ids.  calibration_lengths: the cost model's lengths
        (default `costmodel.default_lengths(length, chunk)`).  shrunk: run `shrink(preset)` instead.
      fuse_restore: `Engine(fuse_restore=)` (the gather traced into the prefill's program).

    Returns:
      {"preset", "calibration", "full_s", "full_times_s", "rows": one dict per overlap}; a row's
      "split_s" holds the hit's host split and the direct call's (module doc).
    """
    from sparse_prefix.engine import Engine, serving_params
    from sparse_prefix.models import create
    from sparse_prefix.models.registry import build

    if shrunk:
        model = shrink(build(preset, dtype=dtype))
        params = model.init_params(jax.random.PRNGKey(seed))
    else:
        model, params = create(preset, dtype=dtype)
    params = serving_params(model, params)          # the Engine's layout, for every call
    chunk = int(model.chunk_size)
    if not chunk <= length <= model.max_length:
        raise ValueError(f"--length must lie in {chunk}..{model.max_length} for {preset}, got {length}")
    lengths = default_lengths(length, chunk) if calibration_lengths is None else calibration_lengths
    calibration = calibrate(model, params, lengths, repeats=repeats,
                            checkpoint_slots=CHECKPOINT_SLOTS, seed=seed)
    cost = calibration.cost
    rng = np.random.default_rng(seed)
    vocab = int(model.vocab_size)
    engine = Engine(model, params, policy="none+hints", eviction="lru", capacity_entries=8,
                    background_resolve=False, min_checkpoint_slots=CHECKPOINT_SLOTS,
                    fuse_restore=fuse_restore)
    try:
        engine.warmup([1])
        full = rng.integers(0, vocab, size=length, dtype=np.int32)
        full_times, _ = _engine_times(engine, full, "full", repeats, 0)
        full_s = statistics.median(full_times)
        rows = []
        for overlap in overlaps:
            r = resume_position(length, overlap, chunk)
            prefix = rng.integers(0, vocab, size=r, dtype=np.int32)
            tail_a, tail_b = _distinct_tails(rng, vocab, length - r)
            namespace = f"overlap-{overlap}"
            seeded = engine.prefill(np.concatenate([prefix, tail_a]), hints=[r], namespace=namespace)
            if seeded.stats.checkpoints_stored != 1:
                raise RuntimeError(f"the seeding request stored {seeded.stats.checkpoints_stored} states, not 1")
            request = np.concatenate([prefix, tail_b])
            hit_times, timings = _engine_times(engine, request, namespace, repeats, r)
            direct_times, direct_dispatch = _direct_times(model, params, prefix, tail_b, repeats, slots=0)
            gather_s = _gather_times(engine, namespace, request, repeats)
            hit_s, direct_s = statistics.median(hit_times), statistics.median(direct_times)
            split = {key: timings[key] for key in ("plan", "restore", "dispatch", "commit", "wait")}
            split.update(direct_dispatch=direct_dispatch, direct_wait=direct_s - direct_dispatch,
                         gather=gather_s,
                         host_overhead=timings["plan"] + timings["restore"] + timings["dispatch"]
                         - direct_dispatch)
            ideal = cost.full(length) / cost.resume(length, r)
            rows.append({"preset": preset, "length": length, "overlap": overlap, "resume": r,
                         "full_s": full_s, "hit_s": hit_s, "hit_min_s": min(hit_times),
                         "speedup": full_s / hit_s, "ideal_speedup": ideal,
                         "pct_of_ideal": 100.0 * full_s / hit_s / ideal, "token_ideal": length / (length - r),
                         "direct_s": direct_s, "overhead_s": hit_s - direct_s,
                         "overhead_pct": 100.0 * (hit_s - direct_s) / hit_s,
                         "engine_timings_s": {key: timings[key] for key in
                                              ("plan", "restore", "prefill", "commit", "total")},
                         "split_s": split})
    finally:
        engine.close()
    return {"preset": preset, "calibration": calibration.as_dict(), "full_s": full_s,
            "full_times_s": full_times, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="qwen3.5-0.8b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--overlaps", default="0.5,0.9,0.98")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    parser.add_argument("--shrink", action="store_true",
                        help="tiny widths, the presets' layer pattern and chunking (the engine's host cost on a CPU)")
    parser.add_argument("--fuse-restore", choices=("auto", "yes", "no"), default="auto",
                        help="Engine(fuse_restore=): the store's gather traced into the prefill's program "
                             "(auto: on a GPU)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
    overlaps = [float(x) for x in args.overlaps.split(",")]
    results = []
    for preset in args.presets.split(","):
        started = time.perf_counter()
        result = bench_preset(preset, args.length, overlaps, args.repeats, jnp.dtype(args.dtype),
                              shrunk=args.shrink, fuse_restore=FUSE[args.fuse_restore])
        fit = result["calibration"]["cost"]
        print(f"{preset}: t(n) = {fit['c0'] * 1e3:.2f} ms + {fit['a'] * 1e6:.3f} us n + {fit['b'] * 1e9:.4f} ns n^2"
              f" (max residual {result['calibration']['max_relative_residual']:.1%}); full prefill of "
              f"{args.length}: {result['full_s'] * 1e3:.2f} ms; {time.perf_counter() - started:.0f} s", flush=True)
        results.append(result)
    print(f"\n{'preset':20s} {'overlap':>7s} {'r':>6s} {'hit ms':>9s} {'speedup':>8s} {'ideal':>7s} "
          f"{'% ideal':>7s} {'tokens':>7s} {'direct ms':>9s} {'overhead':>8s}")
    for result in results:
        for row in result["rows"]:
            print(f"{row['preset']:20s} {row['overlap']:7.0%} {row['resume']:6d} {row['hit_s'] * 1e3:9.2f} "
                  f"{row['speedup']:7.2f}x {row['ideal_speedup']:6.2f}x {row['pct_of_ideal']:7.1f} "
                  f"{row['token_ideal']:6.2f}x {row['direct_s'] * 1e3:9.2f} {row['overhead_pct']:7.2f}%")
    print(f"\nhit split, ms (host clock, medians): engine plan / restore / dispatch / commit / wait vs the "
          f"direct call's dispatch / wait; gather = a restore alone, synchronised")
    print(f"{'preset':20s} {'overlap':>7s} {'plan':>6s} {'restore':>7s} {'dispatch':>8s} {'commit':>6s} "
          f"{'wait':>8s} | {'dispatch':>8s} {'wait':>8s} | {'gather':>6s} {'host +':>6s}")
    for result in results:
        for row in result["rows"]:
            t = {key: value * 1e3 for key, value in row["split_s"].items()}
            print(f"{row['preset']:20s} {row['overlap']:7.0%} {t['plan']:6.3f} {t['restore']:7.3f} "
                  f"{t['dispatch']:8.3f} {t['commit']:6.3f} {t['wait']:8.2f} | {t['direct_dispatch']:8.3f} "
                  f"{t['direct_wait']:8.2f} | {t['gather']:6.3f} {t['host_overhead']:6.3f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "length": args.length,
                       "repeats": args.repeats, "dtype": args.dtype, "presets": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
