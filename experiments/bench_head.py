"""The LM head on one row and the embedding lookup, as the models run them vs XLA's plain lowering.

    python -m sparse_prefix.experiments.bench_head [--presets qwen3.5-0.8b,mamba2-1.3b] \
        [--tokens 4096] [--repeats 50] [--out FILE.json]

Per preset, on the preset's head shape (V x d, its compute dtype, tied [V, d] or untied [d, V];
random weights) and on the default device:
  * head: `einsum(row, weight, preferred_element_type=float32)` on one row (batch 1 at its last
    token) vs `models.layers.head_logits`, which computes the row as two;
  * embed: `table[ids]`, the gather through an unsigned view (`embed_lookup(view=True)`) and
    `models.layers.embed_lookup` as the models call it (the view on CPU only) for `--tokens` ids, in
    a loop of 1024 ids per trip as the models' step loop runs it (XLA's CPU backend hoists a float32
    copy of the table out of such a loop; a lone gather fuses the conversion).
Each variant's compiled program is searched for a float32 copy of the whole weight (what XLA makes
for a one-row head, and on CPU for a bf16 gather), and checked: the head against a float64 product
(max |difference|), the lookup bit for bit against `table[tokens]`. Times: every kernel of a call
from a profiler trace, median of `--repeats` calls (`bench_kernels.device_time`); wall time where
the trace has no device kernels (CPU).
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.experiments.bench_kernels import device_time

STEP_IDS = 1024         # ids per trip of the lookup's loop: one group step of 4 chunks of 256


def head_shape(preset: str) -> tuple[int, int, bool, str]:
    """(V, d, tied, compute dtype name) of a registered preset (nothing allocated)."""
    from sparse_prefix.models.registry import build
    model = build(preset)
    config = model.config
    dtype = getattr(config, "dtype", None) or getattr(config, "compute_dtype", None) or model.dtype
    return int(model.vocab_size), int(config.d_model), bool(config.tie_embeddings), jnp.dtype(dtype).name


def _has_copy(compiled, args, shape: tuple[int, ...]) -> bool:
    """Whether the optimised program of jitted `compiled` holds a float32 array of `shape`."""
    text = compiled.lower(*args).compile().as_text()
    return f"f32[{','.join(map(str, shape))}]" in text


def bench_head(vocab: int, d_model: int, tied: bool, dtype: str, tokens: int, repeats: int,
               seed: int = 0) -> list[dict]:
    """Rows {kind, variant, seconds, float32_copy, max_abs_diff} for the head and the lookup."""
    from sparse_prefix.models.layers import embed_lookup, head_logits

    key_w, key_h, key_t = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (vocab, d_model) if tied else (d_model, vocab)
    weight = (jax.random.normal(key_w, shape) * 0.02).astype(dtype)
    row = jax.random.normal(key_h, (1, d_model)).astype(dtype)
    per_trip = min(tokens, STEP_IDS)
    if tokens % per_trip:
        raise ValueError(f"tokens must be at most {STEP_IDS} or a multiple of it, got {tokens}")
    ids = jax.random.randint(key_t, (tokens // per_trip, per_trip), 0, vocab, jnp.int32)
    spec = "...d,vd->...v" if tied else "...d,dv->...v"
    exact = np.asarray(row, np.float64) @ (np.asarray(weight, np.float64).T if tied
                                            else np.asarray(weight, np.float64))

    def plain_head(row, weight):
        return jnp.einsum(spec, row, weight, preferred_element_type=jnp.float32)

    def our_head(row, weight):
        return head_logits(row, weight, vocab_major=tied)

    def in_steps(lookup):
        """The lookup inside a loop of steps, as the models' step loop runs it (ids [S, n])."""
        def run(table, ids):
            return jax.lax.scan(lambda carry, step: (carry, lookup(table, step)), 0, ids)[1]
        return run

    table = weight if tied else weight.T
    gathered = np.asarray(jax.jit(lambda t, i: t[i])(table, ids))
    rows = []
    for kind, variant, fn, args in (("head", "einsum", plain_head, (row, weight)),
                                    ("head", "head_logits", our_head, (row, weight)),
                                    ("embed", "table[ids]", in_steps(lambda t, i: t[i]), (table, ids)),
                                    ("embed", "uint view", in_steps(functools.partial(embed_lookup, view=True)),
                                     (table, ids)),
                                    ("embed", "embed_lookup", in_steps(embed_lookup), (table, ids))):
        compiled = jax.jit(fn)
        out = np.asarray(compiled(*args))
        if kind == "head":
            diff = float(np.max(np.abs(out.astype(np.float64) - exact)))
        else:
            diff = float(np.max(np.abs(out.astype(np.float64) - gathered.astype(np.float64))))
            if out.tobytes() != gathered.tobytes():
                raise AssertionError(f"{variant}: the rows differ from table[ids] in their bits")
        rows.append({"kind": kind, "variant": variant,
                     "seconds": device_time(lambda: compiled(*args), repeats),
                     "float32_copy": _has_copy(compiled, args, args[0 if kind == "embed" else 1].shape),
                     "max_abs_diff": diff})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="qwen3.5-0.8b,mamba2-1.3b")
    parser.add_argument("--tokens", type=int, default=4096,
                        help=f"ids gathered by the lookup, {STEP_IDS} per trip of its loop")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeats < 1:
        parser.error("--tokens and --repeats must be positive")
    if args.tokens > STEP_IDS and args.tokens % STEP_IDS:
        parser.error(f"--tokens must be at most {STEP_IDS} or a multiple of it")
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    print(f"{'preset':20s} {'part':6s} {'variant':14s} {'us':>10s} {'f32 copy':>9s} {'max |diff|':>11s}")
    results = []
    for preset in [name for name in args.presets.split(",") if name]:
        vocab, d_model, tied, dtype = head_shape(preset)
        for row in bench_head(vocab, d_model, tied, dtype, args.tokens, args.repeats):
            row.update(preset=preset, vocab=vocab, d_model=d_model, tied=tied, dtype=dtype)
            results.append(row)
            print(f"{preset:20s} {row['kind']:6s} {row['variant']:14s} {row['seconds'] * 1e6:10.1f} "
                  f"{str(row['float32_copy']):>9s} {row['max_abs_diff']:11.2e}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "rows": results}, handle,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
