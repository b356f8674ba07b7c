"""Does one chunk get the same bits alone (G = 1) as inside a G-chunk step, on this backend?

    python -m sparse_prefix.experiments.probe_step_fit --preset qwen3.5-0.8b \
        --cases 256:0,192:256,164:8028 [--draws 4] [--gemm auto|xla] [--ops]

What `HybridLM(fit_steps="auto")` relies on, measured two ways in one process:
  * model: for each case N:R, N random tokens prefilled from a state of R tokens (R = 0: a fresh
    state) by the preset as a one-chunk call (``fit_steps="on"``) and in its own G-chunk steps
    (``"off"``), over ``--draws`` token draws: the largest |difference| over the logits and every
    recurrent-state leaf (0: bitwise), the draws that differed, and the warm median of 5 timed
    calls each;
  * ``--ops``: the matmuls a qwen3.5-0.8b step runs (K x N), whose first rows must come out the same
    at 256, 512 and 8192 rows as at 1024, under each set of XLA compiler options (`OPTIONS`; an
    option this jaxlib does not know is reported as such), with the summed time of the 8192-row ones.
On an H200 (jax 0.11.2) XLA's autotuned Triton GEMMs differed by row count on 6 of 9 shapes and cuBLAS
on none (eighth session); with cuBLAS only the one-chunk call still differed from the 4-chunk step in
1 of 4 draws at 256 tokens (the GDN rule's batched matmuls: ninth session), which is why
`fit_steps` defaults to "off" (BENCHMARKS.md); with the rule run on the step's 4 chunks between
optimization barriers every draw differed (tenth session: the layers around it compile per row count).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

OPTIONS = {"xla": {}, "cublas": {"xla_gpu_enable_triton_gemm": False},
           "autotune0": {"xla_gpu_autotune_level": 0}}
SHAPES = ((1024, 6144), (1024, 2048), (1024, 16), (1024, 7168), (3584, 1024), (2048, 1024),
          (1024, 4096), (1024, 512))


def parse_cases(text: str) -> list[tuple[int, int]]:
    """``"256:0,164:8028"`` -> [(256, 0), (164, 8028)] (tokens, resumed-from length)."""
    cases = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        count, _, start = item.partition(":")
        cases.append((int(count), int(start or 0)))
    return cases


def model_rows(preset: str, cases, gemm: str, repeats: int = 5, draws: int = 1) -> list[dict]:
    """Per case N:R, the preset's one-chunk call (``fit_steps="on"``, "1") against the same call in
    G-chunk steps (``fit_steps="off"``), over `draws` token draws (the state after R tokens made by
    the G-chunk model): the largest |difference| over the logits and every recurrent-state leaf,
    how many draws differed at all, and the warm median ms of the first draw's calls."""
    from sparse_prefix.models import create
    base, params = create(preset)
    group = base.chunks_per_step
    models = {fit: type(base)(base.config, backend=base.backend, fit_steps=fit, gemm=gemm)
              for fit in ("on", "off")}
    none = np.zeros((0,), np.int32)
    rows = []
    for count, start in cases:
        worst, differing, times = 0.0, 0, {}
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            tokens = rng.integers(0, base.vocab_size, (1, count), dtype=np.int32)
            prefix = rng.integers(0, base.vocab_size, (1, start), dtype=np.int32)
            leaves = {}
            for fit, model in models.items():
                state = model.init_state(1)
                if start:
                    _, state, _ = models["off"].prefill(params, prefix, state, none)
                copies = [jax.tree_util.tree_map(lambda leaf: leaf.copy(), state)
                          for _ in range(repeats + 3 if draw == 0 else 1)]
                jax.block_until_ready(copies)
                logits, final, _ = model.prefill(params, tokens, copies.pop(), none)
                leaves[fit] = [np.asarray(x, np.float64)
                               for x in [logits] + jax.tree_util.tree_leaves(final.recurrent)]
                if draw:
                    continue
                samples = []
                for index in range(repeats + 2):
                    begin = time.perf_counter()
                    jax.block_until_ready(model.prefill(params, tokens, copies.pop(), none)[0])
                    if index >= 2:
                        samples.append(time.perf_counter() - begin)
                times[fit] = statistics.median(samples) * 1e3
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves["on"], leaves["off"]))
            worst, differing = max(worst, diff), differing + (diff != 0.0)
        rows.append({"tokens": count, "from": start, "max_diff": worst, "draws_differing": differing,
                     "draws": draws, "ms_g1": times["on"], "ms_group": times["off"], "group": group})
    return rows


def op_rows(names) -> list[dict]:
    rows = []
    for name in names:
        try:
            matmul = jax.jit(lambda a, b: jnp.einsum("md,de->me", a, b), compiler_options=OPTIONS[name])
            differing, total_ms = [], 0.0
            for k_dim, n_dim in SHAPES:
                x = jax.random.normal(jax.random.PRNGKey(0), (8192, k_dim), jnp.bfloat16)
                w = jax.random.normal(jax.random.PRNGKey(1), (k_dim, n_dim), jnp.bfloat16) * 0.03
                ref = np.asarray(matmul(x[:1024], w), np.float64)
                for rows_in in (256, 512, 8192):
                    got = np.asarray(matmul(x[:rows_in], w), np.float64)[:min(rows_in, 1024)]
                    if not np.array_equal(got, ref[:got.shape[0]]):
                        differing.append(f"{k_dim}x{n_dim}@{rows_in}")
                matmul(x, w).block_until_ready()
                begin = time.perf_counter()
                for _ in range(20):
                    out = matmul(x, w)
                out.block_until_ready()
                total_ms += (time.perf_counter() - begin) / 20 * 1e3
            rows.append({"options": name, "differing": differing, "ms_8192": total_ms})
        except Exception as error:  # noqa: BLE001 -- an option unknown to this jaxlib is a result
            rows.append({"options": name, "error": f"{type(error).__name__}: {str(error)[:160]}"})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--cases", default="256:0,1024:0,164:8028")
    parser.add_argument("--gemm", default="auto", choices=("auto", "cublas", "xla"))
    parser.add_argument("--ops", action="store_true", help="also the matmul row check per option set")
    parser.add_argument("--options", default="xla,cublas,autotune0")
    parser.add_argument("--draws", type=int, default=1, help="token draws per case (bits compared on each)")
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; gemm={args.gemm}")
    if args.ops:
        for row in op_rows(args.options.split(",")):
            if "error" in row:
                print(f"  ops {row['options']:<10} {row['error']}")
            else:
                print(f"  ops {row['options']:<10} rows differing: {row['differing'] or 'none'}; "
                      f"8192-row matmuls {row['ms_8192']:.3f} ms")
    for row in model_rows(args.preset, parse_cases(args.cases), args.gemm, draws=args.draws):
        print(f"  {row['tokens']:>5} tokens from {row['from']:>5}: one chunk vs G={row['group']} steps "
              f"max |diff| {row['max_diff']:.3g} ({row['draws_differing']} of {row['draws']} draws "
              f"differ); ms one chunk {row['ms_g1']:.2f}, G={row['group']} {row['ms_group']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
