"""Prefill speed on one accelerator: tokens/s, model-FLOP utilisation, checkpoint-emission overhead.

Run on the device machine (or CPU with tiny presets):

    python -m sparse_prefix.experiments.bench_prefill --presets mamba2-130m,mamba2-1.3b \
        --lengths 2048,8192,16384 --emit 1,8,32 --peer --out results/prefill.json

Every timing is the warm median of `--repeats` calls of the public `model.prefill` (host-side checks
and padding included) on random tokens from a state made beforehand (the peer's forward starts from
none either), synchronised with `block_until_ready` on the logits, final state and checkpoints;
`init_state` is timed on its own (column init ms). Model FLOPs are
2 x non-embedding parameters x tokens, against a bf16 matmul measured in the same run. With `--peer`
the mamba2-jax package (Flax NNX; its jitted `forward` returns logits at every position) is timed on
the same shapes in the same run, when it can be imported.

Chunking sweep (models with `with_chunking`, i.e. Mamba2): ``--chunk-size 128,256
--chunks-per-step 4,8,16`` times every (C, G) pair (empty = the preset's own); ``--check-resume``
also checks, per (preset, C, G), that a prefill resumed at a multiple of C that is not a multiple
of G C reproduces the uncached final state and logits bitwise (same compiled program: no extra
compilation). ``--backend chunked,pallas`` repeats every timing, breakdown and resume check per Mamba2
SSD backend (`Mamba2MixerConfig.backend`; "pallas" falls back to "chunked" on shapes its kernels do
not take, see `models.ssd_pallas.supported`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.testing import resume_difference


def timed(fn, repeats: int, warmup: int = 2) -> list[float]:
    """Wall times (s) of `fn()` (which must block until its result is ready), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_rate(size: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul throughput in FLOP/s on random data."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
    b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
    dot = jax.jit(lambda x, y: x @ y)
    times = timed(lambda: dot(a, b).block_until_ready(), repeats)
    return 2 * size ** 3 / statistics.median(times)


def non_embedding_params(params) -> int:
    """Parameters outside the embedding / LM head (the 2·P·L FLOP convention)."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path).lower()
        if "embed" in name or "lm_head" in name:
            continue
        total += int(np.prod(leaf.shape))
    return total


COMMAND_BUFFERS: str | None = None   # --command-buffers: the Mamba2 models' setting (None: default)


def preset_model(preset: str, dtype, chunking: tuple[int | None, int | None] = (None, None),
           backend: str | None = None):
    """(model, params) of `preset`, re-chunked to (C, G) where given and the model supports it, and
    with its `backend` replaced where given: the SSD backend of a Mamba2 preset, or for a hybrid
    preset its parameter layout and layer loop ("per-layer": `HybridLM.per_layer_params`; "scan" /
    "unroll": the stacked params with `scan_layers` True / False; default: the preset's, stacked)."""
    from sparse_prefix.models import create
    model, params = create(preset, dtype=dtype)
    if any(value is not None for value in chunking) and hasattr(model, "with_chunking"):
        model = model.with_chunking(*chunking)
    hybrid = getattr(model, "family", None) == "hybrid"
    if backend and hybrid:
        if backend not in ("scan", "unroll", "per-layer"):
            raise ValueError(f"--backend for the hybrid {preset} is scan, unroll (stacked params) "
                             f"or per-layer (per_layer_params), got {backend!r}")
        if backend == "per-layer":
            return model, model.per_layer_params(params)
        return type(model)(dataclasses.replace(model.config, scan_layers=backend == "scan"),
                           backend=model.backend, min_checkpoint_slots=model.min_checkpoint_slots), params
    elif backend:
        model = type(model)(model.config.replace(backend=backend))
    if COMMAND_BUFFERS and getattr(model, "family", None) == "mamba2":
        model = type(model)(model.config, command_buffers=COMMAND_BUFFERS)
    from sparse_prefix.engine import serving_params
    return model, serving_params(model, params)          # the layout the Engine serves with


def _backend_of(model, params=None) -> str:
    """The Mamba2 SSD backend of a Mamba2 model; a hybrid's layout and layer loop (per-layer /
    scan / unroll)."""
    mixer = getattr(model.config, "mixer", None)
    if mixer is not None:
        return mixer.backend
    scan = getattr(model.config, "scan_layers", None)
    if isinstance(params, dict) and "per_layer" in params:
        return "per-layer"
    return "-" if scan is None else ("scan" if scan else "unroll")


def _chunking_of(model) -> dict:
    return {"chunk_size": int(model.chunk_size),
            "chunks_per_step": int(getattr(model, "chunks_per_step", 1))}


def check_resume(preset: str, length: int, dtype, chunking=(None, None), backend=None) -> dict:
    """Bitwise check on this device: prefill(all) vs prefill(prefix) + prefill(rest, from its state),
    split at a multiple of C that is not a multiple of G C (every chunk changes its group slot)."""
    model, params = preset_model(preset, dtype, chunking, backend)
    split, worst = resume_difference(model, params, length)
    return {"preset": preset, "length": length, "split": split, **_chunking_of(model),
            "backend": _backend_of(model, params), "bitwise": worst == 0.0, "max_abs_diff": worst}


def breakdown(preset: str, length: int, repeats: int, dtype, chunking=(None, None),
              backend: str | None = None) -> dict:
    """Where a Mamba2 prefill's time goes (ms, warm medians): `init_state`, `prefill` with a state made
    beforehand, one jitted group step (all layers, G chunks), one layer's group mixer, its in_proj
    matmul alone. prefill(L) - steps x step = the per-call overhead; step - layers x layer = the
    per-step overhead of the layer loop. Hybrid presets: `hybrid_breakdown` (`backend` must be None).
    """
    from sparse_prefix.models.mamba2 import mamba2_group_step, mamba2_mixer_group
    model, params = preset_model(preset, dtype, chunking, backend)
    if getattr(model, "family", None) == "hybrid":
        return hybrid_breakdown(model, params, preset, length, repeats)
    cfg = model.config
    group, chunk = cfg.chunks_per_step, cfg.chunk_size
    ms = lambda times: statistics.median(times) * 1e3  # noqa: E731
    out = {"preset": preset, "length": length, **_chunking_of(model)}
    out["init_state_ms"] = ms(timed(lambda: jax.block_until_ready(model.init_state(1)), repeats))
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, size=(1, length), dtype=np.int32)
    states = [model.init_state(1) for _ in range(repeats + 2)]
    out["prefill_ms"] = ms(timed(lambda: jax.block_until_ready(
        model.prefill(params, tokens, states.pop(), np.zeros((0,), np.int32))), repeats))
    step = jax.jit(lambda p, state, toks, valid: mamba2_group_step(p, cfg, state, toks, toks, valid,
                                                                   False)[:2], donate_argnums=1)
    carry = {"state": model.init_state(1)}
    step_tokens = jnp.asarray(tokens[:, :group * chunk].reshape(1, group, chunk)) \
        if length >= group * chunk else jnp.zeros((1, group, chunk), jnp.int32)
    all_valid = jnp.ones((1, group, chunk), bool)

    def one_step():
        carry["state"], hidden = step(params, carry["state"], step_tokens, all_valid)
        jax.block_until_ready(hidden)

    out["step_ms"] = ms(timed(one_step, repeats))
    layer = jax.tree_util.tree_map(lambda leaf: leaf[0], params.layers.mixer)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, group, chunk, cfg.d_model), cfg.compute_dtype)
    layer_state = model.init_state(1).recurrent[0]
    mixer = jax.jit(lambda p, x, s, v: mamba2_mixer_group(p, cfg.mixer, x, s, v)[:2])
    out["layer_ms"] = ms(timed(lambda: jax.block_until_ready(mixer(layer, x, layer_state, all_valid)),
                               repeats))
    proj = jax.jit(lambda x, w: jnp.einsum("...d,de->...e", x, w, preferred_element_type=jnp.float32
                                           ).astype(x.dtype))
    out["in_proj_ms"] = ms(timed(lambda: jax.block_until_ready(proj(x, layer.in_proj)), repeats))
    steps = -(-length // (group * chunk))
    out["call_overhead_ms"] = out["prefill_ms"] - steps * out["step_ms"]
    out["step_overhead_ms"] = out["step_ms"] - cfg.n_layer * out["layer_ms"]
    return out


def hybrid_breakdown(model, params, preset: str, length: int, repeats: int) -> dict:
    """Where a hybrid (GDN + attention) prefill's time goes (ms, warm medians): `init_state`, `prefill`
    with a state made beforehand, one jitted group step (all layers, G chunks) at the first and at
    the last group of L (attention reads more keys there), one GDN layer's group mixer, one attention
    layer's group mixer at the last group, the GDN qkv projection alone. prefill(L) - steps x mean
    step = the per-call overhead; step - layers' mixers = the MLPs, norms and layer loop."""
    from sparse_prefix.models.attention import attention_group
    from sparse_prefix.models.gated_deltanet import gdn_mixer_group
    cfg, stack = model.config, model.stack
    group, chunk = cfg.chunks_per_step, cfg.chunk_size
    width = group * chunk
    ms = lambda times: statistics.median(times) * 1e3  # noqa: E731
    out = {"preset": preset, "length": length, **_chunking_of(model)}
    out["init_state_ms"] = ms(timed(lambda: jax.block_until_ready(model.init_state(1)), repeats))
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, size=(1, length), dtype=np.int32)
    states = [model.init_state(1) for _ in range(repeats + 2)]
    out["prefill_ms"] = ms(timed(lambda: jax.block_until_ready(
        model.prefill(params, tokens, states.pop(), np.zeros((0,), np.int32))), repeats))
    step = jax.jit(lambda p, state, toks, pos, valid: stack.group_step(p, state, toks, pos, valid,
                                                                       False)[:2], donate_argnums=1)
    to_unit = jax.jit(stack.to_unit_state)
    steps = -(-length // width)
    step_tokens = jnp.zeros((1, group, chunk), jnp.int32)
    all_valid = jnp.ones((1, group, chunk), bool)
    offsets = jnp.arange(width, dtype=jnp.int32).reshape(1, group, chunk)
    for name, first in (("first_step_ms", 0), ("last_step_ms", (steps - 1) * width)):
        carry = {"state": to_unit(model.init_state(1))}

        def one_step(first=first):
            carry["state"], hidden = step(params, carry["state"], step_tokens, first + offsets, all_valid)
            jax.block_until_ready(hidden)

        out[name] = ms(timed(one_step, repeats))
    x = jnp.zeros((1, group, chunk, cfg.d_model), jnp.dtype(cfg.dtype))
    gdn_index, attention_index = cfg.pattern.index("G"), cfg.pattern.index("A")
    gdn = stack.layer_params(params, gdn_index)["mixer"]
    gdn_state = model.init_state(1).recurrent[0]
    mixer = jax.jit(lambda p, x, s, v: gdn_mixer_group(p, cfg.gdn, x, s, v)[:2])
    out["gdn_layer_ms"] = ms(timed(lambda: jax.block_until_ready(mixer(gdn, x, gdn_state, all_valid)),
                                   repeats))
    attention = stack.layer_params(params, attention_index)["mixer"]
    cache = model.init_state(1).kv[0]
    last = (steps - 1) * width + offsets
    read = jax.jit(lambda p, x, c, pos, v: attention_group(p, cfg.attention, x, c, pos, v)[0])
    out["attention_layer_last_ms"] = ms(timed(lambda: jax.block_until_ready(
        read(attention, x, cache, last, all_valid)), repeats))
    proj = jax.jit(lambda x, w: jnp.einsum("...d,de->...e", x, w))
    out["gdn_qkv_proj_ms"] = ms(timed(lambda: jax.block_until_ready(proj(x, gdn["in_proj_qkv"])),
                                      repeats))
    out["call_overhead_ms"] = out["prefill_ms"] - steps * (out["first_step_ms"] + out["last_step_ms"]) / 2
    return out


def emission_positions(length: int, count: int, grid: int) -> np.ndarray:
    """`count` checkpoint positions for an emission row: on the grid, evenly spaced, the last at
    `length` (as the Engine emits: its planned positions and the request's end), distinct (fewer when
    the grid has fewer than `count` positions in (0, length]). 32 at L = 8192, C = 256: every chunk
    boundary. int64[<= count]."""
    if count <= 0:
        return np.zeros((0,), np.int64)
    ends = np.linspace(length / count, length, count) // grid * grid
    positions = np.unique(ends.astype(np.int64))
    return positions[positions > 0][:count]


def bench_emission_interleaved(preset: str, length: int, emits: list[int], repeats: int, dtype,
                               chunking=(None, None), backend=None) -> list[dict]:
    """Emission overhead measured in rounds: every round times one call of each checkpoint count,
    K = 0 first, in the same process on one set of params (the machine's drift hits every count
    alike). The overhead of K is the median over rounds of t_K / t_0 - 1 (paired within a round).

    Returns one row per count (K = 0 included) as `bench_ours` does, plus "overhead" (K > 0) and
    "interleaved": True.
    """
    model, params = preset_model(preset, dtype, chunking, backend)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, size=(1, length), dtype=np.int32)
    counts = [0] + [k for k in emits if k > 0]
    checkpoints = {k: emission_positions(length, k, model.chunk_size).astype(np.int32) for k in counts}
    warmup = 2
    states = [model.init_state(1) for _ in range((repeats + warmup) * len(counts))]
    jax.block_until_ready(states)
    times: dict[int, list[float]] = {k: [] for k in counts}
    for round_ in range(repeats + warmup):
        for k in counts:
            start = time.perf_counter()
            jax.block_until_ready(model.prefill(params, tokens, states.pop(), checkpoints[k]))
            if round_ >= warmup:
                times[k].append(time.perf_counter() - start)
    backend_name = _backend_of(model, params)
    rows = []
    for k in counts:
        row = {"impl": "sparse-prefix" + (f" {backend_name}" if backend_name != "-" else ""),
               "preset": preset, "length": length, "checkpoints": len(checkpoints[k]),
               "median_s": statistics.median(times[k]), "min_s": min(times[k]), "interleaved": True,
               "non_embedding_params": non_embedding_params(params), **_chunking_of(model)}
        if k:
            row["overhead"] = statistics.median(t / t0 - 1 for t, t0 in zip(times[k], times[0]))
        rows.append(row)
    return rows


def bench_ours(preset: str, length: int, emit: int, repeats: int, dtype,
               chunking: tuple[int | None, int | None] = (None, None), backend=None) -> dict:
    """Time `model.prefill` of `length` tokens with `emit` evenly spaced on-grid checkpoints,
    with the preset re-chunked to `chunking` = (C, G) where given (None keeps the preset's)."""
    model, params = preset_model(preset, dtype, chunking, backend)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, size=(1, length), dtype=np.int32)
    positions = emission_positions(length, emit, model.chunk_size)
    checkpoints = positions.astype(np.int32)
    warmup = 2
    states = [model.init_state(1) for _ in range(repeats + warmup)]  # made (and ready) beforehand
    jax.block_until_ready(states)

    def call():
        logits, final, emitted = model.prefill(params, tokens, states.pop(), checkpoints)
        jax.block_until_ready((logits, final, emitted))

    times = timed(call, repeats, warmup)
    init_times = timed(lambda: jax.block_until_ready(model.init_state(1)), repeats)
    backend = _backend_of(model, params)
    return {"impl": "sparse-prefix" + (f" {backend}" if backend != "-" else ""), "preset": preset,
            "length": length,
            "checkpoints": len(checkpoints),
            "median_s": statistics.median(times), "min_s": min(times),
            "init_state_s": statistics.median(init_times),
            "non_embedding_params": non_embedding_params(params), **_chunking_of(model)}


def bench_peer(preset: str, length: int, repeats: int, param_dtype) -> dict | None:
    """Time mamba2-jax's jitted forward on the same Mamba2 shape (None when not importable)."""
    try:
        from flax import nnx
        from mamba2_jax import Mamba2Config, Mamba2ForCausalLM
        from mamba2_jax.modeling import forward
    except Exception as error:  # the peer is optional (and may not import on every jax)
        print(f"peer unavailable: {error}", file=sys.stderr)
        return None
    shapes = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-780m": (1536, 48),
              "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64)}
    if preset not in shapes:
        return None
    hidden, layers = shapes[preset]
    cfg = Mamba2Config(vocab_size=50288, hidden_size=hidden, num_hidden_layers=layers)
    model = Mamba2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    if param_dtype != jnp.float32:
        graph, state = nnx.split(model)
        state = jax.tree_util.tree_map(lambda x: x.astype(param_dtype), state)
        model = nnx.merge(graph, state)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50277, size=(1, length), dtype=np.int32))
    times = timed(lambda: jax.block_until_ready(forward(model, tokens)["logits"]), repeats)
    return {"impl": f"mamba2-jax ({jnp.dtype(param_dtype).name} params)", "preset": preset,
            "length": length, "checkpoints": 0, "median_s": statistics.median(times),
            "min_s": min(times)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="mamba2-130m,mamba2-1.3b")
    parser.add_argument("--lengths", default="2048,8192,16384")
    parser.add_argument("--emit", default="", help="checkpoint counts to time at the emit length")
    parser.add_argument("--emit-length", type=int, default=8192)
    parser.add_argument("--emit-interleaved", action="store_true",
                        help="time the --emit counts and K = 0 in alternating rounds; report the paired "
                             "median overhead (bench_emission_interleaved)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--peer", action="store_true")
    parser.add_argument("--peer-dtypes", default="float32,bfloat16")
    parser.add_argument("--peer-lengths", default="", help="lengths to time the peer at (empty: all)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--chunk-size", default="", help="comma list of C to sweep (empty: preset's)")
    parser.add_argument("--chunks-per-step", default="",
                        help="comma list of G to sweep (empty: preset's)")
    parser.add_argument("--command-buffers", default="", choices=["", "on", "off", "auto"],
                        help="Mamba2LM(command_buffers=...) for the Mamba2 presets (default: the model's)")
    parser.add_argument("--backend", default="", help="Mamba2 SSD backends to compare, comma list of "
                        "chunked / pallas / sequential (Mamba2) or scan / unroll (hybrid layer loop); empty: "
                        "the preset's")
    parser.add_argument("--breakdown", action="store_true",
                        help="time init_state / prefill / one step / one layer / a projection "
                             "(Mamba2 and hybrid presets)")
    parser.add_argument("--check-emission", type=int, default=0, metavar="K",
                        help="per preset: K checkpoints emitted at --emit-length, the first, middle and "
                             "last compared with prefills that stop there (bitwise expected)")
    parser.add_argument("--check-resume", action="store_true",
                        help="bitwise resume check per (preset, C, G) at the largest length")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.chunk_size.split(",") if x] or [None]
    groups = [int(x) for x in args.chunks_per_step.split(",") if x] or [None]
    chunkings = [(size, group) for size in sizes for group in groups]
    backends = [x for x in args.backend.split(",") if x] or [None]
    global COMMAND_BUFFERS
    COMMAND_BUFFERS = args.command_buffers or None

    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    rate = matmul_rate() if device.platform == "gpu" else matmul_rate(2048, 3)
    print(f"bf16 matmul: {rate / 1e12:.0f} TFLOP/s")
    rows, checks = [], []
    lengths = [int(x) for x in args.lengths.split(",")]
    peer_lengths = [int(x) for x in args.peer_lengths.split(",") if x]
    for preset in args.presets.split(","):
        for variant, (backend, chunking) in enumerate((b, c) for b in backends for c in chunkings):
            for length in lengths:
                row = bench_ours(preset, length, 0, args.repeats, dtype, chunking, backend)
                rows.append(row)
                if args.peer and variant == 0 and (not peer_lengths or length in peer_lengths):
                    for name in args.peer_dtypes.split(","):
                        peer = bench_peer(preset, length, args.repeats, jnp.dtype(name))
                        if peer:
                            peer["non_embedding_params"] = row["non_embedding_params"]
                            rows.append(peer)
            emits = [int(x) for x in args.emit.split(",") if x]
            if emits and args.emit_interleaved:
                rows.extend(bench_emission_interleaved(preset, args.emit_length, emits, args.repeats,
                                                       dtype, chunking, backend))
            else:
                for emit in emits:
                    rows.append(bench_ours(preset, args.emit_length, emit, args.repeats, dtype,
                                           chunking, backend))
            if args.breakdown:
                for length in lengths:
                    row = breakdown(preset, length, args.repeats, dtype, chunking, backend)
                    print("breakdown: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else
                                                   f"{k}={v}" for k, v in row.items()))
            if args.check_resume:
                checks.append(check_resume(preset, max(lengths), dtype, chunking, backend))
                print(f"resume check: {checks[-1]}")
            if args.check_emission:
                from sparse_prefix.testing import emission_difference
                model, params = preset_model(preset, dtype, chunking, backend)
                positions = emission_positions(args.emit_length, args.check_emission, model.chunk_size)
                worst = emission_difference(model, params, args.emit_length, positions,
                                            check=sorted({0, len(positions) // 2, len(positions) - 1}))
                print(f"emission check: {preset} K={len(positions)} L={args.emit_length} "
                      f"{'bitwise OK' if worst == 0.0 else 'FAIL'} max|diff|={worst:.3g}")
    print(f"\n{'impl':34s} {'preset':14s} {'C':>4s} {'G':>3s} {'L':>6s} {'K':>3s} {'ms':>9s} "
          f"{'tok/s':>10s} {'MFU':>6s} {'init ms':>8s}")
    for row in rows:
        flops = 2 * row["non_embedding_params"] * row["length"]
        row["tokens_per_s"] = row["length"] / row["median_s"]
        row["mfu"] = flops / row["median_s"] / rate
        init = f"{row['init_state_s'] * 1e3:8.2f}" if "init_state_s" in row else f"{'-':>8s}"
        extra = f"  overhead {row['overhead']:+.1%} (interleaved)" if "overhead" in row else \
            ("  (interleaved)" if row.get("interleaved") else "")
        print(f"{row['impl']:34s} {row['preset']:14s} {row.get('chunk_size', 0):4d} "
              f"{row.get('chunks_per_step', 0):3d} {row['length']:6d} {row['checkpoints']:3d} "
              f"{row['median_s'] * 1e3:9.2f} {row['tokens_per_s']:10.0f} {row['mfu']:6.1%} {init}{extra}")
    for check in checks:
        print(f"resume bitwise {'OK  ' if check['bitwise'] else 'FAIL'} {check['preset']} "
              f"{check['backend']} "
              f"C={check['chunk_size']} G={check['chunks_per_step']} L={check['length']} "
              f"split={check['split']} max|diff|={check['max_abs_diff']:.3g}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": device.device_kind, "jax": jax.__version__,
                       "matmul_flops": rate, "rows": rows, "resume_checks": checks}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
