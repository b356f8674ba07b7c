"""The one chunked-prefill driver every model uses: a loop over fixed-size chunks that emits states.

A model supplies a *chunk step* -- ``step(state, tokens[B, C], positions[B, C], valid[B, C]) ->
(state, hidden[B, C, d])`` -- that runs all its layers on one chunk. Within every chunk the valid
slots are a prefix (real tokens first, padding after), and a padded slot must leave the state
exactly unchanged (dt = 0, beta = 0, no KV write, no conv-window shift).

The driver lays the call's tokens out in chunks *segment by segment*: the tokens between two
consecutive checkpoints start a fresh chunk, so every checkpoint falls on a chunk end and its state
is the loop carry at that point -- one pass, no capture pass, and the emitted state is computed with
exactly the chunks a prefill truncated there would use. Checkpoints on the chunk grid add no chunk;
an off-grid one costs at most one partially filled chunk.

Because every chunk runs the same compiled step at the same shapes, a prefill resumed from a state
at a multiple of C reproduces the uncached computation bitwise.

The loop over group steps comes in two forms (`STEP_LOOPS`), computing the same numbers:
  * "dynamic": a `lax.while_loop` whose trip count the device derives from the lengths and
    checkpoints: one program per padded width T. On a GPU every iteration copies its predicate to
    the host, so the call returns only when the device is done.
  * "static": the trip count is T / (G C), fixed when tracing; the host pads T to exactly the steps
    the call needs (`plan_steps`). One program per step count, no host round trip: the call returns
    as soon as the work is queued, and host work after it overlaps the device.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.protocol import Checkpoints, State

Array = jax.Array
ChunkStep = Callable[[State, Array, Array, Array], tuple[State, Array]]
GroupStep = Callable[[State, Array, Array, Array, bool], tuple[State, Array, "tuple | None"]]


class ChunkPlan(NamedTuple):
    """Where each segment of a prefill call lives in chunk space.

    Segment s (0..K) spans tokens [start[:, s], end[:, s]) and chunks [first_chunk[:, s],
    first_chunk[:, s + 1]). Segment s < K ends at checkpoint slot s (empty for a padding slot);
    segment K runs from the last checkpoint to the row's length.

    Attributes:
      start: int32[B, K+1]; end: int32[B, K+1]; first_chunk: int32[B, K+2] (last column = the
      row's total chunks); emit_chunk: int32[B, K], the chunk after which slot k's state is final
      (-1 for a padding slot); num_chunks: int32[] the largest row total.
    """

    start: Array
    end: Array
    first_chunk: Array
    emit_chunk: Array
    num_chunks: Array


def plan_chunks(lengths: Array, checkpoints: Array, chunk_size: int) -> ChunkPlan:
    """Segment layout for rows of `lengths` int32[B] with `checkpoints` int32[B, K] (<= 0: padding)."""
    lengths = lengths.astype(jnp.int32)
    checkpoints = checkpoints.astype(jnp.int32)
    batch, slots = checkpoints.shape
    valid = checkpoints > 0
    boundary = jax.lax.cummax(jnp.where(valid, checkpoints, 0), axis=1) if slots else checkpoints
    start = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), boundary], axis=1)
    end = jnp.concatenate([boundary, lengths[:, None]], axis=1)
    seg_chunks = (end - start + chunk_size - 1) // chunk_size
    first_chunk = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(seg_chunks, axis=1, dtype=jnp.int32)], axis=1)
    emit_chunk = jnp.where(valid, first_chunk[:, 1:slots + 1] - 1, -1)
    return ChunkPlan(start, end, first_chunk, emit_chunk, jnp.max(first_chunk[:, -1]))


def chunk_slots(plan: ChunkPlan, chunk: Array, chunk_size: int) -> tuple[Array, Array]:
    """Token indices int32[B, C] (clipped, relative to the call) and validity bool[B, C] of a chunk."""
    segment = jnp.sum(plan.first_chunk[:, 1:] <= chunk, axis=1)
    last_segment = plan.start.shape[1] - 1
    in_range = segment <= last_segment
    segment = jnp.minimum(segment, last_segment)
    rows = jnp.arange(segment.shape[0])
    seg_start = plan.start[rows, segment]
    seg_end = plan.end[rows, segment]
    src = (seg_start + (chunk - plan.first_chunk[rows, segment]) * chunk_size)[:, None] \
        + jnp.arange(chunk_size, dtype=jnp.int32)[None, :]
    valid = (src < seg_end[:, None]) & in_range[:, None]
    return jnp.where(valid, src, 0), valid


class EmittingGroupStep(NamedTuple):
    """A group step that writes the emitted states itself: the opt-in emission of `run_chunks`.

    Attributes:
      step: ``step(state, tokens[B, G, C], positions[B, G, C], valid[B, G, C], buffers, slot)
        -> (state, hidden[B, G, C, d], buffers)``. In a call without checkpoint slots (K = 0)
        `buffers` and `slot` are None and nothing is emitted (no emission code compiled).
        Otherwise slot int32[B, G] is the checkpoint slot that the state after chunk g of the group
        goes to, K (out of range) where that state is not emitted; the step writes exactly those
        states into `buffers`, in place (`write_emitted` does it with one dropping scatter).
      init_buffers: ``init_buffers(state, slots) -> buffers``: zeroed checkpoint buffers for K =
        slots, in any layout the step likes (layer-stacked, per layer, ...); carried in the loop.
      to_recurrent: ``to_recurrent(buffers) -> tuple``: the buffers in the protocol layout (the
        structure of `State.recurrent`, leaves [B, K, ...]), called once per call.
      init_padding: None, or ``init_padding(state, real) -> buffers`` (real bool[B, K]: the slots a
        checkpoint fills): buffers like `init_buffers`' whose padding slots are zero and whose real
        slots may hold anything -- `run_chunks` writes every real slot exactly once per call, so
        zeroing them first is wasted bandwidth. Used instead of `init_buffers` when given.
      any_group: the step takes any G (its shapes come from its inputs), so `run_chunks`'
        `fit_single_chunk` may run it one chunk at a time.
    """

    step: Callable
    init_buffers: Callable
    to_recurrent: Callable
    init_padding: Callable | None = None
    any_group: bool = False


class EmitTarget(NamedTuple):
    """Where one layer of a layer-stacked group step writes its state after each of the G chunks
    (`write_emitted` with `layer`), instead of returning the states for the driver to scatter.

    Attributes:
      buffers: the layer kind's checkpoint buffers, leaves [B, K, R, ...] (R: the layers stacked).
      slot: int32[B, G], the slot of each chunk's state; K (out of range) where it is not emitted.
      layer: int32 scalar (may be traced), the index on the buffers' axis 2.
    """

    buffers: Any
    slot: Array
    layer: Array


def write_emitted(buffers, states, slot: Array, layer: Array | int | None = None):
    """Write per-chunk states into checkpoint buffers where a chunk is emitted (one scatter per leaf).

    Args:
      buffers: a pytree of leaves [B, K, ...] ([B, K, R, ...] with `layer`). states: the same
        structure with leaves [B, G, ...] (the state after each of G chunks). slot: int32[B, G],
        the slot of each chunk's state, K (out of range: dropped) for a chunk that is not emitted.
      layer: None, or the index (int32 scalar, may be traced) on the buffers' axis 2 that the
        states go to (a stack of layers' buffers written one layer at a time).

    Returns:
      the buffers with states[b, g] at [b, slot[b, g]] (or [b, slot[b, g], layer]) for every
      emitted chunk; only those bytes are written.
    """
    rows = jnp.arange(slot.shape[0])[:, None]
    index = (rows, slot) if layer is None else (rows, slot, layer)
    return jax.tree_util.tree_map(
        lambda buffer, value: buffer.at[index].set(value.astype(buffer.dtype), mode="drop"),
        buffers, states)


def single_chunk_group_step(step: ChunkStep) -> GroupStep:
    """Adapt a one-chunk step to the group-step signature (G = 1)."""

    def group_step(state, tokens, positions, valid, want_boundaries):
        state, hidden = step(state, tokens[:, 0], positions[:, 0], valid[:, 0])
        boundaries = (jax.tree_util.tree_map(lambda leaf: leaf[:, None], state.recurrent)
                      if want_boundaries else None)
        return state, hidden[:, None], boundaries

    return group_step


def _group_step(step, chunks_per_step: int | None) -> tuple[GroupStep, int]:
    if chunks_per_step is None:
        if isinstance(step, EmittingGroupStep):
            raise ValueError("an EmittingGroupStep needs chunks_per_step (its G)")
        return single_chunk_group_step(step), 1
    if not isinstance(chunks_per_step, int) or chunks_per_step < 1:
        raise ValueError(f"chunks_per_step must be a positive int or None, got {chunks_per_step!r}")
    return step, chunks_per_step


def _boundary_emission(group_step) -> EmittingGroupStep:
    """The classic protocol as an emitting step: the step returns every chunk's state
    (`want_boundaries`) and the driver scatters the emitted ones into [B, K, ...] buffers."""

    def step(current, tokens, positions, valid, buffers, slot):
        current, hidden, boundaries = group_step(current, tokens, positions, valid, buffers is not None)
        if buffers is not None:
            buffers = write_emitted(buffers, boundaries, slot)
        return current, hidden, buffers

    return EmittingGroupStep(step, zeroed_buffers, lambda buffers: buffers)


def zeroed_buffers(state: State, count: int):
    """Zero checkpoint buffers for K = `count`: `state.recurrent`'s structure, every leaf [B, ...]
    as [B, K, ...] (an `EmittingGroupStep.init_buffers` for steps that keep that layout)."""
    return jax.tree_util.tree_map(
        lambda leaf: jnp.zeros((leaf.shape[0], count) + leaf.shape[1:], leaf.dtype), state.recurrent)


STEP_LOOPS = ("dynamic", "static", "auto")


def resolve_step_loop(step_loop: str) -> str:
    """"dynamic" or "static" for a model's `step_loop` setting; "auto" is static on a GPU (where a
    device-counted loop costs a host round trip per step) and dynamic elsewhere (one program per
    padded width instead of one per step count)."""
    if step_loop not in STEP_LOOPS:
        raise ValueError(f"step_loop must be one of {STEP_LOOPS}, got {step_loop!r}")
    if step_loop == "auto":
        return "static" if jax.default_backend() == "gpu" else "dynamic"
    return step_loop


COMMAND_BUFFERS = ("on", "off", "auto")


def prefill_compiler_options(command_buffers: str, auto_default: str = "on") -> tuple:
    """XLA compiler options of a prefill program, as a hashable tuple of (name, value) pairs.

    `command_buffers` "off" turns XLA's command buffers (CUDA graphs) off for the program on a GPU:
    every kernel is launched on its own, and nothing is re-recorded when a call's buffers move (with
    them on, the loop body's graph is updated at the first step of every call while the GPU waits).
    "auto" takes `auto_default`. Off a GPU there is nothing to set: ().
    """
    if command_buffers not in COMMAND_BUFFERS:
        raise ValueError(f"command_buffers must be one of {COMMAND_BUFFERS}, got {command_buffers!r}")
    mode = auto_default if command_buffers == "auto" else command_buffers
    if mode == "off" and jax.default_backend() == "gpu":
        return (("xla_gpu_enable_command_buffer", ""),)
    return ()


def plan_chunk_count(lengths: np.ndarray, checkpoints: np.ndarray, chunk_size: int) -> int:
    """Chunks a call lays out (host side, numpy): `plan_chunks`' count, the most over the rows (>= 1).

    Args:
      lengths: int[B] (>= 1).  checkpoints: int[B, K] relative to the call (<= 0: padding).
      chunk_size: C.
    """
    lengths = np.asarray(lengths, np.int64)
    checkpoints = np.asarray(checkpoints, np.int64).reshape(lengths.shape[0], -1)
    if checkpoints.shape[1] == 0 or not checkpoints.any():          # one segment per row
        return max(1, -(-int(lengths.max()) // chunk_size))
    boundary = np.maximum.accumulate(np.where(checkpoints > 0, checkpoints, 0), axis=1) \
        if checkpoints.shape[1] else checkpoints
    start = np.concatenate([np.zeros((lengths.shape[0], 1), np.int64), boundary], axis=1)
    end = np.concatenate([boundary, lengths[:, None]], axis=1)
    return max(1, int(np.max(np.sum((end - start + chunk_size - 1) // chunk_size, axis=1))))


def plan_steps(lengths: np.ndarray, checkpoints: np.ndarray, chunk_size: int, chunks_per_step: int) -> int:
    """Group steps a call needs (host side, numpy): `plan_chunk_count` over G, rounded up.

    Args:
      lengths: int[B] (>= 1).  checkpoints: int[B, K] relative to the call (<= 0: padding).
      chunk_size: C.  chunks_per_step: G.
    """
    return -(-plan_chunk_count(lengths, checkpoints, chunk_size) // chunks_per_step)


def run_chunks(step, state: State, tokens: Array, lengths: Array, checkpoints: Array,
               *, chunk_size: int, hidden_size: int, hidden_dtype=jnp.float32,
               chunks_per_step: int | None = None, static_steps: bool = False,
               fit_single_chunk: bool = False) -> tuple[Array, State, Checkpoints]:
    """Drive a model's step over a prefill call, emitting recurrent states at `checkpoints`.

    Args:
      step: with `chunks_per_step=None`, a one-chunk `ChunkStep` (module docstring); with an int G,
        a `GroupStep` ``step(state, tokens[B, G, C], positions[B, G, C], valid[B, G, C],
        want_boundaries) -> (state, hidden[B, G, C, d], boundaries)`` that runs G consecutive chunks
        of the layout at once, where `boundaries` (only when `want_boundaries`, else None) has the
        structure of `state.recurrent` with leaves [B, G, ...]: the state after each of the G chunks;
        or an `EmittingGroupStep` (with an int G), which writes the emitted states itself.
        Each chunk's valid slots are a prefix of it; a chunk may be all padding (identity).
      state: the state to resume from; its `length` int32[B] is the absolute offset of tokens[:, 0].
      tokens: int32[B, T]. lengths: int32[B] (>= 1). checkpoints: int32[B, K] (<= 0: padding).
      chunk_size: C. hidden_size: d of the hidden rows the step returns.
      chunks_per_step: G (see `step`); bigger G gives the accelerator bigger matmuls. Exactness does
        not depend on G as long as the group step computes every chunk the same way wherever it sits
        in the group (per-chunk math batched over G, state passed chunk to chunk in order).
      static_steps: run exactly T / (G C) group steps (T must be a multiple of G C: the caller pads
        it to `plan_steps`; steps past the plan's last chunk are all padding, exact no-ops) instead
        of the device-counted loop (module docstring).
      fit_single_chunk: a token width of exactly C runs single-chunk steps (G = 1; a plain group
        step, or an emitting one marked `any_group`) instead of G-chunk steps padded with G - 1
        empty chunks: a short call (a resumed suffix of one chunk) then costs one chunk of work. Exact only where the step
        computes a chunk with the same bits at G = 1 as inside a G-chunk step (row-for-row equal
        matmuls); the caller verifies that (`HybridLM.verify_step_fit`) and chooses the width
        (`padded_width(fit_one_chunk=...)`).

    Returns:
      (hidden f32/hidden_dtype[B, d] at each row's last real token, final state, Checkpoints).
    """
    group_step, group = _group_step(step, chunks_per_step)
    if (fit_single_chunk and tokens.shape[1] == chunk_size
            and (not isinstance(group_step, EmittingGroupStep) or group_step.any_group)):
        group = 1
    if static_steps and tokens.shape[1] % (group * chunk_size):
        raise ValueError(f"static_steps needs a token width that is a multiple of G x C = "
                         f"{group * chunk_size}, got {tokens.shape[1]}")
    batch = tokens.shape[0]
    slots = checkpoints.shape[1]
    emitting = (group_step if isinstance(group_step, EmittingGroupStep)
                else _boundary_emission(group_step))
    plan = plan_chunks(lengths, checkpoints, chunk_size)
    base = state.length.astype(jnp.int32)
    rows = jnp.arange(batch)
    if slots and emitting.init_padding is not None:
        buffers = emitting.init_padding(state, checkpoints > 0)
    else:
        buffers = emitting.init_buffers(state, slots) if slots else None
    last_hidden = jnp.zeros((batch, hidden_size), hidden_dtype)
    slots_of = jax.vmap(lambda chunk: chunk_slots(plan, chunk, chunk_size), out_axes=1)

    def body(carry):
        index, current, buffers, last = carry
        chunk_ids = index * group + jnp.arange(group, dtype=jnp.int32)
        src, valid = slots_of(chunk_ids)                                   # [B, G, C]
        group_tokens = jnp.take_along_axis(tokens, src.reshape(batch, -1), axis=1).reshape(src.shape)
        slot = None
        if slots:
            match = plan.emit_chunk[:, None, :] == chunk_ids[None, :, None]  # [B, G, K]
            slot = jnp.where(jnp.any(match, axis=2), jnp.argmax(match, axis=2), slots)
        current, hidden, buffers = emitting.step(current, group_tokens, base[:, None, None] + src,
                                                 valid, buffers, slot)
        flat_src, flat_valid = src.reshape(batch, -1), valid.reshape(batch, -1)
        is_last = flat_valid & (flat_src == (lengths - 1)[:, None])
        picked = hidden.reshape(batch, flat_src.shape[1], -1)[rows, jnp.argmax(is_last, axis=1)]
        last = jnp.where(jnp.any(is_last, axis=1)[:, None], picked.astype(hidden_dtype), last)
        return index + 1, current, buffers, last

    init = (jnp.zeros((), jnp.int32), state, buffers, last_hidden)
    if static_steps:
        _, final, buffers, last_hidden = jax.lax.fori_loop(
            0, tokens.shape[1] // (group * chunk_size), lambda _, carry: body(carry), init)
    else:
        steps = (plan.num_chunks + group - 1) // group
        _, final, buffers, last_hidden = jax.lax.while_loop(lambda carry: carry[0] < steps, body, init)
    recurrent = emitting.to_recurrent(buffers if slots else emitting.init_buffers(state, 0))
    ckpt_lengths = jnp.where(checkpoints > 0, base[:, None] + checkpoints, 0).astype(jnp.int32)
    final = final._replace(length=base + lengths.astype(jnp.int32))
    return last_hidden, final, Checkpoints(recurrent=recurrent, lengths=ckpt_lengths)


def scan_chunks(step, state: State, tokens: Array, *, chunk_size: int,
                chunks_per_step: int | None = None) -> tuple[Array, State]:
    """Every position's hidden row for full, unpadded sequences (training and reference logits).

    Args:
      step: as in `run_chunks` (a one-chunk step, or a group step with `chunks_per_step`).
      tokens: int32[B, T] with T a multiple of C; all rows real. With G chunks per step, the last
        group is completed with all-padding chunks.

    Returns:
      (hidden [B, T, d], final state). Differentiable (a `lax.scan`), same step as `run_chunks`.
    """
    group_step, group = _group_step(step, chunks_per_step)
    batch, total = tokens.shape
    if total % chunk_size:
        raise ValueError(f"tokens length {total} is not a multiple of chunk_size {chunk_size}")
    chunks = total // chunk_size
    steps = -(-chunks // group)
    padded = steps * group * chunk_size
    flat = jnp.pad(tokens, ((0, 0), (0, padded - total)))
    grouped = flat.reshape(batch, steps, group, chunk_size).swapaxes(0, 1)
    offsets = jnp.arange(padded, dtype=jnp.int32).reshape(steps, group, chunk_size)
    base = state.length.astype(jnp.int32)

    def body(current, inputs):
        group_tokens, offset = inputs
        valid = jnp.broadcast_to(offset < total, (batch,) + offset.shape)
        positions = base[:, None, None] + offset[None]
        current, hidden, _ = group_step(current, group_tokens, positions, valid, False)
        return current, hidden

    final, hidden = jax.lax.scan(body, state, (grouped, offsets))
    final = final._replace(length=base + total)
    hidden = hidden.swapaxes(0, 1).reshape(batch, padded, -1)[:, :total]
    return hidden, final


# ----------------------------------------------------------------------------- host-side checks


def bucket_length(length: int, chunk_size: int, minimum: int | None = None) -> int:
    """The padded length a call of `length` tokens compiles for: C * 2^i (at least `minimum`)."""
    bucket = max(chunk_size, minimum or chunk_size)
    while bucket < length:
        bucket *= 2
    return bucket


def padded_width(total: int, lengths: np.ndarray, checkpoints: np.ndarray, *, chunk_size: int,
                 chunks_per_step: int, static_steps: bool,
                 fit_one_chunk: bool | Callable[[], bool] | None = None) -> int:
    """The token width T a prefill call of `total` token slots is padded (or cut) to: C * 2^i for the
    dynamic loop; exactly `plan_steps` x G x C for the static loop (slots past every row's length
    are padding, so cutting them loses nothing).

    `fit_one_chunk` is for programs that run a width of exactly C as single-chunk steps
    (`run_chunks(fit_single_chunk=True)`): True gives a call that lays out one chunk the width C
    (one chunk of work instead of a G-chunk step); False keeps every call of a G > 1 model at 2C or
    more, so it runs G-chunk steps; a callable is asked (only) when the call lays out one chunk;
    None (programs without the rule) leaves the widths as above.
    """
    if fit_one_chunk is not None and chunks_per_step > 1:
        if fit_one_chunk and plan_chunk_count(lengths, checkpoints, chunk_size) == 1:
            if not callable(fit_one_chunk) or fit_one_chunk():
                return chunk_size
    if static_steps:
        return plan_steps(lengths, checkpoints, chunk_size, chunks_per_step) * chunks_per_step * chunk_size
    width = bucket_length(total, chunk_size)
    if fit_one_chunk is not None and chunks_per_step > 1 and width == chunk_size:
        width = 2 * chunk_size
    return width


def prepare_prefill_args(model, tokens, checkpoints, lengths=None, state_length=None,
                         fit_one_chunk: bool | Callable[[], bool] | None = None
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`FusablePrefill.prepare_prefill` of the built-in models: validated (tokens int32[B, T],
    checkpoints int32[B, K], lengths int32[B]), T padded to `padded_width` (C * 2^i, or exactly the
    steps the call needs on the static step loop) and K to 0 or `checkpoint_bucket(K,
    model.min_checkpoint_slots)`. `model` supplies vocab_size, max_length, chunk_size,
    chunks_per_step, step_loop and min_checkpoint_slots; `fit_one_chunk` as in `padded_width`."""
    tokens_np, lengths_np, ckpt_np = check_prefill_args(
        tokens, lengths, checkpoints, vocab_size=model.vocab_size, max_length=model.max_length,
        state_length=state_length)
    (batch, total), slots = tokens_np.shape, ckpt_np.shape[1]
    width = padded_width(total, lengths_np, ckpt_np, chunk_size=model.chunk_size,
                         chunks_per_step=model.chunks_per_step, static_steps=model.step_loop == "static",
                         fit_one_chunk=fit_one_chunk)
    padded_slots = checkpoint_bucket(slots, model.min_checkpoint_slots) if slots else 0
    if width != total:               # zero padding past the slots given, or the cut of unused ones
        padded = np.zeros((batch, width), np.int32)
        padded[:, :min(width, total)] = tokens_np[:, :width]
        tokens_np = padded
    if padded_slots != slots:
        padded = np.zeros((batch, padded_slots), np.int32)
        padded[:, :slots] = ckpt_np
        ckpt_np = padded
    return tokens_np, ckpt_np, lengths_np


def check_prefill_args(tokens, lengths, checkpoints, *, vocab_size: int, max_length: int,
                       state_length=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and normalise host-side prefill arguments; raise ValueError/TypeError naming the problem.

    Returns numpy (tokens int32[B, T], lengths int32[B], checkpoints int32[B, K]).
    """
    tokens_np = np.asarray(tokens)
    if tokens_np.dtype.kind not in "iu":
        raise TypeError(f"tokens must be an integer array, got dtype {tokens_np.dtype}")
    if tokens_np.ndim != 2:
        raise ValueError(f"tokens must have shape [B, T], got shape {tokens_np.shape}")
    batch, total = tokens_np.shape
    if batch == 0 or total == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tokens_np.shape}")
    if lengths is None:
        lengths_np = np.full((batch,), total, np.int64)
    else:
        lengths_np = np.asarray(lengths)
        if lengths_np.dtype.kind not in "iu":
            raise TypeError(f"lengths must be integers, got dtype {lengths_np.dtype}")
        if lengths_np.shape != (batch,):
            raise ValueError(f"lengths must have shape [{batch}], got {lengths_np.shape}")
        if np.any(lengths_np < 1) or np.any(lengths_np > total):
            raise ValueError(f"lengths must lie in 1..{total}, got {lengths_np.tolist()}")
    # only the real slots are checked: a row's padding may hold anything
    rows = [tokens_np[row, :used] for row, used in enumerate(lengths_np.tolist())] if batch <= 8 else \
        [tokens_np[np.arange(total)[None, :] < lengths_np[:, None]]]     # few numpy calls either way
    for ids in rows:
        if ids.min() < 0 or ids.max() >= vocab_size:
            bad = ids[(ids < 0) | (ids >= vocab_size)]
            raise ValueError(f"token ids must lie in 0..{vocab_size - 1}, got {bad[:5].tolist()}")
    ckpt = np.asarray(checkpoints)
    if ckpt.size and ckpt.dtype.kind not in "iu":
        raise TypeError(f"checkpoints must be integers, got dtype {ckpt.dtype}")
    if ckpt.ndim == 1:
        ckpt = np.broadcast_to(ckpt[None, :], (batch, ckpt.shape[0]))
    if ckpt.ndim != 2 or ckpt.shape[0] != batch:
        raise ValueError(f"checkpoints must have shape [K] or [{batch}, K], got {np.shape(checkpoints)}")
    for row in range(batch if ckpt.shape[1] else 0):
        valid = ckpt[row][ckpt[row] > 0]
        if np.any(np.diff(valid) <= 0):
            raise ValueError(f"checkpoints of row {row} must strictly increase (no duplicates), "
                             f"got {valid.tolist()}")
        if valid.size and valid[-1] > lengths_np[row]:
            raise ValueError(f"checkpoint {int(valid[-1])} of row {row} is beyond its length "
                             f"{int(lengths_np[row])}")
    if state_length is not None:
        start = np.asarray(state_length)
        if np.any(start + lengths_np > max_length):
            raise ValueError(f"state length + tokens exceeds max_length {max_length}: "
                             f"{(start + lengths_np).tolist()}")
    elif np.any(lengths_np > max_length):
        raise ValueError(f"lengths exceed max_length {max_length}")
    return (tokens_np.astype(np.int32), lengths_np.astype(np.int32),    # copies: the caller may reuse its
            np.ascontiguousarray(ckpt, dtype=np.int32))                   # arrays while the call runs


def checkpoint_bucket(slots: int, minimum: int = 4) -> int:
    """The padded number of checkpoint slots K a call compiles for: a power of two >= `minimum`."""
    bucket = max(1, minimum)
    while bucket < slots:
        bucket *= 2
    return bucket


def check_state(state, expected, *, name: str = "state") -> None:
    """Raise TypeError/ValueError unless `state` matches `expected` in structure, shapes and dtypes.

    Args:
      state: the `State` a caller passed in.
      expected: the model's `abstract_state(batch)` (a `State` of jax.ShapeDtypeStruct leaves).
      name: the argument name used in error messages.
    """
    if not isinstance(state, type(expected)):
        raise TypeError(f"{name} must be a {type(expected).__name__}, got {type(state).__name__}")
    got_tree = jax.tree_util.tree_structure(state)
    want_tree = jax.tree_util.tree_structure(expected)
    if got_tree != want_tree:
        raise ValueError(f"{name} has the wrong structure (layers or fields): got {got_tree}, "
                         f"expected {want_tree}")
    got_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, leaf), want in zip(got_leaves, jax.tree_util.tree_leaves(expected)):
        # Metadata only: never np.asarray a device array here (one device-to-host copy per leaf,
        # ~65 ms per call for mamba2-1.3b's 97 leaves on an H200).
        shape = np.shape(leaf)
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        if tuple(shape) != tuple(want.shape) or dtype != want.dtype:
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} must have shape {tuple(want.shape)} "
                             f"and dtype {want.dtype}, got shape {tuple(shape)} and dtype {dtype}")


def check_decode_args(token, *, batch: int, vocab_size: int, max_length: int,
                      state_length=None) -> np.ndarray:
    """Validate one decode step's tokens int[B] (and the room left in the state); returns int32[B]."""
    token_np = np.asarray(token)
    if token_np.dtype.kind not in "iu":
        raise TypeError(f"token must be an integer array, got dtype {token_np.dtype}")
    if token_np.shape != (batch,):
        raise ValueError(f"token must have shape [{batch}] (one per state row), got {token_np.shape}")
    if np.any((token_np < 0) | (token_np >= vocab_size)):
        bad = token_np[(token_np < 0) | (token_np >= vocab_size)]
        raise ValueError(f"token ids must lie in 0..{vocab_size - 1}, got {bad[:5].tolist()}")
    if state_length is not None and np.any(np.asarray(state_length) + 1 > max_length):
        raise ValueError(f"decode would exceed max_length {max_length}: state lengths "
                         f"{np.asarray(state_length).tolist()}")
    return token_np.astype(np.int32)
