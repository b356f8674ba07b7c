"""`check_model`: the equivalence matrix every `RecurrentLM` must pass to be cached exactly (public).

A model that implements `sparse_prefix.protocol.RecurrentLM` -- pure SSM or hybrid with attention KV --
can be checked with::

    report = check_model(model, params)          # raises AssertionError naming the failed check

The matrix (C = model.chunk_size, "bitwise" = identical floats, "close" = relative norm <= rtol):
  1. determinism: prefill(all) twice from `init_state` (the split at 0: no prefix) -> bitwise;
  2. split-and-resume: prefill(prefix) then prefill(rest, from its state) == prefill(all), for splits
     1, C-1, C, C+1, 2C, T-1 (clipped per row): final state and last logits bitwise when the split is
     a multiple of C, close otherwise; and bitwise when the prefix call has another token width;
  3. several checkpoints per call, batch rows of different lengths, padded checkpoint lists (padding
     at the end and in the middle, a checkpoint at the row's end): the final state matches (2); each
     emitted state == the final recurrent state of a prefill truncated there with the same earlier
     checkpoints (bitwise: the same chunks) and without them (bitwise when the earlier checkpoints
     are on the grid, close otherwise); the emitted lengths are right;
  4. restore: the state restored from a checkpoint, resumed over the rest with the later
     checkpoints, reproduces the logits, the final state and the later checkpoints bitwise;
  5. decode step by step == prefill over the same tokens: logits and states within `decode_rtol`.
All prefill calls but one share one token width T and one checkpoint width K, so a model that
buckets its shapes compiles prefill twice (and decode once). States are copied before every call,
so models that donate their state buffers are fine.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.protocol import State

SLOTS = 4  # checkpoint slots per call in the matrix


def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda leaf: jnp.array(leaf, copy=True), tree)


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (scale if scale > 0 else 1.0))


class _Checker:
    """Comparison bookkeeping: counts checks, tracks the worst tolerance error, names failures."""

    def __init__(self, rtol: float):
        self.rtol = rtol
        self.bitwise = 0
        self.close = 0
        self.worst = 0.0

    def rows(self, what: str, got, want, bitwise: np.ndarray, rtol: float | None = None) -> float:
        """Compare [B, ...] arrays row by row: bitwise where `bitwise[b]`, else within rtol."""
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            raise AssertionError(f"{what}: shape {got.shape} != expected {want.shape}")
        worst = 0.0
        for row in range(got.shape[0]):
            if bitwise[row]:
                self.bitwise += 1
                if not np.array_equal(got[row], want[row]):
                    diff = np.abs(got[row].astype(np.float64) - want[row].astype(np.float64))
                    where = np.unravel_index(diff.argmax(), diff.shape)
                    raise AssertionError(f"{what}, row {row}: expected bitwise equality, max abs "
                                         f"difference {diff.max():.3g} at {where}")
            else:
                self.close += 1
                error = _rel_error(got[row], want[row])
                worst = max(worst, error)
                if not error <= (self.rtol if rtol is None else rtol):
                    raise AssertionError(f"{what}, row {row}: relative norm error {error:.3g} > "
                                         f"{self.rtol if rtol is None else rtol}")
        if rtol is None:
            self.worst = max(self.worst, worst)
        return worst

    def recurrent(self, what: str, got: tuple, want: tuple, bitwise: np.ndarray,
                  rtol: float | None = None) -> float:
        """Compare two recurrent tuples (leaves [B, ...]) leaf by leaf."""
        got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
        want_leaves = jax.tree_util.tree_leaves(want)
        if len(got_leaves) != len(want_leaves):
            raise AssertionError(f"{what}: {len(got_leaves)} leaves != {len(want_leaves)}")
        return max([self.rows(f"{what}{jax.tree_util.keystr(path)}", leaf, ref, bitwise, rtol)
                    for (path, leaf), ref in zip(got_leaves, want_leaves)] + [0.0])

    def state(self, what: str, got: State, want: State, bitwise: np.ndarray,
              rtol: float | None = None) -> float:
        """Compare full states: lengths exactly, recurrent leaves, KV rows below each length."""
        if not np.array_equal(np.asarray(got.length), np.asarray(want.length)):
            raise AssertionError(f"{what}.length: {np.asarray(got.length).tolist()} != "
                                 f"{np.asarray(want.length).tolist()}")
        worst = self.recurrent(f"{what}.recurrent", got.recurrent, want.recurrent, bitwise, rtol)
        if (got.kv is None) != (want.kv is None):
            raise AssertionError(f"{what}.kv: one state has KV and the other not")
        lengths = np.asarray(want.length)
        for layer, (cache, ref) in enumerate(zip(got.kv or (), want.kv or ())):
            for name, leaf, ref_leaf in zip(("k", "v"), cache, ref):
                leaf, ref_leaf = np.asarray(leaf), np.asarray(ref_leaf)
                for row, length in enumerate(lengths):
                    worst = max(worst, self.rows(
                        f"{what}.kv[{layer}].{name}[:{length}]", leaf[row:row + 1, :length],
                        ref_leaf[row:row + 1, :length], bitwise[row:row + 1], rtol))
        return worst


def _row_checkpoints(row: int, length: int, chunk: int) -> list[int]:
    """Even rows: on the grid (C, 2C), padding at the end; odd rows: off the grid (1, C-1), padding
    in the middle and a checkpoint at the row's last token."""
    if row % 2 == 0:
        valid = sorted({p for p in (chunk, 2 * chunk) if 1 <= p <= length})
        return valid + [0] * (SLOTS - len(valid))
    valid = sorted({p for p in (1, chunk - 1) if 1 <= p < length})
    return (valid + [0] + [length] + [0] * SLOTS)[:SLOTS]


def _shift_rows(tokens: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Row b of the result is tokens[b, starts[b]:] followed by zeros (same width)."""
    out = np.zeros_like(tokens)
    for row, start in enumerate(starts):
        out[row, :tokens.shape[1] - start] = tokens[row, start:]
    return out


def check_model(model, params, *, batch: int = 2, length: int | None = None, seed: int = 0,
                rtol: float = 1e-5, decode_rtol: float = 1e-4, decode_steps: int = 3,
                cross_bucket: bool = True) -> dict:
    """Run the equivalence matrix (module docstring) on `model`; raise AssertionError on a failure.

    Args:
      model: any `RecurrentLM`. params: its parameters.
      batch: rows per call (>= 2 exercises rows of different lengths and checkpoint layouts).
      length: T, tokens per call (default 3C + 11: off the grid, spanning several chunks).
      seed: seeds the random tokens.
      rtol: relative norm tolerance off the chunk grid (prefill vs prefill).
      decode_rtol: relative norm tolerance of decode vs prefill (logits and states).
      decode_steps: tokens decoded one at a time.
      cross_bucket: also resume from a prefix computed by a call of another token width (one more
        compilation for bucketing models; the engine's exactness relies on it).

    Returns:
      A report: calls made, checks run, and the largest tolerance errors seen.
    """
    chunk = int(model.chunk_size)
    total = 3 * chunk + 11 if length is None else int(length)
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    lengths = np.array([total - 3 * (row % 4) for row in range(batch)], np.int32)
    if lengths.min() < decode_steps + 2 or total > model.max_length:
        raise ValueError(f"length {total} must leave >= {decode_steps + 2} tokens per row and fit "
                         f"max_length {model.max_length}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.vocab_size, size=(batch, total)).astype(np.int32)
    check = _Checker(rtol)
    calls = {"prefill": 0, "decode": 0}
    no_ckpts = np.zeros((batch, SLOTS), np.int32)

    def prefill(state, toks, lens, ckpts):
        calls["prefill"] += 1
        return model.prefill(params, toks, _copy(state), np.asarray(ckpts, np.int32),
                             np.asarray(lens, np.int32))

    fresh = model.init_state(batch)
    full_logits, full_state, _ = prefill(fresh, tokens, lengths, no_ckpts)
    everywhere, nowhere = np.ones(batch, bool), np.zeros(batch, bool)

    # 1. Determinism (the split at 0).
    again_logits, again_state, _ = prefill(fresh, tokens, lengths, no_ckpts)
    check.rows("split 0: logits of a repeated prefill", again_logits, full_logits, everywhere)
    check.state("split 0: state of a repeated prefill", again_state, full_state, everywhere)

    # 2. Split and resume.
    for split in sorted({1, chunk - 1, chunk, chunk + 1, 2 * chunk, total - 1}):
        if split < 1:
            continue
        splits = np.minimum(split, lengths - 1)
        on_grid = splits % chunk == 0
        _, prefix_state, _ = prefill(fresh, tokens, splits, no_ckpts)
        logits, state, _ = prefill(prefix_state, _shift_rows(tokens, splits), lengths - splits,
                                   no_ckpts)
        check.rows(f"split {split}: logits of prefix + resumed rest", logits, full_logits, on_grid)
        check.state(f"split {split}: state of prefix + resumed rest", state, full_state, on_grid)

    # 2b. The same on-grid resume when the prefix call has another token width (shape bucket): an
    # engine resumes requests of every length from states emitted by calls of other lengths.
    if cross_bucket and lengths.min() > chunk:
        _, prefix_state, _ = prefill(fresh, tokens[:, :chunk], np.full(batch, chunk, np.int32),
                                     no_ckpts)
        starts = np.full(batch, chunk)
        logits, state, _ = prefill(prefix_state, _shift_rows(tokens, starts), lengths - chunk,
                                   no_ckpts)
        check.rows("prefix of another width + resumed rest: logits", logits, full_logits, everywhere)
        check.state("prefix of another width + resumed rest: state", state, full_state, everywhere)

    # 3. Several checkpoints per call, padded lists, rows of different lengths.
    ckpts = np.array([_row_checkpoints(row, lengths[row], chunk) for row in range(batch)], np.int32)
    grid_row = np.array([np.all(row[row > 0] % chunk == 0) for row in ckpts])
    ck_logits, ck_state, emitted = prefill(fresh, tokens, lengths, ckpts)
    check.rows("checkpointed call: logits", ck_logits, full_logits, grid_row)
    check.state("checkpointed call: final state", ck_state, full_state, grid_row)
    want_lengths = np.where(ckpts > 0, ckpts, 0)
    if not np.array_equal(np.asarray(emitted.lengths), want_lengths):
        raise AssertionError(f"emitted checkpoint lengths {np.asarray(emitted.lengths).tolist()} "
                             f"!= {want_lengths.tolist()}")
    for slot in range(SLOTS):
        active = ckpts[:, slot] > 0
        if not active.any():
            continue
        cut = np.where(active, ckpts[:, slot], lengths)
        slot_state = jax.tree_util.tree_map(lambda leaf: leaf[:, slot], emitted.recurrent)
        earlier = np.where(np.arange(SLOTS) < slot, ckpts, 0)
        _, same_layout, _ = prefill(fresh, tokens, cut, earlier)
        check.recurrent(f"checkpoint slot {slot} vs truncated prefill with the earlier checkpoints",
                        _select(slot_state, active), _select(same_layout.recurrent, active),
                        np.ones(int(active.sum()), bool))
        _, plain, _ = prefill(fresh, tokens, cut, no_ckpts)
        aligned = np.all((earlier % chunk == 0), axis=1)
        check.recurrent(f"checkpoint slot {slot} vs truncated prefill without checkpoints",
                        _select(slot_state, active), _select(plain.recurrent, active),
                        aligned[active])

    # 4. Restore and resume with the later checkpoints.
    resume_slot = np.array([_resume_slot(row, length) for row, length in zip(ckpts, lengths)])
    positions = ckpts[np.arange(batch), resume_slot]
    restored = model.restore(_copy(ck_state), _copy(emitted), jnp.asarray(resume_slot, jnp.int32))
    if not np.array_equal(np.asarray(restored.length), positions):
        raise AssertionError(f"restored lengths {np.asarray(restored.length).tolist()} != "
                             f"checkpoint positions {positions.tolist()}")
    later = np.where((np.arange(SLOTS)[None] > resume_slot[:, None]) & (ckpts > 0),
                     ckpts - positions[:, None], 0)
    re_logits, re_state, re_emitted = prefill(restored, _shift_rows(tokens, positions),
                                              lengths - positions, later)
    check.rows("restore + resume: logits", re_logits, ck_logits, everywhere)
    check.state("restore + resume: final state", re_state, ck_state, everywhere)
    for slot in range(SLOTS):
        active = later[:, slot] > 0
        if active.any():
            check.recurrent(f"restore + resume: later checkpoint slot {slot}",
                            _select(jax.tree_util.tree_map(lambda leaf: leaf[:, slot],
                                                           re_emitted.recurrent), active),
                            _select(jax.tree_util.tree_map(lambda leaf: leaf[:, slot],
                                                           emitted.recurrent), active),
                            np.ones(int(active.sum()), bool))

    # 5. Decode step by step == prefill.
    start = lengths - decode_steps
    _, state, _ = prefill(fresh, tokens, start, no_ckpts)
    decode_error = 0.0
    for step in range(decode_steps):
        calls["decode"] += 1
        logits, state = model.decode(params, tokens[np.arange(batch), start + step], state)
        if step == decode_steps - 1:
            want_logits, want_state = full_logits, full_state
        else:
            want_logits, want_state, _ = prefill(fresh, tokens, start + step + 1, no_ckpts)
        decode_error = max(decode_error, check.rows(
            f"decode step {step}: logits vs prefill", logits, want_logits, nowhere, decode_rtol))
        decode_error = max(decode_error, check.state(
            f"decode step {step}: state vs prefill", state, want_state, nowhere, decode_rtol))

    return {"length": total, "chunk_size": chunk, "batch": batch, "prefill_calls": calls["prefill"],
            "decode_calls": calls["decode"], "bitwise_checks": check.bitwise,
            "tolerance_checks": check.close, "max_off_grid_error": check.worst,
            "max_decode_error": decode_error}


def _select(recurrent: tuple, rows: np.ndarray) -> tuple:
    """Keep the rows where `rows` (bool[B]) is set, in every leaf."""
    index = np.flatnonzero(rows)
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[index], recurrent)


def _resume_slot(row_ckpts: np.ndarray, length: int) -> int:
    """The slot to restore from: the first valid checkpoint strictly inside the row."""
    for slot, position in enumerate(row_ckpts):
        if 0 < position < length:
            return slot
    raise AssertionError(f"no checkpoint strictly inside the row in {row_ckpts.tolist()}")


def resume_difference(model, params, length: int, split: int | None = None) -> tuple[int, float]:
    """(split, max |difference|) of one split-and-resume on the chunk grid: logits and every
    final-state leaf of `length` random tokens prefilled to `split`, then resumed over the rest,
    against the uncached call (0.0: bitwise). The default split is a multiple of C past the middle
    that is not a multiple of G C (the resume then starts inside a group step)."""
    chunk, group = model.chunk_size, getattr(model, "chunks_per_step", 1)
    if split is None:
        split = (length // (2 * chunk)) * chunk + chunk
        if group > 1 and split % (group * chunk) == 0:
            split += chunk
    if not 0 < split < length:
        raise ValueError(f"split {split} must lie strictly inside length {length}")
    tokens = np.random.default_rng(1).integers(0, model.vocab_size, size=(1, length), dtype=np.int32)
    none = np.zeros((0,), np.int32)
    want_logits, want_state, _ = model.prefill(params, tokens, model.init_state(1), none)
    _, prefix, _ = model.prefill(params, tokens, model.init_state(1), none, np.array([split], np.int32))
    rest = np.zeros_like(tokens)
    rest[:, :length - split] = tokens[:, split:]
    logits, state, _ = model.prefill(params, rest, prefix, none, np.array([length - split], np.int32))
    pairs = [(logits, want_logits)] + list(zip(jax.tree_util.tree_leaves(state),
                                               jax.tree_util.tree_leaves(want_state)))
    worst = max(float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
                for got, want in pairs)
    return split, worst


def emission_difference(model, params, length: int, positions, check: Sequence[int] | None = None
                        ) -> float:
    """Max |difference| between checkpoint states emitted by one prefill of `length` random tokens
    at `positions` and the final states of prefills that stop at those positions (0.0: bitwise, as
    on the chunk grid it must be). `check`: the indices of `positions` to compare (default all;
    each costs one prefill)."""
    positions = np.asarray(positions, np.int32)
    tokens = np.random.default_rng(2).integers(0, model.vocab_size, size=(1, length), dtype=np.int32)
    none = np.zeros((0,), np.int32)
    _, _, emitted = model.prefill(params, tokens, model.init_state(1), positions)
    worst = 0.0
    for index in (range(len(positions)) if check is None else check):
        _, state, _ = model.prefill(params, tokens, model.init_state(1), none,
                                    np.array([positions[index]], np.int32))
        for got, want in zip(jax.tree_util.tree_leaves(emitted.recurrent),
                             jax.tree_util.tree_leaves(state.recurrent)):
            difference = np.abs(np.asarray(got[:, index], np.float64) - np.asarray(want, np.float64))
            worst = max(worst, float(np.max(difference)))
    return worst


def assert_same_model_outputs(model, params, other, tokens, checkpoints, *, decode_tolerance=1e-6
                              ) -> None:
    """Assert that two parameter layouts of one model (e.g. stacked vs per-layer) give the same
    prefill -- logits, final state and emitted checkpoints, bit for bit -- and the same next decode
    step (within `decode_tolerance`: decode programs may fuse differently per layout)."""
    runs = [model.prefill(p, tokens, model.init_state(tokens.shape[0]), checkpoints)
            for p in (params, other)]
    for got, want in zip(jax.tree_util.tree_leaves(runs[1]), jax.tree_util.tree_leaves(runs[0])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    steps = [model.decode(p, tokens[:, 0], run[1]) for p, run in zip((params, other), runs)]
    for got, want in zip(jax.tree_util.tree_leaves(steps[1]), jax.tree_util.tree_leaves(steps[0])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=decode_tolerance,
                                   atol=decode_tolerance)
