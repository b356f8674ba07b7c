"""check_model catches broken models: each mutant of mamba2-tiny breaks one promise of the contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.models import create
from sparse_prefix.protocol import Checkpoints
from sparse_prefix.testing import check_model


@pytest.fixture(scope="module")
def tiny():
    return create("mamba2-tiny", dtype=jnp.float32)


class Wrapper:
    """Delegates the whole contract to a correct model; mutants override one method."""

    def __init__(self, inner):
        self.inner = inner
        self.chunk_size, self.vocab_size = inner.chunk_size, inner.vocab_size
        self.max_length = inner.max_length

    def init_state(self, batch):
        return self.inner.init_state(batch)

    def prefill(self, params, tokens, state, checkpoints, lengths=None):
        return self.inner.prefill(params, tokens, state, checkpoints, lengths)

    def decode(self, params, token, state):
        return self.inner.decode(params, token, state)

    def restore(self, state, checkpoints, k):
        return self.inner.restore(state, checkpoints, k)


class ShiftedCheckpoints(Wrapper):
    """Emits each slot's state one slot late (an off-by-one in the emission loop)."""

    def prefill(self, params, tokens, state, checkpoints, lengths=None):
        logits, final, emitted = super().prefill(params, tokens, state, checkpoints, lengths)
        rolled = jax.tree_util.tree_map(lambda leaf: jnp.roll(leaf, 1, axis=1), emitted.recurrent)
        return logits, final, Checkpoints(rolled, emitted.lengths)


class ForgetsItsState(Wrapper):
    """Resumes from a zero recurrent state whatever it is given (keeps only the length)."""

    def prefill(self, params, tokens, state, checkpoints, lengths=None):
        fresh = self.inner.init_state(np.shape(tokens)[0])._replace(length=state.length)
        return super().prefill(params, tokens, fresh, checkpoints, lengths)


class OffGridDrift(Wrapper):
    """Perturbs the final state by 1e-3 when the call resumes off the chunk grid."""

    def prefill(self, params, tokens, state, checkpoints, lengths=None):
        logits, final, emitted = super().prefill(params, tokens, state, checkpoints, lengths)
        off = (np.asarray(final.length) - np.asarray(lengths if lengths is not None else
                                                     np.shape(tokens)[1])) % self.chunk_size != 0
        scale = jnp.asarray(np.where(off, 1e-3, 0.0), jnp.float32)
        drifted = tuple(layer._replace(ssm=layer.ssm + scale[:, None, None, None])
                        for layer in final.recurrent)
        return logits, final._replace(recurrent=drifted), emitted


class NoisyDecode(Wrapper):
    """Decode logits off by 1e-2 (e.g. a wrong dt discretisation in the one-token path)."""

    def decode(self, params, token, state):
        logits, state = super().decode(params, token, state)
        return logits + 1e-2, state


class WrongRestore(Wrapper):
    """Restores slot k + 1 instead of slot k."""

    def restore(self, state, checkpoints, k):
        return super().restore(state, checkpoints, jnp.minimum(jnp.asarray(k) + 1,
                                                              checkpoints.lengths.shape[1] - 1))


def test_the_unmodified_model_passes(tiny):
    model, params = tiny
    report = check_model(Wrapper(model), params)
    assert report["prefill_calls"] >= 20 and report["decode_calls"] == 3


@pytest.mark.parametrize("mutant, message", [
    (ShiftedCheckpoints, "checkpoint slot"),
    (ForgetsItsState, "split 1"),
    (OffGridDrift, "split 1: state"),
    (NoisyDecode, "decode step 0: logits"),
    (WrongRestore, "restore"),
])
def test_each_broken_promise_is_reported_by_name(tiny, mutant, message):
    model, params = tiny
    with pytest.raises(AssertionError, match=message):
        check_model(mutant(model), params)


def test_arguments_are_validated(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="batch"):
        check_model(model, params, batch=0)
    with pytest.raises(ValueError, match="length"):
        check_model(model, params, length=4)


def test_emission_difference_is_zero_on_the_grid_and_sees_a_wrong_slot():
    from sparse_prefix.models import create
    from sparse_prefix.testing import emission_difference
    model, params = create("mamba2-tiny", dtype=jnp.float32)
    assert emission_difference(model, params, 64, [16, 32, 64]) == 0.0
    assert emission_difference(model, params, 64, [16, 32, 64], check=[1]) == 0.0

    class Shifted:                      # emits the states one slot off: must be caught
        def __getattr__(self, name):
            return getattr(model, name)

        def prefill(self, params, tokens, state, checkpoints, lengths=None):
            logits, final, emitted = model.prefill(params, tokens, state, checkpoints, lengths)
            rolled = jax.tree_util.tree_map(lambda leaf: jnp.roll(leaf, 1, axis=1), emitted.recurrent)
            return logits, final, emitted._replace(recurrent=rolled)

    assert emission_difference(Shifted(), params, 64, [16, 32, 64]) > 0.0
