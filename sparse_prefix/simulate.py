"""Token-accounting replays (no model): how much prefill a placement policy saves on a trace.

`replay` runs one ordered trace through the same `PrefixIndex.plan` / `commit` the engine uses, with
a `Planner` for the policy; the first `warm_fraction` of the requests warm the cache and histograms,
the rest are measured. `sweep` repeats that for many policies over several seeds (each seed reorders
the trace by `protocol_order`, DESIGN.md's replay protocol) and reports mean and sd per metric.

Metrics (over the measured requests):
  checkpoints_per_request  states a request newly stores (fork points included), mean
  tokens_saved_pct         100 * sum(resume positions) / sum(lengths)
  savings_x                sum(lengths) / sum(recomputed tokens)
  hit_rate_pct             100 * fraction of requests with overlap > 0
  resident_checkpoints     checkpoints held by the index after each request, mean
  state_bytes_per_request  checkpoints_per_request * bytes_per_checkpoint (only when that is given)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sparse_prefix.traces import Request, protocol_order, warm_count

METRICS = (
    "checkpoints_per_request",
    "tokens_saved_pct",
    "savings_x",
    "hit_rate_pct",
    "resident_checkpoints",
    "state_bytes_per_request",
)
RECORD_FIELDS = ("length", "overlap", "resume_position", "recomputed_tokens", "new_checkpoints", "hit",
                 "resident_checkpoints")


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """One policy on one ordered trace.

    Attributes:
      policy: the policy spec.
      n_warm: requests used to warm up (not measured).
      records: per measured request, int64[R] arrays named by `RECORD_FIELDS` (``hit`` is 0/1).
      metrics: the totals named by `METRICS` (``state_bytes_per_request`` is None without
        ``bytes_per_checkpoint``).
    """

    policy: str
    n_warm: int
    records: Mapping[str, np.ndarray]
    metrics: Mapping[str, float | None]

    def __getattr__(self, name: str):
        if name in METRICS:
            return self.metrics[name]
        raise AttributeError(name)


@dataclasses.dataclass(frozen=True)
class PolicySummary:
    """One policy over several seeds: per metric the mean, the sample sd (0 for one seed) and the
    per-seed values (seed order). Metrics that were not computed are absent."""

    policy: str
    seeds: tuple[int, ...]
    mean: Mapping[str, float]
    sd: Mapping[str, float]
    per_seed: Mapping[str, tuple[float, ...]]

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "seeds": list(self.seeds), "mean": dict(self.mean),
                "sd": dict(self.sd), "per_seed": {k: list(v) for k, v in self.per_seed.items()}}


def metrics_from_records(records: Mapping[str, np.ndarray], bytes_per_checkpoint: float | None = None
                         ) -> dict[str, float | None]:
    """The `METRICS` totals of per-request records (see the module docstring)."""
    lengths = records["length"].sum()
    checkpoints = float(records["new_checkpoints"].mean())
    return {
        "checkpoints_per_request": checkpoints,
        "tokens_saved_pct": 100.0 * float(records["resume_position"].sum()) / float(lengths),
        "savings_x": float(lengths) / float(records["recomputed_tokens"].sum()),
        "hit_rate_pct": 100.0 * float(records["hit"].mean()),
        "resident_checkpoints": float(records["resident_checkpoints"].mean()),
        "state_bytes_per_request": None if bytes_per_checkpoint is None else checkpoints * bytes_per_checkpoint,
    }


def _check_replay_args(requests, warm_fraction, bytes_per_checkpoint) -> int:
    if not requests:
        raise ValueError("requests: nothing to replay")
    for request in requests:
        if not isinstance(request, Request):
            raise TypeError(f"requests: expected Request items, got {type(request).__name__}")
    if isinstance(warm_fraction, bool) or not isinstance(warm_fraction, (int, float)) \
            or not 0.0 <= warm_fraction < 1.0:
        raise ValueError(f"warm_fraction: must lie in [0, 1), got {warm_fraction!r}")
    n_warm = warm_count(len(requests), warm_fraction)
    if n_warm >= len(requests):
        raise ValueError(f"warm_fraction={warm_fraction} leaves no measured request out of {len(requests)}")
    if bytes_per_checkpoint is not None and (isinstance(bytes_per_checkpoint, bool) or not isinstance(
            bytes_per_checkpoint, (int, float)) or not bytes_per_checkpoint > 0):
        raise ValueError(f"bytes_per_checkpoint: must be a number > 0, got {bytes_per_checkpoint!r}")
    return n_warm


def replay(
    requests: Sequence[Request],
    policy: str,
    *,
    warm_fraction: float = 0.6,
    capacity_entries: int = 20,
    eviction: str = "fifo",
    grid: int = 1,
    capture: str = "separate",
    bytes_per_checkpoint: float | None = None,
    planner_options: Mapping[str, Any] | None = None,
) -> ReplayResult:
    """Replay an ordered trace under one policy (token accounting only).

    Args:
      requests: the trace in arrival order (e.g. from `protocol_order`).
      policy: a `Planner` policy spec, e.g. ``"dp:8+fork"``.
      warm_fraction: the leading share of requests that only warm the cache (not measured).
      capacity_entries: retained cache entries (the paper: 20 QuALITY, 50 System Prompts).
      eviction: ``"fifo"``, ``"lru"`` or ``"utility"`` (see `PrefixIndex`).
      grid: the model's exactness grid; every position is snapped down to it.
      capture: ``"separate"`` (the paper: every planned position is stored) or ``"one-pass"`` (the
        engine: positions at or below the resume point are inherited, not stored again).
      bytes_per_checkpoint: the size of one checkpoint state, for ``state_bytes_per_request``.
      planner_options: extra `Planner` keyword arguments (bin_size, decay, resolve_every, cost,
        max_length -- by default the larger of 16384 and the longest request).

    Returns:
      A `ReplayResult`.
    """
    from sparse_prefix.index import PrefixIndex
    from sparse_prefix.planner import Planner

    n_warm = _check_replay_args(requests, warm_fraction, bytes_per_checkpoint)
    # A fixed histogram range (the paper's 16384 tokens = 256 bins of 64) keeps the solver's shapes,
    # hence its compilations, the same for every replay.
    options = {"max_length": max(16384, max(r.length for r in requests))} | dict(planner_options or {})
    planner = Planner(policy, grid=grid, **options)
    index = PrefixIndex(capacity_entries=capacity_entries, eviction=eviction, grid=grid, capture=capture)
    records = replay_records(requests, planner, index, n_warm)
    return ReplayResult(str(policy), n_warm, records, metrics_from_records(records, bytes_per_checkpoint))


def replay_records(requests: Sequence[Request], planner: Any, index: Any, n_warm: int
                   ) -> dict[str, np.ndarray]:
    """The replay loop: plan and commit every request through `index` with `planner` (any object
    with ``observe`` / ``positions``), recording the requests after the first `n_warm`.

    Returns:
      {name: int64[len(requests) - n_warm]} for every name of `RECORD_FIELDS`.
    """
    rows = np.zeros((len(requests) - n_warm, len(RECORD_FIELDS)), dtype=np.int64)
    for i, request in enumerate(requests):
        plan = index.plan(request.tokens, group=request.group, hints=request.hints, planner=planner)
        result = index.commit(plan)
        if i >= n_warm:
            rows[i - n_warm] = (plan.length, plan.overlap, plan.resume_position, plan.recomputed_tokens,
                                len(result.slots), plan.hit, index.resident_checkpoints)
    return {name: rows[:, j] for j, name in enumerate(RECORD_FIELDS)}


# ---------------------------------------------------------------------------------------------------
# Sweeps over policies and seeds

_WORKER_SOURCE: Any = None


def _init_worker(source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


@functools.lru_cache(maxsize=2)
def _ordered(seed: int, limit: int, max_tokens: int) -> tuple[Request, ...]:
    source = _WORKER_SOURCE
    requests = source(seed) if callable(source) else source
    return tuple(protocol_order(requests, seed=seed, limit=limit, max_tokens=max_tokens))


def _run_unit(seed: int, policy: str, order_args: tuple[int, int], replay_kwargs: dict) -> dict:
    result = replay(_ordered(seed, *order_args), policy, **replay_kwargs)
    return dict(result.metrics)


def summarise(policy: str, seeds: Sequence[int], per_seed: Sequence[Mapping[str, float | None]]
              ) -> PolicySummary:
    """Mean, sd (ddof 1) and per-seed values of every `METRICS` entry over seeds (None-valued metrics
    are left out)."""
    mean, sd, values = {}, {}, {}
    for metric in METRICS:
        column = [m[metric] for m in per_seed]
        if any(v is None for v in column):
            continue
        array = np.asarray(column, dtype=np.float64)
        mean[metric] = float(array.mean())
        sd[metric] = float(array.std(ddof=1)) if array.size > 1 else 0.0
        values[metric] = tuple(float(v) for v in array)
    return PolicySummary(policy, tuple(seeds), mean, sd, values)


def _seed_list(seeds: int | Iterable[int]) -> list[int]:
    if isinstance(seeds, bool):
        raise TypeError(f"seeds: expected a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise ValueError(f"seeds: need at least one seed, got {seeds}")
        return list(range(int(seeds)))
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in seeds):
        raise ValueError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: duplicates in {seeds!r}")
    return [int(s) for s in seeds]


def sweep(
    requests_or_builder: Sequence[Request] | Callable[[int], Sequence[Request]],
    policies: Sequence[str],
    *,
    seeds: int | Iterable[int] = 5,
    limit: int = 1000,
    max_tokens: int = 16384,
    workers: int = 1,
    progress: bool = False,
    **replay_kwargs: Any,
) -> list[PolicySummary]:
    """Replay every policy on every seed's protocol ordering and summarise.

    Args:
      requests_or_builder: a trace (file order), or ``builder(seed) -> trace`` (a picklable,
        module-level function when ``workers > 1``), e.g. ``functools.partial(documents, scale=0.5)``.
      policies: policy specs (validated before anything runs).
      seeds: a count n (seeds 0..n-1) or the seeds themselves. Seed s orders the trace with
        ``protocol_order(..., seed=s)`` (and builds it with ``builder(s)``).
      limit, max_tokens: the protocol's request cut and truncation.
      workers: processes to spread (seed, policy) replays over (1: in this process).
      progress: show a progress bar (rich) on stderr.
      **replay_kwargs: passed to `replay` (warm_fraction, capacity_entries, eviction, grid, capture,
        bytes_per_checkpoint, planner_options).

    Returns:
      One `PolicySummary` per policy, in the given order.
    """
    from sparse_prefix.planner import parse_policy

    policies = [str(p) for p in policies]
    if not policies:
        raise ValueError("policies: need at least one policy spec")
    for policy in policies:
        parse_policy(policy)
    seeds = _seed_list(seeds)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
    if not callable(requests_or_builder):
        requests_or_builder = list(requests_or_builder)
        _check_replay_args(requests_or_builder, replay_kwargs.get("warm_fraction", 0.6),
                           replay_kwargs.get("bytes_per_checkpoint"))
    units = [(seed, policy) for seed in seeds for policy in policies]
    order_args = (limit, max_tokens)
    results: dict[tuple[int, str], dict] = {}
    with _progress_bar(progress, len(units)) as advance:
        if workers == 1 or len(units) == 1:
            _init_worker(requests_or_builder)
            _ordered.cache_clear()
            try:
                for unit in units:
                    results[unit] = _run_unit(*unit, order_args, replay_kwargs)
                    advance()
            finally:
                _ordered.cache_clear()
                _init_worker(None)
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(requests_or_builder,)) as pool:
                futures = {pool.submit(_run_unit, *unit, order_args, replay_kwargs): unit for unit in units}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    advance()
    return [summarise(p, seeds, [results[(s, p)] for s in seeds]) for p in policies]


class _progress_bar:
    """A context manager yielding ``advance()``; a rich progress bar when enabled, else a no-op."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
        self.bar.__enter__()
        task = self.bar.add_task("replays", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


# ---------------------------------------------------------------------------------------------------
# Result files


def write_json(path: str | os.PathLike, summaries: Sequence[PolicySummary], config: Mapping[str, Any] | None = None
               ) -> Path:
    """Write ``{"config": ..., "policies": [PolicySummary.as_dict(), ...]}`` as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": dict(config or {}), "policies": [s.as_dict() for s in summaries]}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: str | os.PathLike, summaries: Sequence[PolicySummary]) -> Path:
    """Write one row per policy: ``policy, seeds, <metric>_mean, <metric>_sd, ...``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in METRICS if any(m in s.mean for s in summaries)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["policy", "seeds"] + [f"{m}_{k}" for m in metrics for k in ("mean", "sd")])
        for summary in summaries:
            row = [summary.policy, len(summary.seeds)]
            for metric in metrics:
                row += [summary.mean.get(metric, ""), summary.sd.get(metric, "")]
            writer.writerow(row)
    return path
