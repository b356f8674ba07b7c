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
