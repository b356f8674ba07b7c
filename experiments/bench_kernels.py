"""Block-size sweep of the Mamba2 mixer's Pallas kernels at one model's shapes (issue 7).

    python -m sparse_prefix.experiments.bench_kernels [--preset mamba2-1.3b] [--repeats 30]

For one group step of the preset (B = 1, Q = chunks per step, C = chunk size, bf16) times each
kernel of `models.mixer_pallas` and `models.ssd_pallas` under the variants listed in `VARIANTS`
(rows / columns / warps / shared scores; for "gemm" the in_proj matmul at widths n: 0 = in_proj,
-1 = in_proj without its dt columns) -- the kernel's own device time from a profiler trace,
median of `--repeats` calls; wall time where the trace has no device kernels (CPU) -- and checks
every variant against the first one of its kernel (max |difference|: the layouts of the sums differ, so small
float32 differences are expected for the norm and the chunk scan; the conv must agree to the bit).
Run it on a GPU: in Pallas' interpreter the times mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = {
    "conv": [dict(rows_per_program=64), dict(rows_per_program=32),
             dict(rows_per_program=64, channels_per_program=64),
             dict(rows_per_program=32, channels_per_program=64),
             dict(rows_per_program=64, channels_per_program=256, num_warps=8),
             dict(rows_per_program=128, channels_per_program=64)],
    "norm": [dict(rows=2, piece=4096), dict(rows=8, piece=512), dict(rows=1, piece=4096),
             dict(rows=2, piece=4096, num_warps=8), dict(rows=4, piece=4096, num_warps=8)],
    "contrib": [dict(), dict(num_warps=8), dict(num_stages=1), dict(num_stages=3)],
    "scan": [dict(block=64), dict(block=64, num_stages=3), dict(block=32, num_warps=2)],
    # x [G C, d] @ W [d, n]: in_proj's width n = 2 E + 2 G N + H, and splits / paddings of it
    "gemm": [dict(n=0), dict(n=-1), dict(n=64), dict(n=128), dict(n=8576), dict(n=8704)],
}


def device_time(fn, repeats: int, kernel: str | None = None) -> float:
    """Median device time (s) of the kernel named `kernel` over `repeats` traced calls (the
    profiler's kernel events: a call's host dispatch, ~50-100 us, would swamp a wall clock)."""
    from sparse_prefix.experiments.profile_prefill import load_trace, split_events
    jax.block_until_ready(fn())
    trace_dir = tempfile.mkdtemp(prefix="sp-kernels-")
    with jax.profiler.trace(trace_dir):
        for _ in range(repeats):
            jax.block_until_ready(fn())
    device, _, _ = split_events(load_trace(trace_dir))
    if not device:  # no device kernels (Pallas' interpreter on a CPU): wall time per call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    if kernel is None:  # every kernel of the call (an XLA GEMM may be one kernel or several)
        return sum(float(event["dur"]) for event in device) / repeats * 1e-6
    durations = [float(event["dur"]) for event in device if kernel in event["name"]]
    if not durations:
        raise RuntimeError(f"no {kernel!r} kernel in the trace (names: "
                           f"{sorted({event['name'] for event in device})[:8]})")
    return statistics.median(durations) * 1e-6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mamba2-1.3b")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kernels", default="conv,norm,contrib,scan,gemm")
    args = parser.parse_args(argv)

    from sparse_prefix.models import create, mixer_pallas, ssd_pallas
    from sparse_prefix.models.group_conv import group_windows
    model, _ = create(args.preset, dtype=jnp.bfloat16)
    cfg = model.config.mixer
    q, c = model.config.chunks_per_step, model.config.chunk_size
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    proj = jnp.asarray(rng.standard_normal((1, q, c, cfg.in_proj_size)) * 0.5, dtype)
    window = jnp.asarray(rng.standard_normal((1, cfg.d_conv - 1, cfg.conv_dim)), dtype)
    weight = jnp.asarray(rng.standard_normal((cfg.d_conv, cfg.conv_dim)) * 0.5, dtype)
    bias = jnp.asarray(rng.standard_normal((cfg.conv_dim,)) * 0.1, dtype)
    n_valid = jnp.full((1, q), c, jnp.int32)
    entering, _ = group_windows(window, proj[..., cfg.d_inner:cfg.d_inner + cfg.conv_dim], n_valid)
    y = jnp.asarray(rng.standard_normal((1, q, c, cfg.d_inner)), dtype)
    norm_w = jnp.asarray(rng.standard_normal((cfg.d_inner,)), dtype)
    xbc = jnp.asarray(rng.standard_normal((1, q, c, cfg.conv_dim)) * 0.5, dtype)
    dt = jnp.asarray(rng.uniform(1e-3, 0.1, (1, q, c, cfg.nheads)), jnp.float32)
    cum = jnp.cumsum(dt * -jnp.asarray(rng.uniform(1, 16, cfg.nheads), jnp.float32), axis=2)
    cum_t, dt_t = jnp.swapaxes(cum, 2, 3), jnp.swapaxes(dt, 2, 3)
    states = jnp.asarray(rng.standard_normal((1, q, cfg.nheads, cfg.headdim, cfg.d_state)), dtype)
    d_skip = jnp.ones((cfg.nheads,), jnp.float32)

    rows = jnp.asarray(rng.standard_normal((q * c, cfg.d_model)), dtype)
    widths = {0: cfg.in_proj_size, -1: cfg.in_proj_size - cfg.nheads}   # 0: in_proj; -1: without dt

    def gemm(n):
        weight = jnp.asarray(rng.standard_normal((cfg.d_model, widths.get(n, n))) * 0.02, dtype)
        matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
        return lambda: matmul(rows, weight)

    kernels = {
        "gemm": (None, gemm),
        "conv": ("mamba2_conv_silu", lambda **kw: lambda: mixer_pallas.conv_silu_pallas(
            proj, cfg.d_inner, cfg.conv_dim, entering, weight, bias, **kw)),
        "norm": ("mamba2_gated_norm", lambda **kw: lambda: mixer_pallas.gated_norm_pallas(
            y, proj, norm_w, cfg.ngroups, cfg.norm_eps, **kw)),
        "contrib": ("ssd_state_contributions", lambda **kw: lambda: ssd_pallas.state_contributions_pallas(
            xbc, cum_t, dt_t, heads=cfg.nheads, head_dim=cfg.headdim, groups=cfg.ngroups,
            state_size=cfg.d_state, matmul_dtype=dtype, **kw)),
        "scan": ("ssd_chunk_scan", lambda **kw: lambda: ssd_pallas.chunk_scan_pallas(
            xbc, cum_t, dt_t, states, d_skip, heads=cfg.nheads, head_dim=cfg.headdim, groups=cfg.ngroups,
            state_size=cfg.d_state, out_dtype=dtype, **kw)),
    }
    print(f"{args.preset}: B=1 Q={q} C={c} E={cfg.d_inner} Dc={cfg.conv_dim} H={cfg.nheads} "
          f"P={cfg.headdim} N={cfg.d_state} G={cfg.ngroups}; {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    print(f"{'kernel':6s} {'variant':55s} {'us':>9s} {'max|diff| vs first':>20s}")
    for name in [k for k in args.kernels.split(",") if k]:
        first = None
        for variant in VARIANTS[name]:
            kernel, build = kernels[name]
            try:
                # gemm: its own jitted matmul taking the operands as arguments (an outer jit
                # would close over them and XLA would constant-fold the product)
                fn = build(**variant) if name == "gemm" else jax.jit(build(**variant))
                out = fn()
                seconds = device_time(fn, args.repeats, kernel)
            except Exception as error:  # a Triton lowering or resource failure: report, go on
                print(f"{name:6s} {str(variant):55s} failed: {type(error).__name__}: {str(error)[:120]}")
                continue
            out = np.asarray(out, np.float32)
            first = out if first is None else first
            diff = float(np.max(np.abs(out - first))) if out.shape == first.shape else float("nan")
            print(f"{name:6s} {str(variant):55s} {seconds * 1e6:9.1f} {diff:20.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
