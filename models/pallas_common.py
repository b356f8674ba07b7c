"""What every Pallas (Triton) kernel module of `models` shares: where kernels run, which block sizes
Triton takes, and the dot precision for an operand dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def interpret() -> bool:
    """Pallas' interpreter unless the default backend is a GPU (the tests run the kernels on CPU)."""
    return jax.default_backend() != "gpu"


def is_pow2(value: int) -> bool:
    """Whether `value` is a positive power of two (Triton's block dimensions must be)."""
    return value > 0 and value & (value - 1) == 0


def dot_precision(dtype):
    """HIGHEST for float32 operands (IEEE in Triton; TF32 would round them), the default else."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_f32(a: jax.Array, b: jax.Array, precision, contract_a: int = 1) -> jax.Array:
    """a [M, K] @ b [K, N] (a^T @ b for a [K, M] with contract_a=0), accumulated in float32 (the
    kernels' dots)."""
    return jax.lax.dot_general(a, b, (((contract_a,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _largest_pow2_divisor(value: int, cap: int) -> int:
    block = 1
    while block < cap and value % (block * 2) == 0:
        block *= 2
    return block


def padding_zeroed_buffers(shapes: list[tuple[tuple[int, ...], object]], real: jax.Array,
                           *, programs_per_slot: int = 64, max_block: int = 4096,
                           value: float = 0.0) -> list[jax.Array]:
    """Checkpoint buffers [B, K, *rest] in one kernel launch, zeroing only the padding slots.

    A prefill's emitted buffers start as zeros so that slots no checkpoint fills (padding) read as
    zeros; but every real slot is written by the prefill itself, once, so zeroing it first only
    costs bandwidth (mamba2-1.3b, K = 32 at L = 8192: 3.2 GB, ~0.7 ms on an H200). Here the real
    slots are left as allocated (their contents are undefined until the prefill writes them) and
    the padding slots are zeroed, by B x K x `programs_per_slot` programs (a real slot's programs
    return at once).

    Args:
      shapes: (rest shape, dtype) per buffer.  real: bool[B, K], the slots a checkpoint will fill.
      programs_per_slot, max_block: the parallel split of a slot (blocks of the largest power of
        two <= max_block dividing a buffer's slot size).  value: what padding slots hold (0).

    Returns:
      one array [B, K, *rest] per entry of `shapes`: `value` in padding slots, undefined elsewhere.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    import math

    batch, slots = real.shape
    flats = [math.prod(rest) for rest, _ in shapes]
    blocks = [_largest_pow2_divisor(flat, max_block) for flat in flats]
    steps = [-(-flat // block // programs_per_slot) for flat, block in zip(flats, blocks)]

    def kernel(real_ref, *out_refs):
        b, k, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)

        @pl.when(real_ref[b, k] == 0)
        def _zero():
            for ref, flat, block, count in zip(out_refs, flats, blocks, steps):
                for step in range(count):
                    index = part + step * programs_per_slot

                    @pl.when(index < flat // block)
                    def _write(ref=ref, block=block, index=index):
                        start = pl.multiple_of(index * block, block)
                        ref[b, k, pl.ds(start, block)] = jnp.full((block,), value, ref.dtype)

    outs = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((batch, slots, flat), dtype)
                   for flat, (_, dtype) in zip(flats, shapes)],
        grid=(batch, slots, programs_per_slot),
        in_specs=[pl.no_block_spec], out_specs=[pl.no_block_spec] * len(shapes),
        interpret=interpret(),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        name="padding_zeroed_buffers",
    )(real.astype(jnp.int32))
    return [out.reshape((batch, slots) + tuple(rest)) for out, (rest, _) in zip(outs, shapes)]
