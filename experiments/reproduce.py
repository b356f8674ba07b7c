"""Reproduce the paper's Pareto frontier on real data, beside its published points, then go further.

A `PolicyRun` is one point of the sweep: a Planner spec plus the replay settings it needs (grid,
eviction, planner options such as token-level bins or a hybrid cost). `paper_runs` are the paper's
policies and budgets; `our_runs` this project's additions (token-level / chunk-grid / hybrid-cost
dp, ldp, ldp+fill (the DP's idle budget spent on uncovered gaps), the end-anchored ``adp`` of
`sparse_prefix.experiments.anchored`, +fork / +hints);
`peer_runs` the placements of serving systems (ANCHORS.md). `run_reproduction` replays them all with
`sparse_prefix.simulate.sweep` under the paper's protocol (capture "separate", FIFO) and under the
engine's real behaviour (capture "one-pass"); `acceptance` evaluates issue 6's targets.

Peer baselines, as token accounting:
  * vLLM ``mamba_cache_mode="all"``: a state at every block boundary, block = its hybrid block size
    (528 for Qwen3.5-like stacks) -> ``block:528``.
  * SGLang MambaRadixCache: states at chunked-prefill chunk ends and at the request end, chunk 4096
    (the paper's chunked prefill) -> ``block:4096+end``. SGLang counts chunks from the resume point;
    counting them from token 0 differs only for hits that resume mid-chunk.
  * Marconi: states at the request end and at branch points (our fork point), utility eviction
    (recency + tokens saved per state, alpha 0.5) -> ``end+fork`` with ``eviction="utility"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from sparse_prefix.experiments.anchored import SPEC_PREFIX as ANCHORED_PREFIX
from sparse_prefix.experiments.anchored import parse_anchored, sweep_anchored
from sparse_prefix.experiments.paper import (PAPER_BALANCED_COUNTS, PAPER_BLOCK_SIZES, PAPER_DP_BUDGETS)
from sparse_prefix.traces import Request

CAPACITY = {"quality": 20, "system-prompts": 50}
CAPTURES = ("separate", "one-pass")
VLLM_BLOCK = 528
SGLANG_CHUNK = 4096
OUR_DP_BUDGETS = (1, 2, 3, 5, 8)
FORK_HINT_BUDGETS = (1, 2, 3)
TOKEN_LDP_BUDGETS = (1, 2, 3)  # token-level ldp solves ~17 histograms of 16k depths: the slowest runs
CEILING_SPEC = "block:64"
MEMORY_PRESET = "qwen3.5-0.8b-group"


@dataclasses.dataclass(frozen=True)
class PolicyRun:
    """One policy of the sweep.

    Attributes:
      label: unique name in tables and plots, e.g. ``dp:8``, ``dp:8 bins=1``, ``vLLM all``.
      spec: the Planner spec replayed.
      family: the plot series it belongs to.
      origin: "paper" (the paper's policies), "ours" or "peer".
      grid: the exactness grid every position is snapped to.
      eviction: "fifo", "lru" or "utility".
      planner_options: extra Planner keyword arguments, as sorted (name, value) pairs.
    """

    label: str
    spec: str
    family: str
    origin: str
    grid: int = 1
    eviction: str = "fifo"
    planner_options: tuple[tuple[str, Any], ...] = ()

    @property
    def anchored(self) -> bool:
        """An ``adp:M`` run (`sparse_prefix.experiments.anchored`), replayed by `sweep_anchored`."""
        return self.spec.startswith(ANCHORED_PREFIX)

    @property
    def settings(self) -> tuple:
        """What must be shared by runs replayed in one sweep call."""
        return (self.anchored, self.grid, self.eviction, self.planner_options)


def paper_runs() -> list[PolicyRun]:
    """The paper's policies and budgets: dp M, block B, balanced k, log, sqrt."""
    runs = [PolicyRun(f"dp:{m}", f"dp:{m}", "dp", "paper") for m in PAPER_DP_BUDGETS]
    runs += [PolicyRun(f"block:{b}", f"block:{b}", "block", "paper") for b in PAPER_BLOCK_SIZES]
    runs += [PolicyRun(f"balanced:{k}", f"balanced:{k}", "balanced", "paper") for k in PAPER_BALANCED_COUNTS]
    return runs + [PolicyRun("log", "log", "log", "paper"), PolicyRun("sqrt", "sqrt", "sqrt", "paper")]


def our_runs(hybrid_cost: str | None = None) -> list[PolicyRun]:
    """This project's policies: token-level dp, dp on the chunk grid 64, hybrid-cost dp, ldp, ldp+fill,
    adp, and the +fork / +hints variants (hints = the document/question or prompt/user boundary)."""
    token = (("bin_size", 1),)
    runs = [PolicyRun(f"dp:{m} bins=1", f"dp:{m}", "dp token-level", "ours", planner_options=token)
            for m in OUR_DP_BUDGETS]
    runs += [PolicyRun(f"dp:{m} grid=64", f"dp:{m}", "dp grid 64", "ours", grid=64) for m in OUR_DP_BUDGETS]
    if hybrid_cost is not None:
        runs += [PolicyRun(f"dp:{m} cost=hybrid", f"dp:{m}", "dp hybrid cost", "ours",
                           planner_options=(("cost", hybrid_cost),)) for m in OUR_DP_BUDGETS]
    runs += [PolicyRun(f"ldp:{m}", f"ldp:{m}", "ldp", "ours") for m in PAPER_DP_BUDGETS]
    runs += [PolicyRun(f"ldp:{m}+fill", f"ldp:{m}+fill", "ldp+fill", "ours") for m in PAPER_DP_BUDGETS]
    runs += [PolicyRun(f"adp:{m}", f"adp:{m}", "adp (end-anchored)", "ours") for m in OUR_DP_BUDGETS]
    runs += [PolicyRun(f"ldp:{m} bins=1", f"ldp:{m}", "ldp token-level", "ours", planner_options=token)
             for m in TOKEN_LDP_BUDGETS]
    runs += [PolicyRun("none+hints", "none+hints", "hints", "ours"),
             PolicyRun("none+fork", "none+fork", "fork", "ours"),
             PolicyRun("none+fork+hints", "none+fork+hints", "fork+hints", "ours"),
             PolicyRun("none+fork+hints grid=64", "none+fork+hints", "fork+hints grid 64", "ours", grid=64)]
    runs += [PolicyRun(f"dp:{m}+fork", f"dp:{m}+fork", "dp+fork", "ours") for m in FORK_HINT_BUDGETS]
    runs += [PolicyRun(f"dp:{m}+fork+hints", f"dp:{m}+fork+hints", "dp+fork+hints", "ours")
             for m in FORK_HINT_BUDGETS]
    runs += [PolicyRun(f"ldp:{m}+hints", f"ldp:{m}+hints", "ldp+hints", "ours") for m in FORK_HINT_BUDGETS]
    runs += [PolicyRun(f"ldp:{m}+fork+hints", f"ldp:{m}+fork+hints", "ldp+fork+hints", "ours")
             for m in FORK_HINT_BUDGETS]
    return runs


def peer_runs() -> list[PolicyRun]:
    """Serving systems' placements (see the module docstring)."""
    return [PolicyRun("vLLM all", f"block:{VLLM_BLOCK}", "vLLM all", "peer"),
            PolicyRun("SGLang", f"block:{SGLANG_CHUNK}+end", "SGLang", "peer"),
            PolicyRun("Marconi", "end+fork", "Marconi", "peer", eviction="utility")]


def quick_runs(hybrid_cost: str | None = None) -> list[PolicyRun]:
    """A small sweep that still evaluates every acceptance target (for --quick and tests)."""
    keep = {"dp:1", "dp:3", "dp:8", "block:64", "block:512", "block:2048", "block:4096", "balanced:1",
            "balanced:3", "log", "sqrt", "ldp:1", "ldp:3", "ldp:8", "ldp:8+fill", "adp:1", "adp:3",
            "none+fork+hints", "dp:1+fork+hints",
            "vLLM all", "SGLang", "Marconi"}
    return [run for run in default_runs(hybrid_cost) if run.label in keep]


def default_runs(hybrid_cost: str | None = None) -> list[PolicyRun]:
    """Every run: the paper's, ours and the peers'."""
    return paper_runs() + our_runs(hybrid_cost) + peer_runs()


def one_pass_runs(runs: Sequence[PolicyRun]) -> list[PolicyRun]:
    """The runs replayed again with the engine's one-pass capture: all but the paper's fixed heuristics
    (balanced, log, sqrt) and the dp variants (token bins, chunk grid, hybrid cost), which the paper
    protocol already compares; this keeps a full reproduction well under 30 minutes."""
    skipped = {"balanced", "log", "sqrt", "dp token-level", "dp grid 64", "dp hybrid cost", "ldp token-level"}
    return [run for run in runs if run.family not in skipped]


def runs_from_names(names: Sequence[str], hybrid_cost: str | None = None) -> list[PolicyRun]:
    """Runs from CLI names: ``paper``, ``ours``, ``peers``, ``quick``, a run label (``dp:8 bins=1``,
    ``vLLM all``) or any Planner spec (replayed with grid 1, FIFO)."""
    from sparse_prefix.planner import parse_policy

    sets = {"paper": paper_runs(), "ours": our_runs(hybrid_cost), "peers": peer_runs(),
            "quick": quick_runs(hybrid_cost)}
    by_label = {run.label: run for run in default_runs(hybrid_cost)}
    runs: dict[str, PolicyRun] = {}
    for name in names:
        if name in sets:
            runs.update((run.label, run) for run in sets[name])
        elif name in by_label:
            runs[name] = by_label[name]
        elif name.startswith(ANCHORED_PREFIX):
            parse_anchored(name)
            runs[name] = PolicyRun(name, name, "adp (end-anchored)", "ours")
        else:
            family = parse_policy(name).family
            runs[name] = PolicyRun(name, name, family, "ours")
    if not runs:
        raise ValueError("policies: need at least one policy")
    return list(runs.values())


# ------------------------------------------------------------------------------------- model costs


@functools.lru_cache(maxsize=4)
def memory_profile(preset: str = MEMORY_PRESET, dtype: str = "float16"):
    """The `MemoryProfile` of a model preset (the paper ran the Qwen3.5-0.8B group in fp16)."""
    import jax.numpy as jnp

    from sparse_prefix.models import build

    return build(preset, dtype=getattr(jnp, dtype)).memory_profile()


def checkpoint_bytes(preset: str = MEMORY_PRESET, dtype: str = "float16") -> int:
    """Bytes of one checkpoint: every recurrent layer's float32 state and its conv window."""
    return int(memory_profile(preset, dtype).checkpoint_bytes)


@functools.lru_cache(maxsize=4)
def hybrid_cost_spec(preset: str = MEMORY_PRESET) -> str:
    """The ``hybrid:1,b`` cost of a preset's prefill, from FLOPs.

    A token at depth u costs ``lin + att * u`` FLOPs: ``lin`` = 2 x the layer weights (matmuls and conv)
    + 4 H Dk Dv per Gated DeltaNet layer (state update and read-out); ``att`` = 4 x heads x head_dim per
    attention layer (scores and values). Recomputing depths c..t costs g(t) - g(c) with
    g(t) ~ lin t + att t^2 / 2, i.e. ``hybrid:1,b`` with b = att / (2 lin).
    """
    import jax

    from sparse_prefix.models import build

    model = build(preset)
    shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    weights = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["layers"])
                  if len(leaf.shape) >= 2)
    config = model.config
    lin = 2.0 * weights
    att = 0.0
    for letter in config.pattern:
        if letter == "G":
            gdn = config.gdn
            lin += 4.0 * gdn.num_v_heads * gdn.head_k_dim * gdn.head_v_dim
        elif letter == "A":
            att += 4.0 * config.attention.num_heads * config.attention.head_dim
    return f"hybrid:1,{att / (2.0 * lin):.6g}"


# --------------------------------------------------------------------------------------- running


def subset_groups(requests: Sequence[Request], groups: int, seed: int) -> list[Request]:
    """The requests of `groups` groups drawn at random per seed (file order kept).

    The paper's System Prompts run had ~85% hits with 50 entries, which matches ~34 prompts
    (1,000 requests / 30 queries), far fewer than the 198 that pass the filter today; drawing that
    many per seed reproduces its workload shape (see BENCHMARKS.md).
    """
    names = list(dict.fromkeys(r.group for r in requests))
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if groups >= len(names):
        return list(requests)
    chosen = set(np.random.default_rng([seed, groups]).choice(len(names), groups, replace=False))
    keep = {names[i] for i in chosen}
    return [r for r in requests if r.group in keep]


def _source(requests: Sequence[Request], groups: int | None):
    if groups is None:
        return list(requests)
    return functools.partial(_subset_builder, tuple(requests), groups)


def _subset_builder(requests: tuple, groups: int, seed: int) -> list[Request]:
    return subset_groups(requests, groups, seed)


_TASK_SOURCE: Any = None
TASK_SIZE = 3  # policies per task: small enough to balance two workers, large enough to share orderings


def _init_task_worker(source) -> None:
    global _TASK_SOURCE
    _TASK_SOURCE = source


def _run_task(specs: Sequence[str], kwargs: Mapping[str, Any]) -> list:
    from sparse_prefix.simulate import sweep

    if all(spec.startswith(ANCHORED_PREFIX) for spec in specs):
        return sweep_anchored(_TASK_SOURCE, list(specs), **kwargs)
    return sweep(_TASK_SOURCE, list(specs), workers=1, **kwargs)


def _tasks(runs: Sequence[PolicyRun], captures: Sequence[str], reduce_one_pass: bool,
           common: Mapping[str, Any]) -> list[tuple[str, list[PolicyRun], dict[str, Any]]]:
    """(capture, runs, sweep kwargs) per task: runs of equal settings, at most TASK_SIZE each, the
    histogram-driven ones first (they take longest)."""
    tasks = []
    for capture in captures:
        chosen = runs if capture == "separate" or not reduce_one_pass else one_pass_runs(runs)
        batches: dict[tuple, list[PolicyRun]] = {}
        for run in chosen:
            batches.setdefault(run.settings, []).append(run)
        for (_, grid, eviction, options), members in batches.items():
            kwargs = dict(common, capture=capture, grid=grid, eviction=eviction, planner_options=dict(options))
            for first in range(0, len(members), TASK_SIZE):
                tasks.append((capture, members[first:first + TASK_SIZE], kwargs))
    return sorted(tasks, key=lambda task: sum(_run_weight(run) for run in task[1]), reverse=True)


def _run_weight(run: PolicyRun) -> int:
    """A rough relative replay cost: histogram solves dominate, batched / token-level ones most."""
    kind = run.spec.split(":")[0].split("+")[0]
    if kind == "ldp" or ("bin_size", 1) in run.planner_options:
        return 5
    return 2 if kind in ("dp", "adp") else 1


def run_reproduction(requests: Sequence[Request], runs: Sequence[PolicyRun], *, capacity: int,
                     seeds: int = 5, captures: Sequence[str] = CAPTURES, groups: int | None = None,
                     limit: int = 1000, max_tokens: int = 16384, workers: int = 1,
                     bytes_per_checkpoint: float | None = None, progress: bool = False,
                     reduce_one_pass: bool = True) -> dict[str, dict[str, Any]]:
    """Replay every run under every capture mode.

    Runs of equal settings are replayed by `sparse_prefix.simulate.sweep` in tasks of a few policies;
    with ``workers > 1`` the tasks go to ONE pool of processes that lives for the whole reproduction,
    so each worker compiles each solver shape once.

    Args:
      requests: the data set's trace in file order.
      runs: the policies (unique labels).
      capacity: retained cache entries.
      seeds: seeds 0..seeds-1 (>= 1).
      captures: capture modes to run ("separate", "one-pass").
      groups: draw this many groups per seed (None: all).
      limit, max_tokens: as in `sparse_prefix.simulate.sweep`.
      workers: processes (1: in this process).
      bytes_per_checkpoint: for ``state_bytes_per_request``.
      progress: print one line per finished task on stderr.
      reduce_one_pass: replay only `one_pass_runs(runs)` under "one-pass".

    Returns:
      {capture: {label: PolicySummary}} in the order of `runs`.
    """
    import sys
    import time

    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"runs: duplicate labels in {labels}")
    for capture in captures:
        if capture not in CAPTURES:
            raise ValueError(f"captures: unknown capture {capture!r}, expected one of {CAPTURES}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: must be an integer >= 1, got {workers!r}")
    common = dict(seeds=seeds, limit=limit, max_tokens=max_tokens, capacity_entries=capacity,
                  bytes_per_checkpoint=bytes_per_checkpoint)
    tasks = _tasks(runs, captures, reduce_one_pass, common)
    source = _source(requests, groups)
    by_capture: dict[str, dict[str, Any]] = {capture: {} for capture in captures}
    started = time.time()

    def collect(index: int, summaries: list) -> None:
        capture, members, _ = tasks[index]
        by_capture[capture].update((run.label, summary) for run, summary in zip(members, summaries))
        if progress:
            done = sum(len(found) for found in by_capture.values())
            print(f"[{time.time() - started:6.0f} s] {done} replayed: {', '.join(r.label for r in members)} "
                  f"({capture})", file=sys.stderr, flush=True)

    if workers == 1 or len(tasks) == 1:
        _init_task_worker(source)
        try:
            for index, (_, members, kwargs) in enumerate(tasks):
                collect(index, _run_task([run.spec for run in members], kwargs))
        finally:
            _init_task_worker(None)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_task_worker,
                                 initargs=(source,)) as pool:
            futures = {pool.submit(_run_task, [run.spec for run in members], kwargs): index
                       for index, (_, members, kwargs) in enumerate(tasks)}
            for future in as_completed(futures):
                collect(futures[future], future.result())
    return {capture: {label: found[label] for label in labels if label in found}
            for capture, found in by_capture.items()}


def trace_stats(requests: Sequence[Request], *, seeds: int, groups: int | None = None,
                limit: int = 1000, max_tokens: int = 16384, warm_fraction: float = 0.6
                ) -> dict[str, float]:
    """Sizes of the replayed traces: requests and groups in the file, and per replay (mean over
    seeds) requests, measured requests, groups and the measured requests' mean length."""
    from sparse_prefix.traces import protocol_order, warm_count

    replayed, measured, group_counts, lengths = [], [], [], []
    for seed in range(seeds):
        source = requests if groups is None else subset_groups(requests, groups, seed)
        order = protocol_order(source, seed=seed, limit=limit, max_tokens=max_tokens)
        tail = order[warm_count(len(order), warm_fraction):]
        replayed.append(len(order))
        measured.append(len(tail))
        group_counts.append(len({r.group for r in order}))
        lengths.append(np.mean([r.length for r in tail]))
    return {"file_requests": len(requests), "file_groups": len({r.group for r in requests}),
            "replayed_requests": float(np.mean(replayed)), "measured_requests": float(np.mean(measured)),
            "replayed_groups": float(np.mean(group_counts)),
            "measured_mean_length": float(np.mean(lengths))}


# ------------------------------------------------------------------------------------ acceptance


def frontier_at(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """The staircase frontier of `points` (checkpoints, saved) at x: the most saved by any point with
    at most x checkpoints (a relative 1e-9 slack), or None when no point qualifies."""
    qualifying = [y for px, y in points if px <= x * (1 + 1e-9) + 1e-12]
    return max(qualifying) if qualifying else None


def _point(summary) -> tuple[float, float]:
    return summary.mean["checkpoints_per_request"], summary.mean["tokens_saved_pct"]


def _dominance(ours: Sequence[tuple[float, float]], others: Mapping[str, tuple[float, float]]) -> dict:
    margins = {}
    for label, (x, y) in others.items():
        value = frontier_at(ours, x)
        margins[label] = None if value is None else value - y
    passed = bool(others) and all(m is not None and m >= 0 for m in margins.values())
    return {"passed": passed, "margins": margins}


def _is_plain(run: PolicyRun, kind: str) -> bool:
    """A run of policy kind `kind` ("dp", "ldp", "adp") without modifiers other than +fill (which
    only tops the DP's own positions up to M, never beyond)."""
    return run.spec.startswith(kind + ":") and all(m == "fill" for m in run.spec.split("+")[1:])


def _near_ceiling(points: Sequence[tuple[float, float]], ceiling: tuple[float, float], max_checkpoints: float
                  ) -> dict[str, Any]:
    near = [p for p in points if p[1] >= ceiling[1] - 1.0 and p[0] <= max_checkpoints]
    return {"passed": bool(near), "best": min(near) if near else None, "max_checkpoints": max_checkpoints}


def acceptance(summaries: Mapping[str, Any], runs: Sequence[PolicyRun]) -> dict[str, Any]:
    """Issue 6's targets on one capture mode's results (means over seeds).

    Frontiers are staircases (`frontier_at`); "paper dp" is the paper's ``dp:M`` (bins of 64), "our
    dp" every dp-family run without modifiers but +fill (dp with any bins / grid / cost, ldp, ldp+fill,
    adp). A staircase extends each point flat to larger budgets: storing fewer checkpoints than
    allowed is always possible.

    * ``dp_dominates_heuristics``: the paper-dp frontier is >= every balanced, log and sqrt point
      (margins in points; None = no dp point at so few checkpoints). ``our_dp_dominates_heuristics``:
      the same for the our-dp frontier.
    * ``dp_near_ceiling``: some paper-dp point saves >= ceiling - 1 with <= 1/5 of the ceiling's
      checkpoints (ceiling = block:64). ``our_dp_near_ceiling``: the same for our dp.
    * ``ldp_dominates_block``: the frontier of the ldp runs (any bins, plain or +fill) is >= every block
      point storing >= 1 checkpoint per request. ``ldp_hints_dominates_block`` adds the ldp:M+hints
      runs; ``our_dp_dominates_block`` uses the our-dp frontier.
    * ``hints_fork_near_ceiling``: some +fork+hints run saves >= ceiling - 1 with <= 2 checkpoints.
    """
    by_label = {run.label: run for run in runs if run.label in summaries}
    points = {label: _point(summaries[label]) for label in by_label}
    result: dict[str, Any] = {}
    paper_dp = [points[l] for l, r in by_label.items() if r.origin == "paper" and r.family == "dp"]
    our_dp = [points[l] for l, r in by_label.items() if any(_is_plain(r, k) for k in ("dp", "ldp", "adp"))]
    ldp = [points[l] for l, r in by_label.items() if _is_plain(r, "ldp")]
    ldp_hints = ldp + [points[l] for l, r in by_label.items()
                       if r.spec.startswith("ldp:") and r.spec.endswith("+hints")]
    heuristics = {l: points[l] for l, r in by_label.items()
                  if r.origin == "paper" and r.family in ("balanced", "log", "sqrt")}
    blocks = {l: points[l] for l, r in by_label.items()
              if r.origin == "paper" and r.family == "block" and points[l][0] >= 1.0}
    for name, frontier, others in (("dp_dominates_heuristics", paper_dp, heuristics),
                                   ("our_dp_dominates_heuristics", our_dp, heuristics),
                                   ("ldp_dominates_block", ldp, blocks),
                                   ("ldp_hints_dominates_block", ldp_hints, blocks),
                                   ("our_dp_dominates_block", our_dp, blocks)):
        if frontier and others:
            result[name] = _dominance(frontier, others)
    ceiling = next((points[l] for l, r in by_label.items() if r.spec == CEILING_SPEC and r.grid == 1
                    and r.eviction == "fifo"), None)
    if ceiling is not None:
        result["ceiling"] = {"checkpoints_per_request": ceiling[0], "tokens_saved_pct": ceiling[1]}
        for name, frontier in (("dp_near_ceiling", paper_dp), ("our_dp_near_ceiling", our_dp)):
            if frontier:
                result[name] = _near_ceiling(frontier, ceiling, ceiling[0] / 5.0)
        fork_hints = {l: points[l] for l, r in by_label.items() if "+fork" in r.spec and "+hints" in r.spec}
        if fork_hints:
            near = {l: p for l, p in fork_hints.items() if p[0] <= 2.0 and p[1] >= ceiling[1] - 1.0}
            result["hints_fork_near_ceiling"] = {"passed": bool(near), "runs": near}
    return result
