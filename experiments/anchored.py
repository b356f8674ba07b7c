"""End-anchored placement (experimental, ours): the DP on where shared prefixes END relative to a
request's end, instead of on absolute overlap depths.

Why. ``dp:M`` solves on the pooled distribution of absolute overlap depths. When every group (a
document, a system prompt) has its own depth, that pool is a mixture of one spike per group, and a
request gets positions chosen for other groups' depths; with ~200 system prompts it loses to
``balanced:M`` (BENCHMARKS.md). But the part of a request that is NOT shared -- the question, the
user turn -- has a length whose distribution is much the same in every group. So observe the suffix
distance ``s = L - overlap`` of every hit and place checkpoints at ``L - u`` for the optimal set of
distances u.

The DP is the same one (`sparse_prefix.placement.solve`) on a mirrored axis. A future request that
shares this request's first ``L - s`` tokens can resume from a checkpoint at ``L - u`` iff ``u >= s``,
saving ``L - u`` tokens, else it saves nothing. On the axis ``t = L - s`` (absolute overlap depth) with
checkpoints at ``c = L - u`` that is exactly the placement problem ("c <= t, cost t - c", cost t
without a checkpoint), so the solve needs a length L; it uses the decayed mean request length (exact
for requests of that length, and the optimum moves little with L when suffixes are short). Suffix
distances are binned (``bin_size``, default 16) with their mass at the LARGER distance of the bin,
so a solved u never falls short of the suffixes it was chosen for. Misses are not observed (no
checkpoint serves them, exactly as overlap 0 costs nothing in ``dp``). Until the first solve it places
``balanced:M``, like ``dp``.

`AnchoredPlanner` has the Planner's ``observe`` / ``positions`` surface, so `PrefixIndex.plan` drives
it; `replay_anchored` and `sweep_anchored` mirror `sparse_prefix.simulate.replay` / ``sweep`` for it
(the simulator builds Planners from spec strings, which cannot name this policy).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from sparse_prefix.histogram import OverlapHistogram
from sparse_prefix.simulate import PolicySummary, metrics_from_records, replay_records, summarise
from sparse_prefix.traces import Request, protocol_order, warm_count

SPEC_PREFIX = "adp:"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class AnchoredPlanner:
    """``adp:M``: M checkpoints at ``L - u`` for the DP-optimal suffix distances u (host side).

    Args:
      budget: M >= 1.
      max_suffix: the longest suffix distance recorded (tokens); longer ones are clipped to it.
      bin_size: suffix-distance bin width (tokens).
      decay: decay per observed hit of the histogram and of the mean length, in (0, 1].
      resolve_every: re-solve after this many observed hits.
      grid: positions snapped down to multiples of this.
    """

    def __init__(self, budget: int, *, max_suffix: int = 16384, bin_size: int = 16, decay: float = 0.99,
                 resolve_every: int = 10, grid: int = 1):
        self.budget = _positive_int("budget", budget)
        self.max_suffix = _positive_int("max_suffix", max_suffix)
        self.bin_size = _positive_int("bin_size", bin_size)
        self.resolve_every = _positive_int("resolve_every", resolve_every)
        self.grid = _positive_int("grid", grid)
        self._hist = OverlapHistogram(self.max_suffix, bin_size=1, decay=decay)
        self._decay = float(decay)
        self._length_sum = 0.0
        self._length_weight = 0.0
        self._since_solve = 0
        self._distances: np.ndarray | None = None  # u's of the latest solve, ascending

    def observe(self, overlap: int, length: int) -> None:
        """Records a request's overlap with the cache (only hits carry a suffix distance)."""
        if not 0 <= overlap <= length:
            raise ValueError(f"overlap must lie in 0..length={length}, got {overlap}")
        if overlap == 0:
            return
        self._hist.observe(min(length - overlap, self.max_suffix))
        self._length_sum = self._decay * self._length_sum + length
        self._length_weight = self._decay * self._length_weight + 1.0
        self._since_solve += 1
        if self._since_solve >= self.resolve_every:
            self._solve()

    def _solve(self) -> None:
        from sparse_prefix.placement import solve

        self._since_solve = 0
        bins = -(-int(round(self._length_sum / self._length_weight)) // self.bin_size)  # ceil(L / bin)
        suffix_pmf = self._hist.pmf()  # mass of suffix distance s = 0..max_suffix
        # Bin j of the mirrored axis holds the distances s in (L - (j+1) bin, L - j bin], i.e. depth
        # t = L - s rounded DOWN to j * bin; distances >= L (no usable prefix) land in bin 0.
        depth_bins = np.clip((bins * self.bin_size - np.arange(suffix_pmf.size)) // self.bin_size, 0, bins)
        mirrored = np.bincount(depth_bins, weights=suffix_pmf, minlength=bins + 1)
        placement = solve(mirrored, self.budget)
        self._distances = np.sort((bins - np.asarray(placement.positions, dtype=np.int64)) * self.bin_size)

    def suffix_distances(self) -> np.ndarray | None:
        """The solved distances u (ascending, multiples of bin_size), or None before the first solve."""
        return None if self._distances is None else self._distances.copy()

    def positions(self, length: int, overlap: int | None = None, hints: Iterable[int] = ()) -> np.ndarray:
        """Sorted unique positions in 1..length on the grid (``overlap`` and ``hints`` unused)."""
        if self._distances is None:
            raw = np.floor(np.arange(1, self.budget + 1) * length / (self.budget + 1)).astype(np.int64)
        else:
            raw = length - self._distances
        raw = (raw // self.grid) * self.grid
        return np.unique(raw[(raw >= 1) & (raw <= length)])


def parse_anchored(spec: str) -> int:
    """The budget M of an ``adp:M`` spec."""
    if not isinstance(spec, str) or not spec.startswith(SPEC_PREFIX):
        raise ValueError(f"not an anchored spec (expected adp:M): {spec!r}")
    text = spec[len(SPEC_PREFIX):]
    if not text.isdigit():
        raise ValueError(f"malformed anchored spec {spec!r}: expected adp:M with an integer M >= 1")
    return _positive_int("M", int(text))


def replay_with(requests: Sequence[Request], planner: Any, *, warm_fraction: float = 0.6,
                capacity_entries: int = 20, eviction: str = "fifo", grid: int = 1, capture: str = "separate",
                bytes_per_checkpoint: float | None = None) -> dict[str, float | None]:
    """`sparse_prefix.simulate.replay`'s loop for any planner object (observe / positions); returns
    the metrics. A test checks it against ``replay`` for a spec-built Planner."""
    from sparse_prefix.index import PrefixIndex

    n_warm = warm_count(len(requests), warm_fraction)
    if not 0 <= n_warm < len(requests):
        raise ValueError(f"warm_fraction={warm_fraction} leaves nothing to measure")
    index = PrefixIndex(capacity_entries=capacity_entries, eviction=eviction, grid=grid, capture=capture)
    return metrics_from_records(replay_records(requests, planner, index, n_warm), bytes_per_checkpoint)


def replay_anchored(requests: Sequence[Request], spec: str, *, grid: int = 1,
                    planner_options: dict | None = None, **replay_kwargs: Any) -> dict[str, float | None]:
    """`sparse_prefix.simulate.replay` for an ``adp:M`` spec; returns its metrics."""
    planner = AnchoredPlanner(parse_anchored(spec), grid=grid, **dict(planner_options or {}))
    return replay_with(requests, planner, grid=grid, **replay_kwargs)


def sweep_anchored(source, specs: Sequence[str], *, seeds: int, limit: int = 1000, max_tokens: int = 16384,
                   **replay_kwargs: Any) -> list[PolicySummary]:
    """`sparse_prefix.simulate.sweep` (in this process) for ``adp:M`` specs.

    Args:
      source: a trace (file order) or ``builder(seed) -> trace``.
      specs: ``adp:M`` specs.
      seeds: seeds 0..seeds-1.
      limit, max_tokens, **replay_kwargs: as in ``sweep`` / `replay_anchored`.
    """
    for spec in specs:
        parse_anchored(spec)
    per_spec: dict[str, list[dict]] = {spec: [] for spec in specs}
    for seed in range(_positive_int("seeds", seeds)):
        trace = source(seed) if callable(source) else source
        order = protocol_order(trace, seed=seed, limit=limit, max_tokens=max_tokens)
        for spec in specs:
            per_spec[spec].append(replay_anchored(order, spec, **replay_kwargs))
    return [summarise(spec, list(range(seeds)), values) for spec, values in per_spec.items()]
