"""Hybrid prefill variants side by side in one run: where the fixed and per-step costs come from.

    python -m sparse_prefix.experiments.probe_hybrid --preset qwen3.5-0.8b-group \
        --variants "kb=1024,G=4;kb=0,G=4;kb=1024,G=1" --lengths 256,1024,8192 --suffix 8028:164

A variant is a `;`-separated item of comma-separated settings: ``kb`` the attention key block
(0 = dense reads of the whole KV buffer), ``G`` chunks per step, ``C`` the chunk size, ``unroll``
(1: `scan_layers=False`), ``pallas`` (1: the Pallas attention kernel, 0: the XLA read), ``sc`` the GDN
sub-chunk (the UT block and the step of its state recursion), ``static`` (1: the host-counted step
loop, 0: the device-counted one; the only setting that also applies to Mamba2 presets), ``rec`` (1:
the GDN state recursion as one Pallas kernel, 0: the XLA scan), ``kp`` the Pallas attention read's
key parts (`AttentionConfig.key_parts`). Per variant, every length is timed as a fresh prefill (warm median of
`--repeats` calls of the public `model.prefill`, synchronised on its outputs, states made beforehand),
``--check-resume`` checks a resume on the chunk grid bitwise at the longest length,
and ``--suffix R:N`` times N tokens prefilled from a state of R tokens (a deep, short resumed
suffix: what a 98%-overlap hit runs). The table shows ms per call and ms per group step (a step is
G x C tokens through every layer), so a variant's fixed cost and step cost can be read side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import numpy as np

from sparse_prefix.testing import resume_difference


def parse_variant(text: str) -> dict:
    """``"kb=1024,G=4"`` -> {"kb": 1024, "G": 4}; keys kb, G, C, unroll, pallas, sc, static, rec, kp."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in ("kb", "G", "C", "unroll", "pallas", "sc", "static", "rec", "kp"):
            raise ValueError(f"unknown variant setting {key!r} in {text!r} "
                             f"(kb, G, C, unroll, pallas, sc, static, rec, kp)")
        out[key] = int(value)
    return out


def build(preset: str, variant: dict, dtype):
    """(model, params): `preset` with the variant's settings applied."""
    from sparse_prefix.models import create
    from sparse_prefix.models.hybrid import HybridLM
    model, params = create(preset, dtype=dtype)
    loop = {"step_loop": "static" if variant["static"] else "dynamic"} if "static" in variant else {}
    if set(variant) <= {"static"}:              # any family, as the preset builds it
        return (type(model)(model.config, **loop) if loop else model), params
    if not isinstance(model, HybridLM):
        raise ValueError(f"{preset} is not a hybrid preset (only `static` applies to {preset})")
    config = model.config
    if "C" in variant or "G" in variant or "sc" in variant:
        config = config.with_chunking(variant.get("C"), variant.get("G"), variant.get("sc"))
    if "kb" in variant:
        config = dataclasses.replace(config, attention=dataclasses.replace(config.attention,
                                                                           key_block=variant["kb"]))
    if "kp" in variant:
        config = dataclasses.replace(config, attention=dataclasses.replace(config.attention,
                                                                           key_parts=variant["kp"]))
    if "pallas" in variant:
        config = dataclasses.replace(config, attention=dataclasses.replace(
            config.attention, kernel="pallas" if variant["pallas"] else "xla"))
    if "rec" in variant:
        config = dataclasses.replace(config, gdn=dataclasses.replace(
            config.gdn, recurrence="pallas" if variant["rec"] else "xla"))
    if "unroll" in variant:
        config = dataclasses.replace(config, scan_layers=not variant["unroll"])
    return HybridLM(config, backend=model.backend, **loop), params


def time_prefill(model, params, tokens: np.ndarray, start_state, repeats: int) -> tuple[float, str]:
    """Warm median (ms) of model.prefill(tokens) from copies of `start_state` (made beforehand), and
    a fingerprint of the last call's logits (their float64 sum, hex): equal fingerprints across
    processes (e.g. XLA flag settings) mean the same numbers."""
    none = np.zeros((0,), np.int32)
    states = [jax.tree_util.tree_map(lambda leaf: leaf.copy(), start_state) for _ in range(repeats + 2)]
    jax.block_until_ready(states)
    times = []
    for index in range(repeats + 2):
        begin = time.perf_counter()
        logits = jax.block_until_ready(model.prefill(params, tokens, states.pop(), none))[0]
        if index >= 2:
            times.append(time.perf_counter() - begin)
    fingerprint = float(np.asarray(logits, np.float64).sum()).hex()
    return statistics.median(times) * 1e3, fingerprint


def probe(preset: str, variant: dict, lengths: list[int], suffix: tuple[int, int] | None,
          repeats: int, dtype, check: bool = False) -> list[dict]:
    model, params = build(preset, variant, dtype)
    width = model.chunk_size * model.chunks_per_step
    rng = np.random.default_rng(0)
    rows = []
    begin = time.perf_counter()
    for length in lengths:
        tokens = rng.integers(0, model.vocab_size, (1, length), dtype=np.int32)
        ms, fingerprint = time_prefill(model, params, tokens, model.init_state(1), repeats)
        rows.append({"length": length, "from": 0, "ms": ms, "steps": -(-length // width),
                     "fingerprint": fingerprint})
    if suffix:
        resume, count = suffix
        prefix = rng.integers(0, model.vocab_size, (1, resume), dtype=np.int32)
        _, state, _ = model.prefill(params, prefix, model.init_state(1), np.zeros((0,), np.int32))
        tokens = rng.integers(0, model.vocab_size, (1, count), dtype=np.int32)
        ms, fingerprint = time_prefill(model, params, tokens, state, repeats)
        rows.append({"length": count, "from": resume, "ms": ms, "steps": -(-count // width),
                     "fingerprint": fingerprint})
    bitwise = resume_difference(model, params, max(lengths))[1] == 0.0 if check else None
    setup_s = time.perf_counter() - begin
    label = ",".join(f"{key}={value}" for key, value in variant.items()) or "preset"
    for row in rows:
        row.update(preset=preset, variant=label, chunk_size=model.chunk_size,
                   chunks_per_step=model.chunks_per_step, run_s=setup_s, resume_bitwise=bitwise)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3.5-0.8b-group")
    parser.add_argument("--variants", default="", help="';'-separated variants (module docstring)")
    parser.add_argument("--lengths", default="256,1024,8192")
    parser.add_argument("--suffix", default="", help="R:N, N tokens from a state of R tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check-resume", action="store_true",
                        help="per variant, check a resume on the chunk grid bitwise at the longest length")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    suffix = tuple(int(x) for x in args.suffix.split(":")) if args.suffix else None
    variants = [parse_variant(text) for text in args.variants.split(";")] if args.variants else [{}]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"{'variant':<24} {'C':>4} {'G':>2} {'from':>6} {'L':>6} {'ms':>9} {'ms/step':>8} {'run s':>6} bitwise  logits fingerprint")
    rows = []
    for variant in variants:
        for row in probe(args.preset, variant, lengths, suffix, args.repeats, args.dtype,
                         args.check_resume):
            rows.append(row)
            print(f"{row['variant']:<24} {row['chunk_size']:>4} {row['chunks_per_step']:>2} "
                  f"{row['from']:>6} {row['length']:>6} {row['ms']:>9.2f} "
                  f"{row['ms'] / row['steps']:>8.2f} {row['run_s']:>6.1f} {row['resume_bitwise']!s:<7} {row['fingerprint']}",
                  flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows},
                      handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
