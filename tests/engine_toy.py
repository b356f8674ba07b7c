"""ToyLM: a protocol model cheap enough to push thousands of requests through the Engine in a test.

One recurrent layer (h <- 0.9 h + embed(x), conv window = the last embedding) and, optionally, one
"attention" layer whose KV buffers hold every position's embedding and state; a position's hidden row
is h plus the mean of the cached values up to it. It speaks the real contract (State, Checkpoints,
`run_chunks`), so chunk-grid resumes are bitwise exact like the real models'. Its programs are
module-level jits keyed by static config, shared by every instance and test file.
"""

from __future__ import annotations

import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.chunking import check_prefill_args, run_chunks
from sparse_prefix.protocol import KVCache, MemoryProfile, RecurrentState, State, restore_state

WIDTH = 3


def _step(params, state, tokens, positions, valid, *, with_kv):
    """Chunk step: tokens / positions int32[B, C], valid bool[B, C] -> (state, hidden [B, C, WIDTH])."""
    layer = state.recurrent[0]
    rows = jnp.arange(tokens.shape[0])

    def one(carry, inputs):
        h, conv, kv = carry
        x, pos, ok = inputs
        e = params["embed"][x]
        mask = ok[:, None]
        h = jnp.where(mask, 0.9 * h + e, h)
        conv = jnp.where(mask[:, None], e[:, None, :], conv)
        out = h
        if with_kv:
            k = kv.k.at[rows, pos, 0].set(jnp.where(mask, e, kv.k[rows, pos, 0]))
            v = kv.v.at[rows, pos, 0].set(jnp.where(mask, h, kv.v[rows, pos, 0]))
            kv = KVCache(k, v)
            seen = jnp.arange(k.shape[1])[None, :] <= pos[:, None]
            mean = jnp.sum(jnp.where(seen[:, :, None], v[:, :, 0], 0.0), axis=1) / (pos[:, None] + 1.0)
            out = h + 0.5 * mean
        return (h, conv, kv), out

    kv0 = state.kv[0] if with_kv else None
    (h, conv, kv), hidden = jax.lax.scan(one, (layer.ssm, layer.conv, kv0),
                                         (tokens.T, positions.T, valid.T))
    new = state._replace(recurrent=(RecurrentState(h, conv),), kv=(kv,) if with_kv else None)
    return new, hidden.swapaxes(0, 1)


@functools.partial(jax.jit, static_argnames=("chunk_size", "with_kv"))
def _prefill(params, tokens, state, checkpoints, lengths, *, chunk_size, with_kv):
    step = functools.partial(_step, params, with_kv=with_kv)
    hidden, final, emitted = run_chunks(step, state, tokens, lengths, checkpoints,
                                        chunk_size=chunk_size, hidden_size=WIDTH)
    return hidden @ params["head"], final, emitted


@functools.partial(jax.jit, static_argnames=("with_kv",))
def _decode(params, token, state, *, with_kv):
    positions = state.length[:, None]
    new, hidden = _step(params, state, token[:, None], positions, jnp.ones_like(positions, bool),
                        with_kv=with_kv)
    return hidden[:, 0] @ params["head"], new._replace(length=state.length + 1)


class ToyLM:
    """A tiny `RecurrentLM`; `gate` (a threading.Event) holds prefill calls whose real tokens include
    `gate_token` until it is set, to keep a request in flight on purpose."""

    def __init__(self, *, chunk_size: int = 4, vocab_size: int = 32, max_length: int = 48,
                 with_kv: bool = True):
        self.chunk_size, self.vocab_size, self.max_length = chunk_size, vocab_size, max_length
        self.with_kv = with_kv
        self.config = {"toy": True, "chunk": chunk_size, "vocab": vocab_size, "len": max_length,
                       "kv": with_kv}
        self.gate: threading.Event | None = None
        self.gate_token = 0
        self.prefill_calls = 0

    def init_params(self, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        return {"embed": jnp.asarray(rng.normal(size=(self.vocab_size, WIDTH)), jnp.float32),
                "head": jnp.asarray(rng.normal(size=(WIDTH, self.vocab_size)), jnp.float32)}

    def init_state(self, batch: int) -> State:
        kv = (KVCache(k=jnp.zeros((batch, self.max_length, 1, WIDTH), jnp.float32),
                      v=jnp.zeros((batch, self.max_length, 1, WIDTH), jnp.float32)),)
        return State(recurrent=(RecurrentState(ssm=jnp.zeros((batch, WIDTH), jnp.float32),
                                               conv=jnp.zeros((batch, 1, WIDTH), jnp.float32)),),
                     kv=kv if self.with_kv else None, length=jnp.zeros((batch,), jnp.int32))

    def abstract_state(self, batch: int) -> State:
        return jax.eval_shape(lambda: self.init_state(batch))

    def memory_profile(self) -> MemoryProfile:
        kv = 2 * WIDTH * 4 if self.with_kv else 0
        return MemoryProfile(checkpoint_elements=2 * WIDTH, checkpoint_bytes=2 * WIDTH * 4,
                             kv_elements_per_token=kv // 4, kv_bytes_per_token=kv, ssm_elements=WIDTH)

    def prefill(self, params, tokens, state, checkpoints, lengths=None):
        tokens, lengths, checkpoints = check_prefill_args(
            tokens, lengths, checkpoints, vocab_size=self.vocab_size, max_length=self.max_length,
            state_length=np.asarray(state.length))
        self.prefill_calls += 1
        real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
        if self.gate is not None and np.any(real & (tokens == self.gate_token)):
            self.gate.wait(timeout=60)
        return _prefill(params, tokens, state, checkpoints, lengths, chunk_size=self.chunk_size,
                        with_kv=self.with_kv)

    def decode(self, params, token, state):
        return _decode(params, jnp.asarray(token, jnp.int32), state, with_kv=self.with_kv)

    def restore(self, state, checkpoints, k):
        return restore_state(state, checkpoints, k)


def uncached(model, params, rows, slots: int = 8) -> np.ndarray:
    """Reference logits f32[B, V]: one uncached prefill of `rows` (padded like the Engine pads, from a
    state committed to the device like the Engine's, so both share one compilation)."""
    batch = len(rows)
    tokens = np.zeros((batch, model.max_length), np.int32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)] = row
    lengths = np.asarray([len(r) for r in rows], np.int32)
    state = jax.device_put(model.init_state(batch), jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    logits, _, _ = model.prefill(params, tokens, state,
                                 np.zeros((batch, slots), np.int32), lengths)
    return np.asarray(logits)
