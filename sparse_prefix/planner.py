"""The Planner (public): a policy spec -> the checkpoint positions of one request (host side).

    planner = Planner("dp:8+fork", grid=64)
    planner.observe(overlap, length)            # the request's overlap with the cache (0 on a miss)
    planner.positions(length, overlap, hints)   # -> int64[k], sorted, unique, in 1..length, on the grid

Policy specs (parsed strictly by `parse_policy`; anything else raises ValueError naming the spec):

    none | block:B | balanced:k | log | sqrt | end | dp:M | ldp:M     then any of  +fork  +hints  +end

* ``block:B`` every B tokens; ``balanced:k`` k evenly spaced positions; ``log`` 768 * 2^i; ``sqrt``
  spacing floor(sqrt(L)); ``end`` the last token (the baselines of `sparse_prefix.placement`).
* ``dp:M`` (the paper): the exact DP on one pooled, decayed overlap histogram, re-solved every
  ``resolve_every`` observations, ``balanced:M`` until the first solve; a request of length L gets
  ``placement.positions_for(L)`` of the latest solve.
* ``ldp:M`` (ours): one histogram per half-octave of request length, all re-solved in ONE
  `solve_batch` call; a bucket with less than ``min_bucket_mass`` effective observations uses the
  pooled (dp) solution, which rides in the same batch as its last row.
* ``+fork`` adds ``overlap`` (the divergence point from the resume entry), ``+hints`` the caller's
  positions, ``+end`` the request length; these come on top of the budget M.

Every position is snapped DOWN to a multiple of ``grid`` (the model's exactness grid); zeros are
dropped. Histograms hold bins whose mass sits at the bin's lower edge, so when ``grid`` divides
``bin_size`` an optimum on the token (or grid) lattice can be moved up to the next bin edge without
loss: the DP is then solved exactly on the binned pmf (nb = N / bin_size + 1 depths, positions in
bins, the cost rescaled: g(bin * x) is proportional to a*x + b*bin*x^2), and a request of length L
reads ``bin_size * positions_for(L // bin_size)``. That is bin_size times fewer depths than token
level. Otherwise the token-level pmf is solved with ``grid=grid``.

Re-solving is pluggable: by default a due re-solve runs synchronously inside `observe`
(deterministic). With ``executor=`` it is submitted there instead (at most one in flight; positions
use the latest installed solution meanwhile); with ``auto_resolve=False`` the caller polls
`needs_resolve()` and calls `resolve()` itself, e.g. off the request path.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
import threading
from concurrent.futures import Executor, Future
from typing import Any, Iterable

import numpy as np

from sparse_prefix.histogram import LengthBucketedHistogram, check_decay, check_int, check_depth

_BUDGETED = ("block", "balanced", "dp", "ldp")
_PLAIN = ("none", "log", "sqrt", "end")
_MODIFIERS = ("fork", "hints", "end")
_NUMBER = r"(?:0|[1-9][0-9]*)"
_SPEC_RE = re.compile(
    rf"(?P<kind>{'|'.join(_BUDGETED + _PLAIN)})(?::(?P<param>{_NUMBER}))?(?P<mods>(?:\+[a-z]+)*)")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A parsed policy spec.

    Attributes:
      kind: one of none, block, balanced, log, sqrt, end, dp, ldp.
      param: B for block (>= 1), k / M for balanced, dp, ldp (>= 0); None for the others.
      fork, hints, end: the modifiers.
    """

    kind: str
    param: int | None = None
    fork: bool = False
    hints: bool = False
    end: bool = False

    def __str__(self) -> str:
        base = self.kind if self.param is None else f"{self.kind}:{self.param}"
        return base + "".join(f"+{m}" for m in _MODIFIERS if getattr(self, m))

    @property
    def family(self) -> str:
        """The spec without its number (one line per family in a Pareto plot), e.g. ``dp+fork``."""
        return self.kind + "".join(f"+{m}" for m in _MODIFIERS if getattr(self, m))

    @property
    def uses_histogram(self) -> bool:
        return self.kind in ("dp", "ldp")

    @property
    def budget(self) -> int | None:
        """Positions the base policy places when fixed (none 0, end 1, balanced/dp/ldp their count);
        None when it depends on the length (block, log, sqrt). Modifiers add on top."""
        if self.kind in ("balanced", "dp", "ldp"):
            return self.param
        return {"none": 0, "end": 1}.get(self.kind)


def parse_policy(spec: str) -> PolicySpec:
    """Parses a policy spec string strictly (lower case, no spaces, no leading zeros, no repeats).

    Args:
      spec: e.g. ``"dp:8"``, ``"block:1024+fork"``, ``"ldp:4+hints+end"``.

    Returns:
      The `PolicySpec`.

    Raises:
      TypeError: ``spec`` is not a string.
      ValueError: the spec is malformed; the message names it and says why.
    """
    if not isinstance(spec, str):
        raise TypeError(f"policy spec must be a string, got {spec!r} ({type(spec).__name__})")
    match = _SPEC_RE.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"malformed policy spec {spec!r}: expected one of none, block:B, balanced:k, log, sqrt, "
            "end, dp:M, ldp:M, optionally followed by +fork, +hints, +end")
    kind, param = match["kind"], match["param"]
    if kind in _BUDGETED and param is None:
        raise ValueError(f"malformed policy spec {spec!r}: {kind} needs a number, e.g. {kind}:8")
    if kind in _PLAIN and param is not None:
        raise ValueError(f"malformed policy spec {spec!r}: {kind} takes no number")
    value = None if param is None else int(param)
    if kind == "block" and value == 0:
        raise ValueError(f"malformed policy spec {spec!r}: the block size must be >= 1")
    mods = match["mods"].split("+")[1:]
    for mod in mods:
        if mod not in _MODIFIERS:
            raise ValueError(f"malformed policy spec {spec!r}: unknown modifier +{mod} "
                             f"(known: {', '.join('+' + m for m in _MODIFIERS)})")
    if len(set(mods)) != len(mods):
        raise ValueError(f"malformed policy spec {spec!r}: a modifier is repeated")
    return PolicySpec(kind, value, *(m in mods for m in _MODIFIERS))


def snap_positions(positions: Iterable[int] | np.ndarray, grid: int) -> np.ndarray:
    """int64[k]: positions snapped down to multiples of ``grid``, zeros dropped, sorted, unique."""
    array = np.asarray(positions, dtype=np.int64).reshape(-1)
    snapped = np.unique((array // grid) * grid)
    return snapped[snapped > 0]


def _check_hints(hints: Iterable[int], length: int) -> np.ndarray:
    items = hints.reshape(-1).tolist() if isinstance(hints, np.ndarray) else hints
    values = []
    for hint in items:
        if isinstance(hint, (bool, np.bool_)) or not isinstance(hint, (int, np.integer)):
            raise TypeError(f"hints: expected integer token positions, got {hint!r}")
        if not 1 <= hint <= length:
            raise ValueError(f"hints: position {int(hint)} is outside 1..{length} (the request length)")
        values.append(int(hint))
    return np.asarray(values, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class _Solution:
    """An installed dp / ldp solve: rows of a BatchPlacement (or one Placement for dp)."""

    generation: int
    placement: Any          # Placement (dp) or BatchPlacement (ldp)
    rows: np.ndarray | None  # ldp: int[nk], the batch row each length bucket reads (pooled on fallback)


class Planner:
    """Chooses the checkpoint positions of each request under a policy spec (thread-safe).

    Args:
      policy: a spec string (see the module docstring) or a `PolicySpec`.
      grid: every position is snapped down to a multiple of this (>= 1).
      bin_size: histogram bin width in tokens (dp / ldp).
      decay: histogram decay gamma in (0, 1] per observation.
      resolve_every: re-solve after this many observations (>= 1).
      cost: the placement cost model, passed to `sparse_prefix.placement.solve`.
      max_length: the longest request accepted (and the depth range N of the histograms).
      min_bucket_mass: ldp only: buckets with less decayed mass than this use the pooled solution.
      auto_resolve: re-solve from `observe` when due. False: the caller drives `resolve()`.
      executor: with auto_resolve, submit due re-solves to this executor instead of running them inline.
    """

    def __init__(self, policy: str | PolicySpec, *, grid: int = 1, bin_size: int = 64,
                 decay: float = 0.99, resolve_every: int = 10, cost: Any = "linear",
                 max_length: int = 16384, min_bucket_mass: float = 1.0, auto_resolve: bool = True,
                 executor: Executor | None = None):
        self.spec = parse_policy(str(policy) if isinstance(policy, PolicySpec) else policy)
        self.grid = check_int("grid", grid, minimum=1)
        self.max_length = check_int("max_length", max_length, minimum=1)
        self.bin_size = check_int("bin_size", bin_size, minimum=1)
        if self.bin_size > self.max_length:
            raise ValueError(f"bin_size ({bin_size}) must be <= max_length ({max_length})")
        self.decay = check_decay(decay)
        self.resolve_every = check_int("resolve_every", resolve_every, minimum=1)
        if (isinstance(min_bucket_mass, bool) or not isinstance(min_bucket_mass, numbers.Real)
                or not min_bucket_mass >= 0):
            raise ValueError(f"min_bucket_mass must be a number >= 0, got {min_bucket_mass!r}")
        self.min_bucket_mass = float(min_bucket_mass)
        if not isinstance(auto_resolve, bool):
            raise TypeError(f"auto_resolve must be a bool, got {auto_resolve!r}")
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(f"executor must be a concurrent.futures.Executor, got {executor!r}")
        from sparse_prefix import placement  # lazy: keeps `import sparse_prefix` light

        self.cost = placement.parse_cost(cost)
        self.auto_resolve = auto_resolve
        self.executor = executor
        # Bin edges are optimal positions when the grid divides the bins: solve the binned pmf then.
        self.solve_binned = self.bin_size % self.grid == 0
        self._solve_cost = (placement.Cost(self.cost.a, self.cost.b * self.bin_size)
                            if self.solve_binned else self.cost)
        self._lock = threading.RLock()  # re-entrant: a done-callback may run inline
        self._hist = (LengthBucketedHistogram(self.max_length, bin_size=self.bin_size,
                                              decay=self.decay, min_length=min(64, self.max_length))
                      if self.spec.uses_histogram else None)
        self._observations = 0
        self._snapshot_at = 0          # observation count at the last snapshot taken for a solve
        self._solution: _Solution | None = None
        self._solves = 0
        self._pending: Future | None = None

    @property
    def budget(self) -> int | None:
        """The base policy's position count when fixed (see `PolicySpec.budget`)."""
        return self.spec.budget

    @property
    def observations(self) -> int:
        return self._observations

    @property
    def solves(self) -> int:
        """How many dp / ldp solutions have been installed."""
        return self._solves

    def describe(self) -> str:
        """A short label for tables, e.g. ``dp M=8 +fork`` or ``block 1024``."""
        spec = self.spec
        if spec.kind in ("dp", "ldp"):
            base = f"{spec.kind} M={spec.param}"
        elif spec.param is not None:
            base = f"{spec.kind} {spec.param}"
        else:
            base = spec.kind
        return base + "".join(f" +{m}" for m in _MODIFIERS if getattr(spec, m))

    def __repr__(self) -> str:
        return f"Planner({str(self.spec)!r}, grid={self.grid})"

    def _check_length(self, length) -> int:
        length = check_int("length", length, minimum=1)
        if length > self.max_length:
            raise ValueError(f"length ({length}) exceeds the planner's max_length ({self.max_length})")
        return length

    def observe(self, overlap: int, length: int) -> None:
        """Records one request's overlap depth (its LCP with the resume entry; 0 on a miss).

        Args:
          overlap: integer in 0..length.
          length: the request's length in tokens, 1..max_length.
        """
        length = self._check_length(length)
        overlap = check_depth("overlap", overlap)
        if overlap > length:
            raise ValueError(f"overlap ({overlap}) must be <= length ({length})")
        self._raise_failed_resolve()
        with self._lock:
            self._observations += 1
            if self._hist is not None:
                self._hist.observe(overlap, length)
        if not self.auto_resolve or not self.needs_resolve():
            return
        if self.executor is None:
            self.resolve()
        else:
            with self._lock:
                if self._pending is None:
                    self._pending = self.executor.submit(self.resolve)
                    self._pending.add_done_callback(self._clear_pending)

    def _clear_pending(self, future: Future) -> None:
        with self._lock:
            if self._pending is future and future.exception() is None:
                self._pending = None

    def _raise_failed_resolve(self) -> None:
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            with self._lock:
                self._pending = None
            raise RuntimeError("a background re-solve failed") from pending.exception()

    def needs_resolve(self) -> bool:
        """True when a dp / ldp histogram has `resolve_every` new observations since the last solve
        snapshot and no submitted re-solve is still running."""
        with self._lock:
            return (self._hist is not None and self._pending is None
                    and self._observations - self._snapshot_at >= self.resolve_every)

    def resolve(self) -> bool:
        """Solves the placement on the current histogram(s) and installs it (newer wins).

        Safe to call from another thread: the histogram is copied under the lock, solved outside it.

        Returns:
          True when a solve ran (dp / ldp with at least one observation), else False.
        """
        with self._lock:
            if self._hist is None or self._observations == 0:
                return False
            generation = self._observations
            self._snapshot_at = generation
            pmfs = self._hist.binned() if self.solve_binned else self._hist.pmfs()
            masses = self._hist.masses()
        solution = self._solve(generation, pmfs, masses)
        with self._lock:
            if self._solution is None or solution.generation > self._solution.generation:
                self._solution = solution
                self._solves += 1
        return True

    def _solve(self, generation: int, pmfs: np.ndarray, masses: np.ndarray) -> _Solution:
        """Solves pmfs [nk, D] (D = nb binned, N + 1 token-level) for dp (pooled) or ldp (batched)."""
        from sparse_prefix import placement  # lazy: keeps `import sparse_prefix` free of jax

        pooled = pmfs.sum(axis=0)
        budget, cost = self.spec.param, self._solve_cost
        grid = 1 if self.solve_binned else self.grid
        if self.spec.kind == "dp":
            return _Solution(generation, placement.solve(pooled, budget, cost=cost, grid=grid), None)
        fallback = masses < self.min_bucket_mass
        batch = np.where(fallback[:, None], pooled[None, :], pmfs)
        batch = np.concatenate([batch, pooled[None, :]], axis=0)
        rows = np.where(fallback, batch.shape[0] - 1, np.arange(pmfs.shape[0]))
        solved = placement.solve_batch(batch, budget, cost=cost, grid=grid)
        return _Solution(generation, solved, rows)

    def positions(self, length: int, overlap: int | None = None,
                  hints: Iterable[int] = ()) -> np.ndarray:
        """The checkpoint positions for a request.

        Args:
          length: L, the request's length in tokens (1..max_length).
          overlap: its overlap with the cache (0..L), used by +fork; None = unknown (no fork point).
          hints: caller-suggested positions in 1..L (validated always, used by +hints).

        Returns:
          int64[k]: sorted, unique, in 1..L, multiples of `grid`.
        """
        length = self._check_length(length)
        if overlap is not None:
            overlap = check_depth("overlap", overlap)
            if overlap > length:
                raise ValueError(f"overlap ({overlap}) must be <= length ({length})")
        hint_positions = _check_hints(hints, length)
        parts = [self._base_positions(length)]
        if self.spec.fork and overlap:
            parts.append(np.asarray([overlap], dtype=np.int64))
        if self.spec.hints:
            parts.append(hint_positions)
        if self.spec.end:
            parts.append(np.asarray([length], dtype=np.int64))
        return snap_positions(np.concatenate(parts), self.grid)

    def _base_positions(self, length: int) -> np.ndarray:
        from sparse_prefix import placement  # lazy: keeps `import sparse_prefix` free of jax

        spec, grid = self.spec, self.grid
        if spec.kind == "none":
            return np.zeros(0, dtype=np.int64)
        if spec.kind == "block":
            return np.asarray(placement.block_positions(length, spec.param, grid=grid))
        if spec.kind == "balanced":
            return np.asarray(placement.balanced_positions(length, spec.param, grid=grid))
        if spec.kind == "log":
            return np.asarray(placement.log_positions(length, grid=grid))
        if spec.kind == "sqrt":
            return np.asarray(placement.sqrt_positions(length, grid=grid))
        if spec.kind == "end":
            return np.asarray(placement.end_positions(length, grid=grid))
        solution = self._solution
        if solution is None:
            return np.asarray(placement.balanced_positions(length, spec.param, grid=grid))
        depth, scale = (length // self.bin_size, self.bin_size) if self.solve_binned else (length, 1)
        if solution.rows is None:
            return scale * np.asarray(solution.placement.positions_for(depth), dtype=np.int64)
        row = int(solution.rows[self._hist.bucket_of(length)])
        return scale * np.asarray(solution.placement.positions_for(row, depth), dtype=np.int64)
