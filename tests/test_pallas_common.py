"""Shared Pallas helpers (`models.pallas_common`), run in Pallas' interpreter off a GPU."""

import jax.numpy as jnp
import numpy as np

from sparse_prefix.models.pallas_common import padding_zeroed_buffers


def test_padding_slots_are_filled_to_the_last_element_and_real_slots_are_left_alone():
    real = np.array([[True, False, True, False], [False, True, True, True]])
    shapes = [((3, 8, 16), jnp.float32), ((3, 51), jnp.bfloat16), ((5,), jnp.float32)]
    # 4 programs per slot, blocks of <= 32: 384 elements = 12 blocks (3 per program), 153 = 153
    # blocks of 1 (the odd size), 5 = 5 blocks of 1 (some programs have none)
    outs = padding_zeroed_buffers(shapes, jnp.asarray(real), programs_per_slot=4, max_block=32,
                                  value=7.0)
    for out, (rest, dtype) in zip(outs, shapes):
        assert out.shape == (2, 4) + rest and out.dtype == dtype
        values = np.asarray(out, np.float32)
        assert np.all(values[~real] == 7.0)
        assert not np.any(values[real] == 7.0)        # never written (the interpreter's fill)
