"""protocol.restore_state: a concrete slot index is validated on the host; a traced one stays jittable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.protocol import Checkpoints, KVCache, RecurrentState, State, restore_state


def emitted():
    """Two rows, three slots: row 0 holds real checkpoints in slots 0, 1; row 1 only in slot 0."""
    ssm = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    conv = -ssm[..., None]
    lengths = jnp.asarray([[4, 8, 0], [4, 0, 0]], jnp.int32)
    return Checkpoints(recurrent=(RecurrentState(ssm, conv),), lengths=lengths)


def state():
    kv = (KVCache(k=jnp.ones((2, 8, 1, 1)), v=jnp.ones((2, 8, 1, 1))),)
    return State(recurrent=(RecurrentState(jnp.zeros((2, 2)), jnp.zeros((2, 2, 1))),), kv=kv,
                 length=jnp.asarray([8, 8], jnp.int32))


def test_a_real_slot_restores_its_state_and_length():
    restored = restore_state(state(), emitted(), np.asarray([1, 0], np.int32))
    np.testing.assert_array_equal(restored.recurrent[0].ssm, [[2, 3], [6, 7]])
    np.testing.assert_array_equal(restored.length, [8, 4])


@pytest.mark.parametrize("k, message", [
    (np.asarray([0, 3]), r"k must lie in 0..2"),
    (np.asarray([-1, 0]), r"k must lie in 0..2"),
    (np.asarray([0]), r"shape \[2\]"),
    (np.asarray([0.0, 0.0]), "integer"),
    (np.asarray([2, 1]), r"padding slot .* rows \[0, 1\]"),
    (jnp.asarray([0, 1]), r"padding slot .* rows \[1\]"),
])
def test_a_concrete_bad_slot_index_is_refused_naming_the_problem(k, message):
    with pytest.raises(ValueError, match=message):
        restore_state(state(), emitted(), k)


def test_a_traced_slot_index_is_not_checked_so_restore_stays_jittable():
    restore = jax.jit(restore_state)
    np.testing.assert_array_equal(restore(state(), emitted(), jnp.asarray([1, 0])).length, [8, 4])
    assert restore(state(), emitted(), jnp.asarray([2, 1])).length.tolist() == [0, 0]   # unchecked
