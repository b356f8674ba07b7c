"""Where a prefill's device time goes: a jax.profiler trace of warm calls, summarised per kernel.

    python -m sparse_prefix.experiments.profile_prefill --preset mamba2-1.3b --length 8192 \
        [--emit 0,8] [--chunk-size 256 --chunks-per-step 8] [--backend chunked|pallas] [--top 30] \
        [--trace-dir DIR] [--hlo-out FILE.gz] [--inputs fresh|stable] [--engine-hit OVERLAP]

For each checkpoint count in `--emit`, runs the public `model.prefill` twice to warm up (from states
made beforehand), then `--calls` times under `jax.profiler.trace`. ``--inputs fresh`` (default)
gives every call a state of its own, donated (a state's buffers land at new addresses each call);
``--inputs stable`` builds the model without donation and passes the same state every call (the
addresses stay put, as on the Engine's fused path, whose store and recycled scratch KV keep them), so
the two show what moving buffers cost (XLA re-patches its command buffers when addresses change).
It then reads the trace the profiler writes (`*.trace.json.gz`, Chrome trace format) and prints:
  * device kernels grouped by coarse kind (GEMM, elementwise/loop fusion, reduction, copy) and by name
    (time per call, count per call, share), from the GPU *stream* threads only (the derived "XLA Ops" /
    "XLA Modules" lines of the same process repeat the kernels' time and are left out);
  * device busy time against the device span of each call and the wall time: a span much longer
    than the busy time means the GPU idles between launches (host-bound or synchronising);
  * the largest idle gaps between consecutive kernels, with the kernels either side;
  * the host events with the most total time (dispatch, command-buffer updates, syncs).
``--engine-hit OVERLAP`` traces the serving path instead: an Engine stores a checkpoint at OVERLAP x
L (on the chunk grid), then `--calls` hits that resume there are traced, and the engine's own median
timings per hit follow the summary (dispatch = `prepare_prefill` plus the program's launch, the host
time XLA's command buffers take; wait = what is left of the device work after the commit).
``--drop-answers`` drops each answer before the next hit instead of holding it, as a server would.
That tests whether the graph updates come from outputs and temporaries moving between calls.
``--hlo-out FILE[.gz]`` also writes the prefill program's optimised HLO (one file: what XLA fused,
the layouts it chose, where transposes and converts sit), e.g. to find the kernels a profile names.
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
import jax.numpy as jnp
import numpy as np

KINDS = (("gemm", re.compile(r"gemm|cublas|cutlass|matmul|dot|sm90_xmma|nvjet|xmma", re.I)),
         ("reduce", re.compile(r"reduce|reduction", re.I)),
         ("copy/scatter/dus", re.compile(r"copy|scatter|dynamic.update|dynamic_update|memset|memcpy"
                                         r"|transpose|concatenate", re.I)),
         ("fusion (elementwise)", re.compile(r"fusion|loop_|input_", re.I)))
DERIVED_LINES = re.compile(r"XLA Ops|XLA Modules|Steps|Framework|Source|TraceMe|Launch Stats", re.I)


def kind_of(name: str) -> str:
    """A coarse kind for a kernel name."""
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def load_trace(trace_dir: str) -> list[dict]:
    """The events of the newest `*.trace.json.gz` under trace_dir (the profiler's Chrome trace)."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(paths[-1], "rt") as handle:
        trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def split_events(events: list[dict]) -> tuple[list[dict], list[dict], dict]:
    """(device kernel events, host events, names) from a trace's events.

    Device processes are those named like '/device:GPU:0' (any 'GPU', 'TPU' or 'device:'); their
    kernels live on threads named 'Stream ...' (CUPTI activity); derived lines ('XLA Ops', 'XLA
    Modules', ...) are dropped. If a device process has no 'Stream' thread, every non-derived
    thread of it counts. Everything on other processes is a host event.
    """
    process_names, thread_names = {}, {}
    for event in events:
        if event.get("ph") != "M":
            continue
        name = str(event.get("args", {}).get("name", ""))
        if event.get("name") == "process_name":
            process_names[event["pid"]] = name
        elif event.get("name") == "thread_name":
            thread_names[(event["pid"], event.get("tid"))] = name
    device_pids = {pid for pid, name in process_names.items()
                   if re.search(r"GPU|TPU|device:", name) and not re.search(r"host", name, re.I)}
    kernel_threads = set()
    for pid in device_pids:
        threads = {key for key, name in thread_names.items() if key[0] == pid}
        streams = {key for key in threads if re.search(r"stream", thread_names[key], re.I)}
        kernel_threads |= streams or {key for key in threads
                                      if not DERIVED_LINES.search(thread_names[key])}
    complete = [event for event in events if event.get("ph") == "X" and "dur" in event]
    device = [event for event in complete if (event.get("pid"), event.get("tid")) in kernel_threads]
    host = [event for event in complete if event.get("pid") not in device_pids]
    names = {"processes": sorted(set(process_names.values())),
             "kernel_threads": sorted({thread_names[key] for key in kernel_threads})}
    return device, host, names


def call_windows(device: list[dict], calls: int, min_gap_us: float) -> list[tuple[float, float]]:
    """(start, end) in us of each call's device activity: the kernels cut at the `calls - 1` widest
    gaps (each >= min_gap_us), or one window when the gaps are too small to tell the calls apart."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in device)
    if not spans:
        return []
    gaps, end = [], spans[0][1]
    for index in range(1, len(spans)):
        gaps.append((spans[index][0] - end, index))
        end = max(end, spans[index][1])
    cuts = sorted(index for gap, index in sorted(gaps, reverse=True)[:calls - 1] if gap >= min_gap_us)
    windows, first = [], 0
    for cut in cuts + [len(spans)]:
        windows.append((spans[first][0], max(e for _, e in spans[first:cut])))
        first = cut
    return windows


def summarise(device: list[dict], host: list[dict], calls: int, wall_s: float, top: int) -> None:
    """Print per-kind and per-name device time per call, spans, idle gaps and top host events."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in device:
        by_name[event["name"]].append(float(event["dur"]))
    total = sum(sum(v) for v in by_name.values()) or 1.0
    windows = call_windows(device, calls, min_gap_us=200.0)
    span = sum(end - start for start, end in windows)
    print(f"device busy {total / 1e3 / calls:.2f} ms per call, device span {span / 1e3 / max(len(windows), 1):.2f}"
          f" ms per call ({len(windows)} windows), wall {wall_s * 1e3 / calls:.2f} ms per call, "
          f"{len(device) / calls:.0f} kernels per call")
    kinds: dict[str, float] = collections.Counter()
    for name, durations in by_name.items():
        kinds[kind_of(name)] += sum(durations)
    for kind, value in sorted(kinds.items(), key=lambda item: -item[1]):
        print(f"  {kind:22s} {value / 1e3 / calls:9.2f} ms  {value / total:6.1%}")
    print(f"\n{'kernel':80s} {'ms/call':>9s} {'n/call':>7s} {'us each':>8s} {'share':>6s}")
    for name, durations in sorted(by_name.items(), key=lambda item: -sum(item[1]))[:top]:
        print(f"{name[:80]:80s} {sum(durations) / 1e3 / calls:9.3f} {len(durations) / calls:7.1f} "
              f"{np.mean(durations):8.1f} {sum(durations) / total:6.1%}")
    ordered = sorted(device, key=lambda e: float(e["ts"]))
    gaps = []
    for before, after in zip(ordered, ordered[1:]):
        gap = float(after["ts"]) - (float(before["ts"]) + float(before["dur"]))
        gaps.append((gap, before["name"], after["name"]))
    idle = sum(g for g, _, _ in gaps if g > 0)
    print(f"\nidle between kernels: {idle / 1e3 / calls:.2f} ms per call (incl. between calls); "
          f"gaps > 50 us: {sum(1 for g in gaps if g[0] > 50) / calls:.1f} per call; largest:")
    for gap, before, after in sorted(gaps, reverse=True)[:min(top, 12)]:
        print(f"  {gap / 1e3:8.3f} ms  after {before[:50]:50s} before {after[:50]}")
    host_by_name: dict[str, list[float]] = collections.defaultdict(list)
    for event in host:
        host_by_name[event["name"]].append(float(event["dur"]))
    print(f"\n{'host event':80s} {'ms/call':>9s} {'n/call':>7s}")
    for name, durations in sorted(host_by_name.items(), key=lambda item: -sum(item[1]))[:top]:
        print(f"{name[:80]:80s} {sum(durations) / 1e3 / calls:9.3f} {len(durations) / calls:7.1f}")
    updates = sum(sum(d) for name, d in host_by_name.items() if "command_buffer::update" in name)
    executes = sum(sum(d) for name, d in host_by_name.items()                 # not ...ExecuteHelper...
                   if re.match(r"CommonPjRtLoadedExecutable::Execute( |$)", name))
    print(f"host: XLA Execute {executes / 1e3 / calls:.3f} ms per call, of which command-buffer updates "
          f"{updates / 1e3 / calls:.3f} ms (re-recorded graphs: buffers moved since the last call)")


INPUTS = ("fresh", "stable")


def undonated(model):
    """`model` rebuilt with `donate_state=False` (its other settings kept), for `--inputs stable`."""
    family = getattr(model, "family", None)
    if family == "hybrid":
        return type(model)(model.config, backend=model.backend, min_checkpoint_slots=model.min_checkpoint_slots,
                           donate_state=False, step_loop=model.step_loop, fit_steps=model.fit_steps,
                           gemm=model.gemm, command_buffers=model.command_buffers)
    if family == "mamba2":
        return type(model)(model.config, min_checkpoint_slots=model.min_checkpoint_slots, donate_state=False,
                           step_loop=model.step_loop, command_buffers=model.command_buffers)
    raise TypeError(f"--inputs stable needs a hybrid or mamba2 model, got {type(model).__name__}")


def profile(model, params, length: int, emit: int, calls: int, top: int, trace_dir: str | None,
            inputs: str = "fresh") -> None:
    """Trace `calls` warm prefills of `length` random tokens with `emit` on-grid checkpoints, each
    from a fresh donated state (`inputs` "fresh") or all from one state (`inputs` "stable": `model`
    must not donate, see `undonated`)."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (1, length), dtype=np.int32)
    grid = model.chunk_size
    positions = np.unique(np.linspace(0, length, emit + 2)[1:-1].astype(np.int64)
                          // grid * grid) if emit else np.zeros(0, np.int64)
    checkpoints = positions[positions > 0].astype(np.int32)
    states = [model.init_state(1) for _ in range(1 if inputs == "stable" else calls + 2)]
    jax.block_until_ready(states)

    def call():
        state = states[0] if inputs == "stable" else states.pop()
        logits, final, emitted = model.prefill(params, tokens, state, checkpoints)
        jax.block_until_ready((logits, final, emitted))

    call()
    call()
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="sp-trace-")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(calls):
            call()
    wall = time.perf_counter() - start
    device, host, names = split_events(load_trace(trace_dir))
    cfg = model.config
    layers = getattr(cfg, "n_layer", None) or len(getattr(cfg, "pattern", ""))
    print(f"\n=== profile {layers}-layer d={cfg.d_model} L={length} "
          f"K={len(checkpoints)} C={model.chunk_size} G={getattr(model, 'chunks_per_step', 1)} inputs={inputs} "
          f"device={jax.devices()[0].device_kind}")
    print(f"trace processes: {names['processes']}; kernel threads: {names['kernel_threads']}")
    summarise(device, host, calls, wall, top)


def engine_hit_requests(length: int, resume: int, vocab_size: int, calls: int, seed: int = 0
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """(base int32[L], hits: `calls` int32[L]) where every hit shares exactly `resume` tokens with
    the base and differs from it and from each other right after (0 < resume < L)."""
    if not 0 < resume < length:
        raise ValueError(f"resume must lie in 1..{length - 1}, got {resume}")
    if calls >= vocab_size:
        raise ValueError(f"calls must be below the vocabulary ({vocab_size}) for distinct hits, got {calls}")
    rng = np.random.default_rng(seed)
    base = rng.integers(0, vocab_size, size=length, dtype=np.int32)
    hits = []
    for i in range(calls):
        hit = base.copy()
        hit[resume:] = rng.integers(0, vocab_size, size=length - resume, dtype=np.int32)
        hit[resume] = (base[resume] + 1 + i) % vocab_size     # diverges at `resume`, from all others too
        hits.append(hit)
    return base, hits


def serve_engine_hits(engine, base: np.ndarray, hits: list[np.ndarray], resume: int, *, before=None,
                      hold_answers: bool = True):
    """Serve `base` with a checkpoint hinted at `resume`, then every hit (each must resume there);
    `before(i)` runs before hit i (e.g. to start a trace). Returns each hit's `RequestStats.timings`.

    `hold_answers` keeps each answer alive until the next hit has been served, as a replay (or a
    server handing answers on) does; False drops it first, so the device allocator sees the same
    live buffers at every call. With XLA command buffers on, buffers that land at other addresses
    than in the previous call make XLA update the recorded graph (`command_buffer::update`), and an
    answer held across calls shifts where the next call's outputs and temporaries go."""
    engine.prefill(base, hints=[resume])
    timings = []
    result = None
    for i, hit in enumerate(hits):
        if not hold_answers:
            result = None
        if before is not None:
            before(i)
        result = engine.prefill(hit)
        jax.block_until_ready(result.last_logits)
        if result.stats.resume_position != resume:
            raise RuntimeError(f"hit {i} resumed at {result.stats.resume_position}, not {resume}")
        timings.append(result.stats.timings)
    return timings


def profile_engine_hits(model, params, length: int, overlap: float, calls: int, top: int,
                        trace_dir: str | None, hold_answers: bool = True) -> None:
    """Trace `calls` warm Engine hits of `length` tokens resuming at `overlap` of them (the serving
    path: plan, fused restore + prefill, commit), summarised like a prefill, plus the engine's own
    median timings per hit (plan, dispatch -- `prepare_prefill` and the program's launch -- commit,
    wait)."""
    from sparse_prefix.engine import Engine
    from sparse_prefix.experiments.bench_resume import resume_position

    resume = resume_position(length, overlap, int(model.chunk_size))
    warm = 2
    base, hits = engine_hit_requests(length, resume, int(model.vocab_size), calls + warm)
    engine = Engine(model, params, policy="none+hints", eviction="lru", capacity_entries=calls + warm + 2,
                    background_resolve=False)
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="sp-engine-trace-")
    session = {}

    def before(i):
        if i == warm:
            session["start"] = time.perf_counter()
            session["trace"] = jax.profiler.trace(trace_dir)
            session["trace"].__enter__()

    try:
        timings = serve_engine_hits(engine, base, hits, resume, before=before, hold_answers=hold_answers)
    finally:
        if "trace" in session:
            session["trace"].__exit__(None, None, None)
        engine.close()
    wall = time.perf_counter() - session["start"]
    device, host, names = split_events(load_trace(trace_dir))
    print(f"\n=== engine hits L={length} resumed at {resume} ({len(hits) - warm} traced, answers "
          f"{'held' if hold_answers else 'dropped'} across calls) fused={engine.fused} "
          f"device={jax.devices()[0].device_kind}")
    print(f"trace processes: {names['processes']}; kernel threads: {names['kernel_threads']}")
    summarise(device, host, calls, wall, top)
    measured = timings[warm:]
    print("engine timings per hit (median ms): " + ", ".join(
        f"{key} {1e3 * float(np.median([t[key] for t in measured])):.3f}"
        for key in ("plan", "dispatch", "commit", "wait", "total")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mamba2-1.3b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--emit", default="0", help="comma list of on-grid checkpoint counts")
    parser.add_argument("--chunk-size", type=int, default=0)
    parser.add_argument("--chunks-per-step", type=int, default=0)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--trace-dir", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default=None,
                        help="Mamba2 SSD backend (chunked, pallas, sequential) or hybrid layer loop (scan, "
                             "unroll); default: the preset's")
    parser.add_argument("--engine-hit", type=float, default=None, metavar="OVERLAP",
                        help="profile Engine hits of --length tokens resuming at this share of them "
                             "(e.g. 0.9) instead of bare prefills")
    parser.add_argument("--drop-answers", action="store_true",
                        help="with --engine-hit: drop each answer before the next hit (the device "
                             "allocator then sees the same live buffers at every call)")
    parser.add_argument("--hlo-out", default=None, metavar="FILE",
                        help="also write the optimised HLO of the prefill program (L tokens, no checkpoints) "
                             "to FILE (gzipped when it ends in .gz): fusions, layouts, loops")
    parser.add_argument("--inputs", choices=INPUTS, default="fresh",
                        help="fresh: a new donated state every call; stable: one state, no donation "
                             "(fixed buffer addresses, as the Engine keeps them)")
    args = parser.parse_args(argv)

    from sparse_prefix.experiments.bench_prefill import preset_model
    model, params = preset_model(args.preset, jnp.dtype(args.dtype),
                                  (args.chunk_size or None, args.chunks_per_step or None), args.backend)
    if args.engine_hit is not None:
        profile_engine_hits(model, params, args.length, args.engine_hit, args.calls, args.top, args.trace_dir,
                            hold_answers=not args.drop_answers)
        return 0
    if args.inputs == "stable":
        model = undonated(model)
    for emit in [int(x) for x in args.emit.split(",") if x]:
        trace_dir = os.path.join(args.trace_dir, f"emit{emit}") if args.trace_dir else None
        profile(model, params, args.length, emit, args.calls, args.top, trace_dir, args.inputs)
    if args.hlo_out:
        text = compiled_hlo(model, params, args.length)
        opener = gzip.open if args.hlo_out.endswith(".gz") else open
        with opener(args.hlo_out, "wt") as handle:
            handle.write(text)
        print(f"wrote the optimised HLO ({len(text) / 1e6:.1f} MB of text) to {args.hlo_out}")
    return 0


def compiled_hlo(model, params, length: int) -> str:
    """The optimised HLO text of `model`'s prefill program for one row of `length` tokens and no
    checkpoints, compiled as the model compiles it (`FusablePrefill`: same program, same padding)."""
    tokens = np.zeros((1, length), np.int32)
    prepared = model.prepare_prefill(tokens, np.zeros((0,), np.int32))
    tokens_np, checkpoints, lengths = prepared
    state = model.init_state(1)
    lowered = jax.jit(model.prefill_program).lower(params, tokens_np, state, checkpoints, lengths)
    return lowered.compile().as_text()


if __name__ == "__main__":
    raise SystemExit(main())
