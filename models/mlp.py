"""The SwiGLU MLP block: down(silu(gate(x)) * up(x)).  x [..., d] -> [..., d], compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .layers import normal_init

Array = jax.Array


def init_mlp_params(key: Array, d_model: int, d_ff: int, dtype) -> dict:
    """gate_proj / up_proj [d, d_ff], down_proj [d_ff, d]."""
    keys = jax.random.split(key, 3)
    return {
        "gate_proj": normal_init(keys[0], (d_model, d_ff), 0.02, dtype),
        "up_proj": normal_init(keys[1], (d_model, d_ff), 0.02, dtype),
        "down_proj": normal_init(keys[2], (d_ff, d_model), 0.02, dtype),
    }


def swiglu(params: dict, x: Array) -> Array:
    """SwiGLU on x [..., d] in x.dtype (the activation in float32)."""
    dtype = x.dtype
    gate = jnp.einsum("...d,df->...f", x, params["gate_proj"].astype(dtype))
    up = jnp.einsum("...d,df->...f", x, params["up_proj"].astype(dtype))
    hidden = (jax.nn.silu(gate.astype(jnp.float32)).astype(dtype) * up).astype(dtype)
    return jnp.einsum("...f,fd->...d", hidden, params["down_proj"].astype(dtype))
