"""Variants of the Pallas attention read at a hybrid preset's shapes: deep short reads vs full prefills.

    python -m sparse_prefix.experiments.bench_attention [--preset qwen3.5-0.8b] [--repeats 20] \
        [--variants "bk=64;p=4;bk=128,s=1"] [--depths 0,4096,7936]

A resumed one-chunk suffix at depth d reads d keys with few programs (qwen3.5-0.8b: 8 query heads x
256 / 64 rows = 32 programs on an H200's 132 SMs), each walking all d / 64 key blocks in turn; a full
prefill's 1024-row steps have 4x as many programs. For each variant of `attend_pallas`
(bk = block_k, bq = block_q, w = num_warps, s = num_stages, p = parts) this prints, from a profiler
trace (the kernels' own device time, every kernel of the call, median over `--repeats` calls):
  * one chunk (C query rows) at each depth in `--depths`;
  * the reads of a full prefill of `--length` tokens in G C-row steps (summed over its steps);
and checks, bitwise, that the chunk at the deepest depth gets the same rows alone as inside the
G C-row step that holds it (what a resume on the chunk grid needs), and the largest |difference| from
the first variant (other key blocks or parts sum in another order: small float32 differences).
The KV buffer is stacked like the model's ([R, 1, S, Hkv, D], R = attention layers, read at one
layer), random bf16 values. Run it on a GPU: in Pallas' interpreter the times mean nothing.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

KEYS = {"bk": "block_k", "bq": "block_q", "w": "num_warps", "s": "num_stages", "p": "parts"}


def parse_variants(text: str) -> list[dict[str, int]]:
    """``"bk=64;p=4,s=3"`` -> [{"block_k": 64}, {"parts": 4, "num_stages": 3}] (empty item: defaults)."""
    variants = []
    for item in text.split(";"):
        variant = {}
        for pair in filter(None, (part.strip() for part in item.split(","))):
            key, _, value = pair.partition("=")
            if key not in KEYS or not value.strip().isdigit():
                raise ValueError(f"variant entries are {sorted(KEYS)}=<int>, got {pair!r}")
            variant[KEYS[key]] = int(value)
        variants.append(variant)
    return variants


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3.5-0.8b")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", default=";s=1;s=3;w=4;bk=32;bk=128,s=1;bq=128,s=1;p=2;p=4;p=8")
    parser.add_argument("--depths", default="0,4096,7936")
    parser.add_argument("--length", type=int, default=8192)
    args = parser.parse_args(argv)

    from sparse_prefix.experiments.bench_kernels import _time
    from sparse_prefix.models import create
    from sparse_prefix.models.attention_pallas import attend_pallas

    model, _ = create(args.preset, dtype=jnp.bfloat16)
    config = model.config
    cfg = config.attention
    chunk, group, buffer_length = config.chunk_size, config.chunks_per_step, config.max_length
    layers = config.pattern.count("A")
    depths = [int(part) for part in args.depths.split(",") if part.strip()]
    step = group * chunk
    if args.length % step or args.length > buffer_length or max(depths) + chunk > buffer_length:
        raise ValueError(f"--length must be a multiple of G C = {step} within S = {buffer_length}, "
                         f"and every depth + C within S")
    kv_heads, heads_per_kv, dim = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16
    shape = (layers, 1, buffer_length, kv_heads, dim)
    k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    q_all = jnp.asarray(rng.standard_normal((1, args.length + step, kv_heads, heads_per_kv, dim),
                                            np.float32), dtype)
    layer = jnp.int32(layers // 2)
    deep = max(depths)
    deep_step = deep // step * step                    # the G C-row step holding the deep chunk

    def read(variant, start, rows):
        """A thunk running the variant's read of `rows` query rows at positions start.. (operands
        passed as arguments: a jit closing over the buffer would embed it as a constant)."""
        attend = jax.jit(functools.partial(attend_pallas, **variant))
        positions = jnp.arange(start, start + rows, dtype=jnp.int32)[None]
        query = q_all[:, start % step:start % step + rows]
        return lambda: attend(query, k, v, positions, layer)

    def prefill(variant):
        calls = [read(variant, start, step) for start in range(0, args.length, step)]
        return lambda: [call() for call in calls]

    print(f"{args.preset}: C={chunk} G={group} S={buffer_length} Hkv={kv_heads} G_q={heads_per_kv} "
          f"D={dim}, {layers} stacked layers; {jax.devices()[0].device_kind}, jax {jax.__version__}")
    columns = [f"chunk@{d}" for d in depths] + [f"prefill {args.length}"]
    print(f"{'variant':34s} " + " ".join(f"{c:>13s}" for c in columns) + "  (us)  resume  max|diff|")
    first = None
    for variant in parse_variants(args.variants):
        try:
            times = [_time(read(variant, d, chunk), args.repeats, None) for d in depths]
            times.append(_time(prefill(variant), max(args.repeats // 4, 3), None))
            alone = np.asarray(read(variant, deep, chunk)(), np.float32)
            inside = np.asarray(read(variant, deep_step, step)(), np.float32)
        except Exception as error:  # a Triton lowering or resource failure: report, go on
            print(f"{str(variant):34s} failed: {type(error).__name__}: {str(error)[:160]}")
            continue
        offset = deep - deep_step
        same = np.array_equal(alone, inside[:, offset:offset + chunk])
        first = alone if first is None else first
        print(f"{str(variant):34s} " + " ".join(f"{t * 1e6:13.1f}" for t in times)
              + f"  {'bitwise' if same else 'DIFFERS':>12s}  {float(np.max(np.abs(alone - first))):.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
