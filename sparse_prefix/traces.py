"""Requests, JSONL trace files, and the replay protocol's ordering.

A trace file holds one request per line::

    {"group": "doc-7", "tokens": [101, 7, 9], "hints": [2]}
    {"group": "doc-7", "text": "An article ... Question: ...", "hint_chars": [812]}

``group`` (a document, a system prompt, a conversation) scopes prefix matching. A line carries either
``tokens`` (ids >= 0) or ``text`` (tokenised on load). Optional ``hints`` are token positions in
1..len(tokens) where the caller would like a checkpoint (e.g. the end of a shared document); text lines
may give ``hint_chars`` (character offsets, turned into token positions by the tokenizer) instead.
Optional ``meta`` is any JSON object carried along untouched. Blank lines are skipped.

`protocol_order` is DESIGN.md's replay protocol: groups shuffled by seed, an Exponential(1)
inter-arrival clock per group, order kept within each group, all merged by time, the first `limit`
requests, tokens truncated at `max_tokens`. `split_warm` cuts the warm-up / measured split.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

_INT32_MAX = int(np.iinfo(np.int32).max)
_LINE_KEYS = frozenset({"group", "text", "tokens", "hints", "hint_chars", "meta"})


def _as_token_array(tokens: Any) -> np.ndarray:
    array = np.array(tokens, copy=True)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"tokens: expected a non-empty 1-D sequence, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"tokens: expected integers, got dtype {array.dtype}")
    if array.min() < 0 or array.max() > _INT32_MAX:
        raise ValueError(f"tokens: ids must lie in 0..{_INT32_MAX}, got min {array.min()}, max {array.max()}")
    array = array.astype(np.int32)
    array.flags.writeable = False
    return array


def _as_hints(hints: Any, length: int) -> tuple[int, ...]:
    values = []
    for hint in hints:
        if isinstance(hint, (bool, np.bool_)) or not isinstance(hint, (int, np.integer)):
            raise TypeError(f"hints: expected integer token positions, got {hint!r}")
        if not 1 <= hint <= length:
            raise ValueError(f"hints: position {int(hint)} is outside 1..{length} (the request length)")
        values.append(int(hint))
    return tuple(sorted(set(values)))


@dataclass(frozen=True, eq=False)
class Request:
    """One request of a trace.

    Attributes:
      group: the prefix-sharing scope (document, system prompt, conversation, ...).
      tokens: int32[L], L >= 1, read-only.
      hints: sorted unique token positions in 1..L where the caller suggests a checkpoint.
      text: the source text when the request came from text (else None).
      meta: free-form JSON-able metadata (not used by the cache).
    """

    group: str
    tokens: np.ndarray
    hints: tuple[int, ...] = ()
    text: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.group, str):
            raise TypeError(f"group: expected a string, got {type(self.group).__name__}")
        tokens = _as_token_array(self.tokens)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "hints", _as_hints(self.hints, tokens.size))
        if self.text is not None and not isinstance(self.text, str):
            raise TypeError(f"text: expected a string or None, got {type(self.text).__name__}")
        if not isinstance(self.meta, Mapping):
            raise TypeError(f"meta: expected a mapping, got {type(self.meta).__name__}")

    @property
    def length(self) -> int:
        """L, the number of tokens."""
        return int(self.tokens.size)

    def truncated(self, max_tokens: int) -> "Request":
        """The request cut to its first `max_tokens` tokens (hints beyond the cut dropped)."""
        if self.length <= max_tokens:
            return self
        return Request(
            group=self.group,
            tokens=self.tokens[:max_tokens],
            hints=tuple(h for h in self.hints if h <= max_tokens),
            text=None,
            meta=self.meta,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return (
            self.group == other.group
            and np.array_equal(self.tokens, other.tokens)
            and self.hints == other.hints
            and self.text == other.text
            and dict(self.meta) == dict(other.meta)
        )

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):
        # Through the constructor, so an unpickled request (a sweep worker's) is validated and read-only.
        return (Request, (self.group, self.tokens, self.hints, self.text, dict(self.meta)))

    def __repr__(self) -> str:
        return f"Request(group={self.group!r}, length={self.length}, hints={self.hints})"


# ---------------------------------------------------------------------------------------------------
# Trace files


def _int_list(value: Any, key: str) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{key!r} must be a list of integers, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"{key!r} must hold integers only, found {item!r}")
    return value


def _parse_line(record: Any, tokenizer) -> Request:
    """One decoded JSON line -> Request; raises ValueError(message) without the location."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _LINE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} (allowed: {sorted(_LINE_KEYS)})")
    if "group" not in record:
        raise ValueError("missing 'group'")
    group = record["group"]
    if not isinstance(group, str) or not group:
        raise ValueError(f"'group' must be a non-empty string, got {group!r}")
    has_text, has_tokens = "text" in record, "tokens" in record
    if has_text == has_tokens:
        raise ValueError("needs exactly one of 'text' and 'tokens'" + (", got both" if has_text else ", got neither"))
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"'meta' must be a JSON object, got {type(meta).__name__}")
    hints = _int_list(record["hints"], "hints") if "hints" in record else []
    text = None
    if has_tokens:
        if "hint_chars" in record:
            raise ValueError("'hint_chars' needs a 'text' line (use 'hints' with 'tokens')")
        tokens = _int_list(record["tokens"], "tokens")
        if not tokens:
            raise ValueError("'tokens' is empty")
        negative = [t for t in tokens if t < 0 or t > _INT32_MAX]
        if negative:
            raise ValueError(f"'tokens' must be ids in 0..{_INT32_MAX}, found {negative[0]}")
        tokens = np.asarray(tokens, dtype=np.int32)
    else:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError(f"'text' must be a non-empty string, got {text!r}")
        if tokenizer is None:
            raise ValueError("a 'text' line needs a tokenizer (pass tokenizer=... / --tokenizer)")
        tokens = tokenizer.encode(text)
        if tokens.size == 0:
            raise ValueError("'text' encodes to no tokens")
        if "hint_chars" in record:
            chars = _int_list(record["hint_chars"], "hint_chars")
            bad = [c for c in chars if not 0 <= c <= len(text)]
            if bad:
                raise ValueError(f"'hint_chars' offset {bad[0]} is outside 0..{len(text)} (the text length)")
            hints = hints + [p for p in tokenizer.positions_for_chars(text, chars) if p > 0]
    bad = [h for h in hints if not 1 <= h <= len(tokens)]
    if bad:
        raise ValueError(f"'hints' position {bad[0]} is outside 1..{len(tokens)} (the request length)")
    return Request(group=group, tokens=tokens, hints=tuple(hints), text=text, meta=meta)


def _open_text(path: Path, mode: str):
    """Open a trace for text I/O; `.xz` / `.gz` suffixes are (de)compressed on the fly.

    `.xz` uses a 64 MiB dictionary, so a trace whose requests repeat long shared prefixes (a document
    asked about many times) shrinks to about its unique tokens -- small enough to carry to a GPU machine.
    """
    if path.suffix == ".xz":
        if "w" in mode:
            filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 64 << 20}]
            return lzma.open(path, "wt", encoding="utf-8", format=lzma.FORMAT_XZ, filters=filters)
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    return path.open(mode, encoding="utf-8")


def load_trace(
    path: str | os.PathLike,
    tokenizer: Any = None,
    *,
    data_dir: str | os.PathLike | None = None,
) -> list[Request]:
    """Read a JSONL trace file (see the module docstring for the line format).

    Args:
      path: the file.
      tokenizer: for text lines: a `sparse_prefix.tokenizers.Tokenizer`, or a name / path for
        `load_tokenizer` (loaded only if a text line occurs). None: text lines are an error.
      data_dir: the shared folder for a tokenizer given by name.

    Returns:
      The requests in file order.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a malformed line (the message names the file, the line number and the problem), or
        a file without requests.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    requests = []
    with _open_text(path, "r") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if isinstance(tokenizer, (str, os.PathLike)) and isinstance(record, dict) and "text" in record:
                from sparse_prefix.tokenizers import load_tokenizer

                tokenizer = load_tokenizer(str(tokenizer), data_dir=data_dir)
            try:
                requests.append(_parse_line(record, tokenizer))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: line {number}: {err}") from None
    if not requests:
        raise ValueError(f"{path}: the trace holds no requests")
    return requests


def save_trace(path: str | os.PathLike, requests: Iterable[Request]) -> int:
    """Write requests as a JSONL trace of ``tokens`` lines (exact; source text is not written).

    Args:
      path: the file to create (parent folders are created).
      requests: the requests, in order.

    Returns:
      The number of lines written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with _open_text(path, "w") as handle:
        for request in requests:
            if not isinstance(request, Request):
                raise TypeError(f"requests: expected Request items, got {type(request).__name__}")
            record: dict[str, Any] = {"group": request.group, "tokens": request.tokens.tolist()}
            if request.hints:
                record["hints"] = list(request.hints)
            if request.meta:
                record["meta"] = dict(request.meta)
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------
# The replay protocol


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    return int(value)


def protocol_order(
    requests: Sequence[Request],
    *,
    seed: int,
    limit: int = 1000,
    max_tokens: int = 16384,
) -> list[Request]:
    """Arrival order of DESIGN.md's replay protocol (deterministic per seed).

    Groups (in first-appearance order) are permuted by a `numpy.random.Generator(seed)`; then each
    group, in that permuted order, draws Exponential(1) inter-arrival gaps for its requests, whose
    order within the group is kept. All requests are merged by arrival time (ties: permuted group
    order), the first `limit` kept, and each truncated to `max_tokens` tokens (hints beyond dropped).

    Args:
      requests: the trace, in file order.
      seed: the replay seed (an int).
      limit: how many requests to keep.
      max_tokens: the truncation length.

    Returns:
      The replay order, at most `limit` requests.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    limit = _check_positive_int(limit, "limit")
    max_tokens = _check_positive_int(max_tokens, "max_tokens")
    if not requests:
        raise ValueError("requests: the trace is empty")
    by_group: dict[str, list[Request]] = {}
    for request in requests:
        if not isinstance(request, Request):
            raise TypeError(f"requests: expected Request items, got {type(request).__name__}")
        by_group.setdefault(request.group, []).append(request)
    rng = np.random.default_rng(seed)
    groups = list(by_group)
    shuffled = [groups[i] for i in rng.permutation(len(groups))]
    times, ranks, members = [], [], []
    for rank, group in enumerate(shuffled):
        items = by_group[group]
        times.append(np.cumsum(rng.exponential(1.0, size=len(items))))
        ranks.append(np.full(len(items), rank))
        members.extend(items)
    order = np.lexsort((np.concatenate(ranks), np.concatenate(times)))[:limit]
    return [members[i].truncated(max_tokens) for i in order]


def split_warm(requests: Sequence[Request], warm_fraction: float = 0.6) -> tuple[list[Request], list[Request]]:
    """Split a replay into the warm-up part (first ``round(n * warm_fraction)``) and the measured rest.

    Raises:
      ValueError: `warm_fraction` outside [0, 1) or nothing left to measure.
    """
    if not isinstance(warm_fraction, (int, float)) or not 0.0 <= warm_fraction < 1.0:
        raise ValueError(f"warm_fraction: must lie in [0, 1), got {warm_fraction!r}")
    n_warm = warm_count(len(requests), warm_fraction)
    if n_warm >= len(requests):
        raise ValueError(f"warm_fraction={warm_fraction} leaves no measured request out of {len(requests)}")
    return list(requests[:n_warm]), list(requests[n_warm:])


def warm_count(n: int, warm_fraction: float) -> int:
    """How many of `n` requests warm the cache: ``round(n * warm_fraction)``."""
    return int(round(n * warm_fraction))
