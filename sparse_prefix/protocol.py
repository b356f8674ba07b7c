"""The model contract: what a recurrent or hybrid LM offers the cache, and the typed state it speaks.

Shape legend (used in every docstring of the project):
  B  batch rows                  T  tokens in one call (padded to a bucket)
  K  checkpoint slots per row    C  chunk size (the model's exactness grid)
  S  KV buffer length (max_length)
  H  heads   P/Dk/Dv  head dims   N  SSM state size   W  conv kernel width   Dc conv channels
  V  vocabulary                  d  model width

A `State` is a NamedTuple of three parts:
  * ``recurrent``: a tuple with one entry per recurrent layer, each a `RecurrentState` whose ``ssm``
    leaf is float32 and whose ``conv`` leaf holds the last W-1 inputs of the layer's causal conv;
  * ``kv``: a tuple with one `KVCache` per attention layer (dense buffers of S positions), or None
    for a pure SSM;
  * ``length``: int32[B], the tokens each row has consumed.  Attention reads positions < length only,
    so truncating the KV to a checkpoint is setting ``length`` -- no copy.  (DESIGN.md kept a length
    per KV layer; one per state is enough and also serves pure SSMs.)

Checkpoints emitted by `prefill` are `Checkpoints`: the recurrent part only, every leaf with leading
[B, K] axes, plus the absolute ``lengths`` int32[B, K] the states belong to (0 marks a padding slot).
The KV of a prefix travels once, in the final state, because it is dense anyway.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


class RecurrentState(NamedTuple):
    """The state of one recurrent layer (Mamba2 SSD or Gated DeltaNet).

    Attributes:
      ssm: float32[B, H, A, C] -- Mamba2: [B, H, P, N]; Gated DeltaNet: [B, H, Dk, Dv]. Always float32.
      conv: [B, W-1, Dc] -- the last W-1 inputs of the depthwise causal conv (compute dtype), oldest
        first. Padded steps never enter it.
    """

    ssm: Array
    conv: Array


class KVCache(NamedTuple):
    """Dense K/V buffers of one attention layer. k, v: [B, S, Hkv, D] (compute dtype).

    Only positions < `State.length` are meaningful; the rest may hold stale (finite) values.
    """

    k: Array
    v: Array


class State(NamedTuple):
    """The full inference state of a model. See the module docstring."""

    recurrent: tuple
    kv: tuple | None
    length: Array


class Checkpoints(NamedTuple):
    """Recurrent states emitted at checkpoint positions in one prefill pass.

    Attributes:
      recurrent: same tree structure as `State.recurrent`; every leaf [B, K, ...].
      lengths: int32[B, K] -- the absolute length (tokens consumed) each slot's state belongs to;
        0 marks an unused (padding) slot.
    """

    recurrent: tuple
    lengths: Array


class MemoryProfile(NamedTuple):
    """What caching costs for a model (placement and eviction need it).

    Attributes:
      checkpoint_elements / checkpoint_bytes: one checkpoint's recurrent state (all recurrent layers,
        SSM state and conv window), batch row excluded.
      kv_elements_per_token / kv_bytes_per_token: dense attention KV per cached token (0 for pure SSMs).
      ssm_elements: the SSM-state elements alone (the paper's ratio r counts these against KV per token).
    """

    checkpoint_elements: int
    checkpoint_bytes: int
    kv_elements_per_token: int
    kv_bytes_per_token: int
    ssm_elements: int


@runtime_checkable
class RecurrentLM(Protocol):
    """The contract a model implements to be cached by sparse-prefix (public).

    Attributes:
      chunk_size: the exactness grid C. A resume from a state at a multiple of C (counted from the
        start of the sequence) reproduces the uncached run bitwise (same batch size).
      vocab_size: V.
      max_length: S, the longest sequence a state can hold (attention KV buffer length).
    """

    chunk_size: int
    vocab_size: int
    max_length: int

    def init_state(self, batch: int) -> State:
        """An empty state for `batch` rows (zeros, length 0)."""
        ...

    def prefill(self, params: PyTree, tokens: Array, state: State, checkpoints: Array,
                lengths: Array | None = None) -> tuple[Array, State, Checkpoints]:
        """Consume `tokens` from `state`, emitting recurrent states at `checkpoints` in the same pass.

        Args:
          params: the model's parameter pytree.
          tokens: int32[B, T]; row b's real tokens are tokens[b, :lengths[b]].
          state: the state to resume from (`init_state` for a fresh start).
          checkpoints: int32[K] (shared by all rows) or int32[B, K]: positions relative to the start
            of `tokens`; entries <= 0 are padding; valid ones strictly increase within 1..lengths[b].
          lengths: int32[B] real lengths (>= 1), default T for every row.

        Returns:
          (logits f32[B, V] at each row's last real token, the final state, the checkpoints).
        """
        ...

    def decode(self, params: PyTree, token: Array, state: State) -> tuple[Array, State]:
        """One token per row: token int32[B] -> (logits f32[B, V], next state)."""
        ...

    def restore(self, state: State, checkpoints: Checkpoints, k: Array) -> State:
        """The state at checkpoint slot k (int32[B]) of each row.

        The recurrent part comes from `checkpoints`; the KV buffers come from `state` (which must hold
        at least that prefix), truncated by setting `length` to the checkpoint's length. k must select
        a real checkpoint (0 <= k < K, length > 0); a concrete k that does not raises ValueError.
        """
        ...


@runtime_checkable
class FusablePrefill(Protocol):
    """Optional (public): a `RecurrentLM` whose prefill program can be compiled together with the
    caller's own state assembly -- the Engine gathers a resumed state out of its store inside the
    prefill's program, one dispatch instead of two (a jitted call's host cost grows with the arrays it
    returns, and a restored State has one per recurrent and KV leaf).

    Attributes:
      prefill_program: a pure, traceable ``(params, tokens, state, checkpoints, lengths) -> (logits,
        final, emitted)`` on arguments `prepare_prefill` returned (the same object on every access,
        so callers can cache their compilations on it). It computes exactly what `prefill` computes.
    """

    prefill_program: Any

    def prepare_prefill(self, tokens: Array, checkpoints: Array, lengths: Array | None,
                        state_length: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`prefill`'s host side: validate (ValueError / TypeError naming the problem) and pad.

        Args: as `prefill`, with state_length int[B] the host lengths of the state resumed from.
        Returns: (tokens int32[B, T'], checkpoints int32[B, K'], lengths int32[B]) padded to the
          shapes `prefill` compiles for.
        """
        ...


def take_checkpoint(checkpoints: Checkpoints, k: Array) -> tuple[tuple, Array]:
    """Row-wise selection of one slot: returns (recurrent tuple with [B, ...] leaves, lengths int32[B])."""
    k = jnp.asarray(k, jnp.int32)
    rows = jnp.arange(k.shape[0])
    recurrent = jax.tree_util.tree_map(lambda leaf: leaf[rows, k], checkpoints.recurrent)
    return recurrent, checkpoints.lengths[rows, k]


def _concrete(value: Any) -> np.ndarray | None:
    """`value` as a host array, or None while it is traced (inside jit / vmap)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_restore_slot(checkpoints: Checkpoints, k: Any) -> None:
    """Validate the slot index of `restore` when it is concrete; nothing is checked while traced.

    Args:
      checkpoints: emitted `Checkpoints` (lengths int32[B, K]).
      k: the slot per row, int[B] with 0 <= k < K, selecting a real checkpoint (its length > 0: a
        padding slot is not a checkpoint). The length check needs concrete lengths too.

    Raises:
      ValueError: naming the problem (shape, dtype, range, or the rows that select a padding slot).
    """
    k_np = _concrete(k)
    if k_np is None:
        return
    batch, slots = np.shape(checkpoints.lengths)
    if k_np.dtype.kind not in "iu" or k_np.shape != (batch,):
        raise ValueError(f"k must be an integer array of shape [{batch}] (one slot per row), got dtype "
                         f"{k_np.dtype} and shape {k_np.shape}")
    if np.any((k_np < 0) | (k_np >= slots)):
        raise ValueError(f"k must lie in 0..{slots - 1} (the emitted slots), got {k_np.tolist()}")
    lengths = _concrete(checkpoints.lengths)
    if lengths is not None:
        padding = lengths[np.arange(batch), k_np] <= 0
        if np.any(padding):
            rows = np.flatnonzero(padding).tolist()
            raise ValueError(f"k selects a padding slot (length 0) in rows {rows}: a padding slot is "
                             f"not a checkpoint")


def restore_state(state: State, checkpoints: Checkpoints, k: Array) -> State:
    """Generic `RecurrentLM.restore` for models that use this module's state layout.

    A concrete `k` is validated on the host (`check_restore_slot`); a traced one (inside jit) is not,
    and an out-of-range traced index is clamped by the gather like any JAX index."""
    check_restore_slot(checkpoints, k)
    recurrent, lengths = take_checkpoint(checkpoints, k)
    return State(recurrent=recurrent, kv=state.kv, length=lengths.astype(jnp.int32))
