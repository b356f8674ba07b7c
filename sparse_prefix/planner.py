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
* ``+fill`` (dp / ldp only): the DP places fewer than M positions when the observed histogram has no
  mass left to gain from (beyond its support, or in a request shorter than the observed depths); fill
  spends that idle budget on depths never observed, by `fill_gaps`: the largest gaps between 0, the
  solved positions and L are split evenly, so the result still has at most M positions.

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

State export (public, versioned): `state_dict()` gives the configuration, the counters, the histograms'
state and the latest solution as the histogram snapshot it was solved from (float64[nk, nb]) plus its
positions; `load_state_dict` re-solves that snapshot (the solvers are deterministic) and refuses the state
unless the positions come out equal, so a loaded planner places exactly what the saved one placed.
"""

from __future__ import annotations

import dataclasses
import numbers
import threading
from concurrent.futures import Executor, Future, wait
from typing import Any, Iterable

import numpy as np

from sparse_prefix.histogram import (LengthBucketedHistogram, binned_to_token_pmf, check_decay, check_depth,
                                     check_int)
from sparse_prefix.policy import MODIFIERS as _MODIFIERS
from sparse_prefix.policy import PolicySpec, parse_policy, snap_positions  # noqa: F401 (re-exported)
from sparse_prefix.state_dicts import StateReader, header

STATE_VERSION = 1


def default_bin_size(max_length: int, grid: int = 1) -> int:
    """The histogram bin width a Planner uses unless told: 64 tokens (the paper) from 1024 tokens of
    max_length up, or one grid step where the grid is coarser (positions are multiples of it anyway,
    so a grid-wide bin loses nothing, and the DP then solves on the bins: a grid of 256 over 16384
    tokens gives 65 depths instead of 16385); about 16 bins (a multiple of `grid`, at least one grid
    step) for shorter models; never more than max_length, so a tiny model needs no setting."""
    max_length, grid = check_int("max_length", max_length, minimum=1), check_int("grid", grid, minimum=1)
    return max(1, min(max(64, grid), max(grid, (max_length // 16) // grid * grid), max_length))


def fill_gaps(positions: np.ndarray, length: int, budget: int, grid: int = 1) -> np.ndarray:
    """Tops `positions` up to `budget` positions by splitting the largest uncovered gaps (host side).

    The gaps are the intervals between consecutive points of {0} + positions + {length}, on the grid
    lattice. Each new position goes to the gap whose even split currently leaves the longest piece
    (ties: the earliest gap); each gap is then split evenly. This minimises the longest uncovered stretch,
    the hedge for overlap depths the histogram never saw. New positions lie strictly inside gaps, so
    fewer than `budget` come back only when every lattice point of 1..L-1 is taken.

    Args:
      positions: int[k], positions in 1..length (any order; snapped down to the grid, zeros dropped).
      length: L >= 1, the request length.
      budget: M >= 0, the total number of positions wanted.
      grid: positions are multiples of this (>= 1).

    Returns:
      int64[max(k', min(M, k' + free))]: sorted, unique multiples of `grid` in 1..L, a superset of
      the k' snapped `positions` (free = lattice points strictly inside the gaps).
    """
    length = check_int("length", length, minimum=1)
    budget = check_int("budget", budget, minimum=0)
    grid = check_int("grid", grid, minimum=1)
    lattice = snap_positions(positions, grid) // grid
    top = length // grid
    if lattice.size and lattice[-1] > top:
        raise ValueError(f"positions: {int(lattice[-1]) * grid} is beyond the length {length}")
    edges = np.concatenate([[0], lattice, [top]])
    gaps = np.diff(edges)
    added = np.zeros(gaps.size, dtype=np.int64)
    room = np.maximum(gaps - 1, 0)  # distinct lattice points strictly inside each gap
    for _ in range(max(0, min(budget - lattice.size, int(room.sum())))):
        piece = np.where(added < room, gaps / (added + 1.0), -1.0)  # its longest piece now
        added[int(np.argmax(piece))] += 1
    new = [edges[i] + (j * gaps[i]) // (added[i] + 1)
           for i in np.flatnonzero(added) for j in range(1, added[i] + 1)]
    return np.unique(np.concatenate([lattice, np.asarray(new, dtype=np.int64)])) * grid


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
    binned: np.ndarray      # float64[nk, nb]: the histogram snapshot it was solved from

    def checked_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(positions int64[R, budget] zero-padded, counts int64[R]): the full optimum of every row."""
        if self.rows is not None:
            return np.asarray(self.placement.positions, np.int64), np.asarray(self.placement.counts, np.int64)
        found = np.asarray(self.placement.positions, np.int64)
        padded = np.zeros((1, max(self.placement.budget, found.size)), np.int64)
        padded[0, :found.size] = found
        return padded, np.asarray([found.size], np.int64)


class Planner:
    """Chooses the checkpoint positions of each request under a policy spec (thread-safe).

    Args:
      policy: a spec string (see the module docstring) or a `PolicySpec`.
      grid: every position is snapped down to a multiple of this (>= 1).
      bin_size: histogram bin width in tokens (dp / ldp), 1..max_length; None for
        `default_bin_size(max_length, grid)` (64 or one grid step if coarser; about 16 bins for
        models shorter than 1024).
      decay: histogram decay gamma in (0, 1] per observation.
      resolve_every: re-solve after this many observations (>= 1).
      cost: the placement cost model, passed to `sparse_prefix.placement.solve`.
      max_length: the longest request accepted (and the depth range N of the histograms).
      min_bucket_mass: ldp only: buckets with less decayed mass than this use the pooled solution.
      auto_resolve: re-solve from `observe` when due. False: the caller drives `resolve()`.
      executor: with auto_resolve, submit due re-solves to this executor instead of running them inline.
    """

    def __init__(self, policy: str | PolicySpec, *, grid: int = 1, bin_size: int | None = None,
                 decay: float = 0.99, resolve_every: int = 10, cost: Any = "linear",
                 max_length: int = 16384, min_bucket_mass: float = 1.0, auto_resolve: bool = True,
                 executor: Executor | None = None):
        self.spec = parse_policy(str(policy) if isinstance(policy, PolicySpec) else policy)
        self.grid = check_int("grid", grid, minimum=1)
        self.max_length = check_int("max_length", max_length, minimum=1)
        self.bin_size = (default_bin_size(self.max_length, self.grid) if bin_size is None
                         else check_int("bin_size", bin_size, minimum=1))
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
        self._hist = self._new_histogram() if self.spec.uses_histogram else None
        self._observations = 0
        self._snapshot_at = 0          # observation count at the last snapshot taken for a solve
        self._solution: _Solution | None = None
        self._solves = 0
        self._pending: Future | None = None
        self._epoch = 0                # bumped by load_state_dict: solves begun before it are dropped

    def _new_histogram(self) -> LengthBucketedHistogram:
        return LengthBucketedHistogram(self.max_length, bin_size=self.bin_size, decay=self.decay,
                                       min_length=min(64, self.max_length))

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
            generation, epoch = self._observations, self._epoch
            self._snapshot_at = generation
            binned = self._hist.binned()
        solution = self._solve(generation, binned)
        with self._lock:
            if epoch == self._epoch and (self._solution is None
                                         or solution.generation > self._solution.generation):
                self._solution = solution
                self._solves += 1
        return True

    def _solve(self, generation: int, binned: np.ndarray) -> _Solution:
        """Solves a histogram snapshot binned float64[nk, nb] (on the bins, or at token level when the
        grid does not divide them) for dp (pooled) or ldp (batched). Deterministic."""
        from sparse_prefix import placement  # lazy: keeps `import sparse_prefix` free of jax

        masses = binned.sum(axis=1)
        pmfs = binned if self.solve_binned else binned_to_token_pmf(binned, self.bin_size, self.max_length)
        pooled = pmfs.sum(axis=0)
        budget, cost = self.spec.param, self._solve_cost
        grid = 1 if self.solve_binned else self.grid
        if self.spec.kind == "dp":
            return _Solution(generation, placement.solve(pooled, budget, cost=cost, grid=grid), None, binned)
        fallback = masses < self.min_bucket_mass
        batch = np.where(fallback[:, None], pooled[None, :], pmfs)
        batch = np.concatenate([batch, pooled[None, :]], axis=0)
        rows = np.where(fallback, batch.shape[0] - 1, np.arange(pmfs.shape[0]))
        solved = placement.solve_batch(batch, budget, cost=cost, grid=grid)
        return _Solution(generation, solved, rows, binned)

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
            solved = scale * np.asarray(solution.placement.positions_for(depth), dtype=np.int64)
        else:
            row = int(solution.rows[self._hist.bucket_of(length)])
            solved = scale * np.asarray(solution.placement.positions_for(row, depth), dtype=np.int64)
        return fill_gaps(solved, length, spec.param, grid) if spec.fill else solved

    # ------------------------------------------------------------------ state export

    def _config(self) -> dict[str, Any]:
        return {"policy": str(self.spec), "grid": self.grid, "bin_size": self.bin_size,
                "decay": self.decay, "resolve_every": self.resolve_every,
                "cost": [self.cost.a, self.cost.b], "max_length": self.max_length,
                "min_bucket_mass": self.min_bucket_mass}

    def state_dict(self) -> dict[str, Any]:
        """The planner's state as plain data (public, versioned; see the module docstring).

        A background re-solve in flight is waited for first, so the export holds the latest solution.
        The executor and auto_resolve are not state (they are the loading process's choice).

        Returns:
          ``{"type": "Planner", "version", "policy", "grid", "bin_size", "decay", "resolve_every",
          "cost": [a, b], "max_length", "min_bucket_mass", "observations", "snapshot_at", "solves",
          "histogram": LengthBucketedHistogram.state_dict() or None, "solution": None or
          {"generation", "binned": float64[nk, nb], "positions": int64[R, budget], "counts": int64[R]}}``.
        """
        pending = self._pending
        if pending is not None:
            wait([pending])
        with self._lock:
            solution, snapshot_at = self._solution, self._snapshot_at
            if self._pending is not None:   # begun since, or failed: not part of the state
                snapshot_at = 0 if solution is None else solution.generation
            state = {**header("Planner", STATE_VERSION), **self._config(),
                     "observations": self._observations, "snapshot_at": snapshot_at,
                     "solves": self._solves, "solution": None,
                     "histogram": None if self._hist is None else self._hist.state_dict()}
        if solution is not None:
            positions, counts = solution.checked_positions()
            state["solution"] = {"generation": solution.generation, "binned": solution.binned.copy(),
                                 "positions": positions, "counts": counts}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the counters, histograms and solution by `state` (from `state_dict` of a planner
        configured like this one), all or nothing. The saved solution is re-solved from its histogram
        snapshot and must come out with the saved positions; a re-solve in flight is discarded.

        Raises:
          ValueError: a missing or malformed field, a configuration that differs from this planner's,
            inconsistent counters, or a solution that re-solves to other positions (naming the field).
        """
        reader = StateReader(state, "Planner")
        reader.check_header("Planner", STATE_VERSION)
        for key, value in self._config().items():
            reader.same(key, value)
        observations = reader.int("observations", minimum=0)
        snapshot_at = reader.int("snapshot_at", 0, observations)
        solves = reader.int("solves", minimum=0)
        hist, solution = None, None
        if self._hist is None:
            for key in ("histogram", "solution"):
                if reader.raw(key) is not None:
                    raise reader.error(key, f"must be None: policy {self.spec} keeps no histogram")
            if snapshot_at:
                raise reader.error("snapshot_at", f"must be 0: policy {self.spec} never solves")
        else:
            hist = self._new_histogram()
            try:
                hist.load_state_dict(reader.raw("histogram"))
            except (TypeError, ValueError) as error:
                raise reader.error("histogram", f"is invalid: {error}") from error
            if hist.count != observations:
                raise reader.error("histogram", f"holds {hist.count} observations, the planner "
                                                f"{observations}")
            if reader.raw("solution") is not None:
                solution = self._load_solution(reader.child("solution"), hist, snapshot_at)
                if solves < 1:
                    raise reader.error("solves", "must be >= 1 with a solution")
        with self._lock:
            self._epoch += 1
            self._observations, self._snapshot_at, self._solves = observations, snapshot_at, solves
            self._hist, self._solution = hist, solution

    def _load_solution(self, reader: StateReader, hist: LengthBucketedHistogram,
                       snapshot_at: int) -> _Solution:
        """Re-solve a saved solution's snapshot; its positions must equal the saved ones."""
        generation = reader.int("generation", 1, snapshot_at)
        binned = reader.array("binned", "f", 2, (hist.num_buckets, hist.num_bins))
        if np.any(binned < 0) or not binned.sum() > 0:
            raise reader.error("binned", "must be non-negative with a positive total")
        positions = reader.array("positions", "iu", 2)
        counts = reader.array("counts", "iu", 1)
        solution = self._solve(generation, binned.astype(np.float64))
        got_positions, got_counts = solution.checked_positions()
        if not (np.array_equal(got_positions, positions) and np.array_equal(got_counts, counts)):
            raise reader.error("positions", "does not match a re-solve of its histogram snapshot "
                                            "(saved by another platform or library version?)")
        return solution

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *, auto_resolve: bool = True,
                        executor: Executor | None = None) -> "Planner":
        """A new planner configured and filled from `state` (see `load_state_dict`)."""
        from sparse_prefix import placement  # lazy: keeps `import sparse_prefix` light

        reader = StateReader(state, "Planner")
        reader.check_header("Planner", STATE_VERSION)
        cost = reader.list("cost")
        try:
            cost = placement.Cost(*cost)
        except (TypeError, ValueError) as error:
            raise reader.error("cost", f"is invalid: {error}") from error
        planner = cls(reader.str("policy"), grid=reader.int("grid"), bin_size=reader.int("bin_size"),
                      decay=reader.float("decay"), resolve_every=reader.int("resolve_every"), cost=cost,
                      max_length=reader.int("max_length"), min_bucket_mass=reader.float("min_bucket_mass"),
                      auto_resolve=auto_resolve, executor=executor)
        planner.load_state_dict(state)
        return planner
