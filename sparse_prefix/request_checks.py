"""Input checks of the Engine's request path (host side): token rows, hints, batches.

Bad input raises TypeError / ValueError naming the argument (``tokens[1]``, ``hints``) before anything
is planned or allocated.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_row(tokens: Any, name: str, *, vocab_size: int, max_length: int) -> np.ndarray:
    """One request's token ids as a fresh read-only int32[L]: integers in 0..vocab_size-1,
    1..max_length of them."""
    array = np.asarray(tokens)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: a request needs at least one token")
    if array.size > max_length:
        raise ValueError(f"{name} has {array.size} tokens, more than max_length {max_length}")
    # one reduction: viewed unsigned, a negative id is huge, so max >= vocab_size catches both ends
    unsigned = array.view(np.dtype(f"u{array.dtype.itemsize}")) if array.dtype.kind == "i" else array
    if unsigned.max() >= vocab_size:
        bad = array[(array < 0) | (array >= vocab_size)]
        raise ValueError(f"{name} has ids outside 0..{vocab_size - 1}: {bad[:5].tolist()}")
    row = array.astype(np.int32)                 # a fresh copy the caller cannot write to
    row.flags.writeable = False
    return row


def check_hints(hints: Any, length: int, name: str) -> tuple[int, ...]:
    """Checkpoint hints of one request: integer positions in 1..length."""
    if isinstance(hints, (tuple, list)) and not hints:      # the common case, without numpy
        return ()
    values = np.asarray(hints if not isinstance(hints, np.ndarray) else hints.reshape(-1))
    if values.size and values.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer token positions, got {hints!r}")
    if values.ndim > 1:
        raise ValueError(f"{name} must be a flat sequence of positions, got shape {values.shape}")
    if values.size and (values.min() < 1 or values.max() > length):
        raise ValueError(f"{name} must lie in 1..{length} (the request length), got {values.tolist()}")
    return tuple(int(v) for v in values.reshape(-1))


def split_requests(tokens: Any, hints: Any, *, vocab_size: int, max_length: int
                   ) -> tuple[list[np.ndarray], list[tuple[int, ...]], bool]:
    """Validated rows int32[L_b], per-row hints, and whether the input was a batch.

    Args:
      tokens: one request int[L], or a batch (a list of int[L_b], or int[B, L]).
      hints: positions for one request, or for a batch () or one sequence per row.
    """
    limits = {"vocab_size": vocab_size, "max_length": max_length}
    if isinstance(tokens, (list, tuple)) and len(tokens) == 0:
        raise ValueError("tokens is empty: a request needs at least one token")
    batch = isinstance(tokens, (list, tuple)) and len(tokens) > 0 and not np.isscalar(tokens[0])
    if not batch and np.ndim(tokens) == 2:
        tokens, batch = list(np.asarray(tokens)), True
    if not batch:
        row = check_row(tokens, "tokens", **limits)
        return [row], [check_hints(hints, row.size, "hints")], False
    rows = [check_row(row, f"tokens[{b}]", **limits) for b, row in enumerate(tokens)]
    if hints is None or (not isinstance(hints, np.ndarray) and len(hints) == 0):
        per_row = [()] * len(rows)
    elif isinstance(hints, (list, tuple)) and len(hints) == len(rows) \
            and all(not np.isscalar(h) for h in hints):
        per_row = [check_hints(h, row.size, f"hints[{b}]")
                   for b, (h, row) in enumerate(zip(hints, rows))]
    else:
        raise ValueError(f"hints for a batch of {len(rows)} must be () or one sequence per row")
    return rows, per_row, True
