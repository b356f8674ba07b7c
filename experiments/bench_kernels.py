"""Block-size sweep of the Mamba2 mixer's Pallas kernels at one model's shapes (issue 7).

    python -m sparse_prefix.experiments.bench_kernels [--preset mamba2-1.3b] [--repeats 30]

For one group step of the preset (B = 1, Q = chunks per step, C = chunk size, bf16) times, warm
median of `--repeats` calls, each kernel of `models.mixer_pallas` and `models.ssd_pallas` under the
variants listed in `VARIANTS` (rows / columns / warps / shared scores), and checks every variant
against the first one of its kernel (max |difference|: the layouts of the sums differ, so small
float32 differences are expected for the norm and the chunk scan; the conv must agree to the bit).
Run it on a GPU: in Pallas' interpreter the times mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = {
    "conv": [dict(rows_per_program=256), dict(rows_per_program=64), dict(rows_per_program=32),
             dict(rows_per_program=16), dict(rows_per_program=64, num_warps=2)],
    "norm": [dict(rows=8, piece=512), dict(rows=4, piece=4096, num_warps=8),
             dict(rows=2, piece=4096, num_warps=4), dict(rows=16, piece=512, num_warps=4),
             dict(rows=8, piece=1024, num_warps=8)],
    "scan": [dict(block=64), dict(block=64, shared_scores=True), dict(block=32, shared_scores=True),
             dict(block=128, shared_scores=True, num_warps=8), dict(block=64, num_warps=8),
             dict(block=64, shared_scores=True, num_warps=8)],
}


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mamba2-1.3b")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--kernels", default="conv,norm,scan")
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
    states = jnp.asarray(rng.standard_normal((1, q, cfg.nheads, cfg.headdim, cfg.d_state)), dtype)
    d_skip = jnp.ones((cfg.nheads,), jnp.float32)

    kernels = {
        "conv": (lambda **kw: functools.partial(
            mixer_pallas.conv_silu_pallas, first_channel=cfg.d_inner, channels=cfg.conv_dim, **kw),
            (proj, entering, weight, bias)),
        "norm": (lambda **kw: functools.partial(
            mixer_pallas.gated_norm_pallas, groups=cfg.ngroups, eps=cfg.norm_eps, **kw),
            (y, proj, norm_w)),
        "scan": (lambda **kw: functools.partial(
            ssd_pallas.chunk_scan_pallas, heads=cfg.nheads, head_dim=cfg.headdim, groups=cfg.ngroups,
            state_size=cfg.d_state, out_dtype=dtype, **kw), (xbc, cum, dt, states, d_skip)),
    }
    print(f"{args.preset}: B=1 Q={q} C={c} E={cfg.d_inner} Dc={cfg.conv_dim} H={cfg.nheads} "
          f"P={cfg.headdim} N={cfg.d_state} G={cfg.ngroups}; {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}")
    print(f"{'kernel':6s} {'variant':55s} {'us':>9s} {'max|diff| vs first':>20s}")
    for name in [k for k in args.kernels.split(",") if k]:
        first = None
        for variant in VARIANTS[name]:
            build, operands = kernels[name]
            try:
                fn = jax.jit(build(**variant))
                out = fn(*operands)
                seconds = _time(lambda: fn(*operands), args.repeats)
            except Exception as error:  # a Triton lowering or resource failure: report, go on
                print(f"{name:6s} {str(variant):55s} failed: {type(error).__name__}: {str(error)[:120]}")
                continue
            out = np.asarray(out, np.float32)
            first = out if first is None else first
            diff = float(np.max(np.abs(out - first)))
            print(f"{name:6s} {str(variant):55s} {seconds * 1e6:9.1f} {diff:20.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
