"""Timed replays of the paper's protocol through the real Engine and model (issue 7, "Timed replays").

For each policy a fresh ``Engine(model, params, policy, eviction, capacity_entries)`` (grid = the
model's chunk size, capture one-pass: what the engine does) serves every request of the protocol order
(`sparse_prefix.traces.protocol_order`) one by one at batch 1, in the request's group as namespace:

  * before anything is timed, every program the trace needs is compiled: the prefill (one program for
    the whole run: every engine pads checkpoint lists to the same `checkpoint_slots`, the power of two
    that covers the most states any request of any policy stores, found by a simulator replay), the
    store's gather, and its insert / page-write scatters at every row bucket up to what a request can
    move (writing zeros into a zeroed store: the cache stays empty). Every engine allocates one
    layout (`shared_layout`: the slots of the policy storing the most), so only the first policy's
    setup compiles: the rest reuse its programs, whose shapes include the store's;
  * the first `warm_fraction` of the requests run untimed (they fill the cache and the histograms);
    the device is synchronised after them;
  * each measured request is timed with `perf_counter` around `engine.prefill`, which returns once
    the logits are ready (block_until_ready). The scatters that store its states are dispatched
    asynchronously and finish on the device before the next request's prefill starts, so the sum of
    the measured times is the device-serialised cost of the replay.

"No cache" is the policy ``none`` through the same Engine and the same compiled prefill: it stores no
state, so every request misses and runs from position 0. Its total measured time is the baseline of
every speedup (it always runs first, added when missing).

The engine's own accounting (resume positions, recomputed tokens, states stored) is compared with the
simulator's one-pass replay of the same order, policy, grid, capacity and planner options
(`accounting_matches_simulator`); with ``background_resolve=False`` (the default here, so a run is
deterministic; the DP re-solve then runs inside `observe` and is timed as engine overhead) they must
agree exactly. The engine overhead share is 1 - sum(prefill) / sum(total) of `RequestStats.timings`,
i.e. planning, hashing, the gather dispatch and commit; the gather's device time lands inside the
prefill timing (it runs on the device just before it), so this share is a lower bound. The resume
benchmark (`bench_resume`) measures the full overhead of a hit directly.

With ``rounds`` > 1 the whole list of policies is replayed that many times, round-robin (none, the
others, none, the others, ...), each time through a fresh Engine: drift of the clocks or the host
between policies then falls on every policy alike. The table pools the rounds (a policy's speedup is
the no-cache seconds over its own seconds, both summed over the rounds it completed) and reports each
round's speedup beside it: one replay of System Prompts is ~2 s of measured requests, and single
replays on one machine spread by 10-20% (fourteenth session: dp:12 1.68-1.97x).

A `budget_s` keeps a run inside a device call's limit: a policy starts only while the time used so far
plus the next one's expected duration fits the budget (`expected_policy_seconds`: the first policy's
setup compiles for every policy, so only its replay predicts the next ones), and a policy
that overruns it mid-way is abandoned (reported under ``skipped``, never as a result).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sparse_prefix.traces import Request, protocol_order, warm_count

DEFAULT_POLICIES = ("none", "block:512", "block:1024", "block:4096", "dp:1", "dp:12", "ldp:1", "ldp:8",
                    "ldp:8+fork")
RECORD_FIELDS = ("length", "overlap", "resume_position", "recomputed_tokens", "checkpoints_stored", "hit",
                 "time_s", "plan_s", "restore_s", "prefill_s", "commit_s", "dispatch_s", "wait_s")
MIN_CHECKPOINT_SLOTS = 8


@dataclasses.dataclass(frozen=True)
class PolicyTiming:
    """One policy's timed replay.

    Attributes:
      policy: the Planner spec.
      records: per measured request, arrays named by `RECORD_FIELDS` (float64 for the ``*_s`` times in
        seconds, int64 otherwise; ``hit`` is 0/1).
      warm_s: wall seconds of the untimed warm part.  setup_s: engine construction and compilation.
      compiles: model compilations during the measured part (None if the model does not count them).
      simulator_mismatches: measured requests whose resume position, recomputed tokens or states
        stored differ from the simulator's one-pass replay (None: not checked).
      round: which round of the run (0-based; see `run_replay`'s rounds).
    """

    policy: str
    records: Mapping[str, np.ndarray]
    warm_s: float
    setup_s: float
    compiles: int | None
    simulator_mismatches: int | None
    round: int = 0

    @property
    def measured_s(self) -> float:
        return float(np.sum(self.records["time_s"]))


@dataclasses.dataclass(frozen=True)
class TimedReplay:
    """A whole timed run.

    Attributes:
      timings: completed policy replays, in run order ("none" first in each round).
      skipped: policies not run or abandoned, each {"policy", "reason"} (and "round" when the run
        has several).
      n_requests, n_warm: the replayed requests and how many of them only warmed the cache.
      checkpoint_slots: the padded checkpoint slots of every prefill call.
      mean_length: mean length of the measured requests.
    """

    timings: tuple[PolicyTiming, ...]
    skipped: tuple[dict, ...]
    n_requests: int
    n_warm: int
    checkpoint_slots: int
    mean_length: float

    def baseline_s(self) -> float | None:
        """Total measured seconds of the no-cache runs, every round (None if none completed)."""
        runs = [timing.measured_s for timing in self.timings if timing.policy == "none"]
        return float(sum(runs)) if runs else None

    @property
    def rounds(self) -> int:
        """Rounds with at least one completed policy."""
        return len({timing.round for timing in self.timings})


class _OutOfBudget(Exception):
    def __init__(self, done: int, total: int):
        super().__init__(f"budget exceeded after {done} of {total} requests")


# ----------------------------------------------------------------------------- preparation


def fold_vocab(requests: Sequence[Request], vocab_size: int) -> list[Request]:
    """Requests with token ids taken modulo `vocab_size` (to replay a real trace on a tiny model).

    Folding keeps every shared prefix shared; it can only lengthen overlaps (two different ids may
    fold to one), so compare accounting only between runs of the same folded trace.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    return [Request(r.group, r.tokens % vocab_size, r.hints, meta=r.meta) for r in requests]


def check_vocab(requests: Sequence[Request], vocab_size: int) -> None:
    """Raise ValueError if any token id is outside the model's vocabulary 0..vocab_size-1."""
    top = max(int(r.tokens.max()) for r in requests)
    if top >= vocab_size:
        raise ValueError(f"the trace has token id {top}, outside the model's vocabulary 0..{vocab_size - 1} "
                         f"(use a model of that tokenizer, or fold ids with --fold-vocab for a smoke run)")


def planner_options_for(model: Any) -> dict[str, int]:
    """The Planner options an Engine of `model` uses (the simulator replays with the same ones)."""
    from sparse_prefix.store import default_bin_size

    return {"max_length": int(model.max_length),
            "bin_size": default_bin_size(int(model.max_length), int(model.chunk_size))}


def simulate_policies(order: Sequence[Request], policies: Sequence[str], *, model: Any, capacity: int,
                      eviction: str) -> dict[str, Mapping[str, np.ndarray]]:
    """The simulator's one-pass replay of every request (nothing warm-only) per policy: records."""
    from sparse_prefix.simulate import replay

    return {policy: replay(order, policy, warm_fraction=0.0, capacity_entries=capacity, eviction=eviction,
                           grid=int(model.chunk_size), capture="one-pass",
                           planner_options=planner_options_for(model)).records
            for policy in policies}


def pow2_at_least(count: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(count, minimum)."""
    return 1 << (max(int(count), int(minimum), 1) - 1).bit_length()


def move_buckets(rows: int, capacity: int) -> list[int]:
    """Row counts that compile every store scatter bucket (`store.move_bucket`) for up to `rows` rows
    moved in one call, each at most `capacity` (the slots or pages that exist)."""
    from sparse_prefix.store import move_bucket

    counts = sorted({min(move_bucket(n), capacity) for n in range(1, max(rows, 0) + 1)})
    return [c for c in counts if c >= 1]


def prepare_engine(engine: Any, *, checkpoint_slots: int, max_states: int, max_pages: int,
                   max_tokens: int | None = None) -> None:
    """Compile everything a replay will run on a fresh `engine`, leaving its cache as it was (empty).

    `Engine.warmup` compiles the prefill and the smallest store buckets; the larger insert / page
    buckets are compiled here by writing ZERO states and pages into the first slots and pages: the
    store starts zeroed, so its content is unchanged, and the index never saw them. (No
    `Engine.clear`: it would allocate a second set of slabs while the first is alive.)

    Args:
      engine: a fresh Engine built with ``min_checkpoint_slots=checkpoint_slots`` (no requests yet).
      checkpoint_slots: its padded checkpoint slots (K of the emitted leaves).
      max_states: the most states one request stores (insert rows per call).
      max_pages: the most KV pages one request writes.
      max_tokens: the longest request (`Engine.warmup`: a static step loop compiles every step count
        up to it); default the model's max_length.
    """
    import jax
    import jax.numpy as jnp

    if engine.stats()["requests"]:
        raise ValueError("prepare_engine needs a fresh engine (it has served requests)")
    engine.warmup([1], max_tokens=max_tokens)
    model, store = engine.model, engine.store
    width, chunk = int(model.max_length), int(model.chunk_size)
    checkpoints = np.zeros((1, checkpoint_slots), np.int32)
    checkpoints[0, 0] = min(chunk, width)
    _, final, emitted = model.prefill(engine.params, np.zeros((1, width), np.int32),
                                      store.restore([-1], [0]), checkpoints,
                                      np.asarray([min(chunk, width)], np.int32))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, (emitted, final.kv))
    store.recycle(final.kv)                    # the restore's scratch goes back, as after a request
    for rows in move_buckets(max_states, store.num_slots):
        store.insert(zeros[0], np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.arange(rows))
    if store.has_kv:
        for rows in move_buckets(max_pages, store.num_pages):
            store.write_pages(zeros[1], np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.arange(rows))
    store.synchronize()


# ----------------------------------------------------------------------------- one policy


def _sync(engine: Any) -> None:
    """Wait for every dispatched store write."""
    engine.store.synchronize()


def replay_engine(engine: Any, order: Sequence[Request], n_warm: int, *, deadline: float | None = None
                  ) -> tuple[dict[str, np.ndarray], float, int | None]:
    """Serve `order` through `engine`: the first `n_warm` untimed, the rest timed one by one.

    Returns:
      (records of the measured requests named by `RECORD_FIELDS`, warm-part seconds, model
      compilations during the measured part or None).

    Raises:
      _OutOfBudget: `deadline` (a `time.perf_counter` value) passed before the replay finished.
    """
    import jax

    rows = np.zeros((len(order) - n_warm, len(RECORD_FIELDS)), np.float64)
    started = time.perf_counter()
    warm_s, compiles_before = 0.0, None
    if n_warm == 0:
        compiles_before = getattr(engine.model, "compile_count", None)
    for i, request in enumerate(order):
        if deadline is not None and time.perf_counter() > deadline:
            raise _OutOfBudget(i, len(order))
        start = time.perf_counter()
        result = engine.prefill(request.tokens, hints=request.hints, namespace=request.group)
        jax.block_until_ready(result.last_logits)
        elapsed = time.perf_counter() - start
        if i == n_warm - 1:
            _sync(engine)
            warm_s = time.perf_counter() - started
            compiles_before = getattr(engine.model, "compile_count", None)
        if i >= n_warm:
            stats, t = result.stats, result.stats.timings
            rows[i - n_warm] = (request.length, stats.overlap_depth, stats.resume_position,
                                stats.recomputed_tokens, stats.checkpoints_stored, stats.overlap_depth > 0,
                                elapsed, t["plan"], t["restore"], t["prefill"], t["commit"], t["dispatch"],
                                t["wait"])
    compiles_after = getattr(engine.model, "compile_count", None)
    compiles = None if compiles_before is None else int(compiles_after - compiles_before)
    records = {name: (rows[:, j] if name.endswith("_s") else rows[:, j].astype(np.int64))
               for j, name in enumerate(RECORD_FIELDS)}
    return records, warm_s, compiles


def simulator_mismatches(records: Mapping[str, np.ndarray], simulated: Mapping[str, np.ndarray],
                         n_warm: int) -> int:
    """Measured requests whose engine accounting differs from the simulator's (all-request) records."""
    pairs = (("resume_position", "resume_position"), ("recomputed_tokens", "recomputed_tokens"),
             ("checkpoints_stored", "new_checkpoints"))
    differ = np.zeros(records["length"].shape, bool)
    for ours, theirs in pairs:
        differ |= records[ours] != simulated[theirs][n_warm:]
    return int(differ.sum())


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class ReplayPlan:
    """What a timed run will replay, decided before any device work.

    Attributes:
      policies: "none" first, then the others (duplicates dropped).
      order: the protocol order (truncated to the model's max_length).  n_warm: its warm-only head.
      simulated: per policy the simulator's one-pass records of every request (`simulate.RECORD_FIELDS`).
      checkpoint_slots: padded checkpoint slots of every prefill (a power of two >= 8 covering the
        most states any request of any policy stores): one compiled prefill for the whole run.
      max_pages: the most KV pages one request writes.
      capacity, eviction: the cache's entries and eviction policy.
      layout: the `CacheLayout` every policy's Engine allocates: the one of the policy that stores
        the most states per entry (`shared_layout`), so every engine of the run shares the compiled
        fused prefill and store programs (only the policy differs between runs).
    """

    policies: tuple[str, ...]
    order: tuple[Request, ...]
    n_warm: int
    simulated: Mapping[str, Mapping[str, np.ndarray]]
    checkpoint_slots: int
    max_pages: int
    capacity: int
    eviction: str
    layout: Any = None


def shared_layout(model: Any, policies: Sequence[str], capacity: int) -> Any:
    """The `CacheLayout` with the most slots among `Engine.abstract(model, policy, capacity)` of the
    policies: every engine of a replay can allocate it and holds `capacity` entries of its policy.
    (Pages do not depend on the policy.) With one layout, engines of one model share every compiled
    program, so a policy's setup compiles nothing new -- on a static step loop (one program per step
    count) that is most of a replay's setup."""
    from sparse_prefix.engine import Engine

    layouts = [Engine.abstract(model, policy=policy, capacity_entries=capacity) for policy in policies]
    return max(layouts, key=lambda layout: layout.num_slots)


def plan_replay(requests: Sequence[Request], policies: Sequence[str], *, model: Any, seed: int, capacity: int,
                eviction: str = "fifo", warm_fraction: float = 0.6, limit: int = 1000,
                max_tokens: int = 16384) -> ReplayPlan:
    """Order the trace, check it against the model and simulate every policy (host and solver only).

    Args:
      requests: the trace in file order (token ids inside the model's vocabulary).
      policies: Planner specs; "none" (no cache, the baseline) is run first, added if missing.
      model: the `RecurrentLM` (chunk_size, max_length, vocab_size are read).
      seed: the protocol order's seed.  capacity: cache entries (20 QuALITY, 50 System Prompts).
      eviction: the index's eviction policy.  warm_fraction: the untimed leading share, in [0, 1).
      limit, max_tokens: the protocol's request cut and truncation (capped at model.max_length).

    Returns:
      A `ReplayPlan`.
    """
    from sparse_prefix.planner import parse_policy

    policies = [str(p) for p in policies]
    for policy in policies:
        parse_policy(policy)
    policies = ["none"] + [p for p in dict.fromkeys(policies) if p != "none"]
    if isinstance(warm_fraction, bool) or not isinstance(warm_fraction, (int, float)) \
            or not 0.0 <= warm_fraction < 1.0:
        raise ValueError(f"warm_fraction must lie in [0, 1), got {warm_fraction!r}")
    order = protocol_order(requests, seed=seed, limit=limit, max_tokens=min(max_tokens, int(model.max_length)))
    check_vocab(order, int(model.vocab_size))
    n_warm = warm_count(len(order), warm_fraction)
    if n_warm >= len(order):
        raise ValueError(f"warm_fraction={warm_fraction} leaves no measured request out of {len(order)}")
    simulated = simulate_policies(order, policies, model=model, capacity=capacity, eviction=eviction)
    most_states = max(int(r["new_checkpoints"].max()) for r in simulated.values())
    return ReplayPlan(policies=tuple(policies), order=tuple(order), n_warm=n_warm, simulated=simulated,
                      checkpoint_slots=pow2_at_least(most_states, MIN_CHECKPOINT_SLOTS),
                      max_pages=max(r.length for r in order) // int(model.chunk_size),
                      capacity=capacity, eviction=eviction, layout=shared_layout(model, policies, capacity))


def expected_policy_seconds(replays: Sequence[float], setups: Sequence[float]) -> float:
    """The seconds the next policy of a run is expected to take, given the replay seconds (warm part,
    measured part, accounting) and setup seconds of the policies done so far: the last replay plus the
    least setup after the first. The first policy's setup compiles what every engine of the run
    shares (one layout: `shared_layout`), so it does not predict the next ones (0 until a second
    policy has run; `prepare_engine` then only writes zeros through compiled programs)."""
    if not replays:
        return 0.0
    return float(replays[-1]) + (min(setups[1:]) if len(setups) > 1 else 0.0)


def run_replay(plan: ReplayPlan, *, model: Any, params: Any, budget_s: float | None = None,
               background_resolve: bool = False, check_accounting: bool = True,
               on_policy: Callable[[TimedReplay], None] | None = None,
               fuse_restore: bool | str = "auto", rounds: int = 1) -> TimedReplay:
    """Time `plan` through a fresh Engine per policy (see the module docstring), every engine
    allocating `plan.layout`, `rounds` times round-robin.

    Args:
      plan: from `plan_replay` (for this model).
      model, params: the `RecurrentLM` and its parameters.
      budget_s: wall seconds this call may take (None: unlimited).
      background_resolve: re-solve the DP on the engine's thread (serving mode; accounting may then
        differ from the simulator) instead of inline.
      check_accounting: compare each policy's accounting with the simulator.
      on_policy: called with the partial `TimedReplay` after each policy (e.g. to save results).
      fuse_restore: `Engine(fuse_restore=)`: the store's gather traced into the prefill's program.
      rounds: replays of the whole policy list (>= 1), in turn.

    Returns:
      A `TimedReplay`.
    """
    from sparse_prefix.engine import Engine, serving_params

    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float))
                                 or not budget_s > 0):
        raise ValueError(f"budget_s must be a number > 0 or None, got {budget_s!r}")
    started = time.perf_counter()
    deadline = None if budget_s is None else started + float(budget_s)
    order, n_warm, slots = plan.order, plan.n_warm, plan.checkpoint_slots
    mean_length = float(np.mean([r.length for r in order[n_warm:]]))
    timings: list[PolicyTiming] = []
    skipped: list[dict] = []
    expected, replays, setups = 0.0, [], []

    def snapshot() -> TimedReplay:
        return TimedReplay(tuple(timings), tuple(skipped), len(order), n_warm, slots, mean_length)

    params = serving_params(model, params)           # once: every policy's Engine shares it
    for round_, policy in ((r, p) for r in range(rounds) for p in plan.policies):
        where = {"round": round_} if rounds > 1 else {}
        now = time.perf_counter()
        if deadline is not None and now + expected > deadline:
            skipped.append({"policy": policy, **where,
                            "reason": f"not started: {now - started:.0f} s used, the next "
                                      f"policy would take ~{expected:.0f} s, budget {budget_s:.0f} s"})
            continue
        simulated = plan.simulated[policy]
        engine = Engine(model, params, policy=policy, eviction=plan.eviction, capacity_entries=plan.capacity,
                        background_resolve=background_resolve, min_checkpoint_slots=slots,
                        planner_options=planner_options_for(model), fuse_restore=fuse_restore,
                        layout=plan.layout)
        try:
            prepare_engine(engine, checkpoint_slots=slots, max_states=int(simulated["new_checkpoints"].max()),
                           max_pages=plan.max_pages,
                           max_tokens=min(max(r.length for r in plan.order), int(model.max_length)))
            setup_s = time.perf_counter() - now
            records, warm_s, compiles = replay_engine(engine, order, n_warm, deadline=deadline)
        except _OutOfBudget as stop:
            skipped.append({"policy": policy, **where, "reason": f"abandoned: {stop}"})
            continue
        finally:
            engine.close()
            del engine
            gc.collect()
        mismatches = simulator_mismatches(records, simulated, n_warm) if check_accounting else None
        timings.append(PolicyTiming(policy, records, warm_s, setup_s, compiles, mismatches, round_))
        setups.append(setup_s)
        replays.append(time.perf_counter() - now - setup_s)
        expected = expected_policy_seconds(replays, setups)
        if on_policy is not None:
            on_policy(snapshot())
    return snapshot()


def timed_replay(requests: Sequence[Request], policies: Sequence[str], *, model: Any, params: Any,
                 seed: int, capacity: int, eviction: str = "fifo", warm_fraction: float = 0.6,
                 limit: int = 1000, max_tokens: int = 16384, budget_s: float | None = None,
                 background_resolve: bool = False, check_accounting: bool = True,
                 on_policy: Callable[[TimedReplay], None] | None = None,
                 fuse_restore: bool | str = "auto", rounds: int = 1) -> TimedReplay:
    """`plan_replay` then `run_replay` (the budget counts from here, planning included); see both."""
    started = time.perf_counter()
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float))
                                 or not budget_s > 0):
        raise ValueError(f"budget_s must be a number > 0 or None, got {budget_s!r}")
    plan = plan_replay(requests, policies, model=model, seed=seed, capacity=capacity, eviction=eviction,
                       warm_fraction=warm_fraction, limit=limit, max_tokens=max_tokens)
    remaining = None if budget_s is None else max(budget_s - (time.perf_counter() - started), 1e-9)
    return run_replay(plan, model=model, params=params, budget_s=remaining,
                      background_resolve=background_resolve, check_accounting=check_accounting,
                      on_policy=on_policy, fuse_restore=fuse_restore, rounds=rounds)


# ----------------------------------------------------------------------------- summaries


def policy_metrics(timing: PolicyTiming, *, baseline_s: float | None, cost: Any = None,
                   step_tokens: int | None = None) -> dict[str, Any]:
    """The table row of one policy.

    Args:
      timing: its `PolicyTiming`.
      baseline_s: the no-cache run's total measured seconds (None: no speedups).
      cost: a `costmodel.CostModel` for the cost-model ideal (None: omitted).
      step_tokens: the model's prefill step in tokens (`step_tokens_of`) for the step bound (None:
        omitted).

    Returns:
      checkpoints_per_request, tokens_saved_pct, hit_rate_pct, measured_s, mean_request_ms,
      speedup, token_ideal_x, step_ideal_x, ideal_speedup, pct_of_ideal, engine_overhead_pct,
      host_ms_per_request, prefill_pct_of_model, warm_s, setup_s, compiles_during_measurement,
      simulator_mismatches (None where not available). ``step_ideal_x`` is `costmodel.step_ideal`:
      the speedup if a request cost its step count and nothing else -- no policy beats it on this
      model's step grid, up to the attention term (deeper steps cost a few % more). ``host_ms_per_request`` is the engine's time outside the model's
      prefill (planning, hashing, commit) per request; ``prefill_pct_of_model`` is the cost model's
      time of the recomputed suffixes over the measured prefill time, in percent: near 100 means
      the model's part runs as calibrated and the distance to the ideal is the engine's host work.
    """
    from sparse_prefix.experiments.costmodel import step_ideal, token_ideal

    r = timing.records
    lengths, resumes = r["length"], r["resume_position"]
    measured = timing.measured_s
    speedup = None if baseline_s is None else baseline_s / measured
    ideal = None if cost is None else cost.ideal_speedup(lengths, resumes)
    prefill_s = float(r["prefill_s"].sum())
    modelled_s = None if cost is None else float(np.sum(cost.resume(lengths, resumes)))
    return {
        "policy": timing.policy,
        "requests": int(lengths.size),
        "checkpoints_per_request": float(r["checkpoints_stored"].mean()),
        "tokens_saved_pct": 100.0 * float(resumes.sum()) / float(lengths.sum()),
        "hit_rate_pct": 100.0 * float(r["hit"].mean()),
        "measured_s": measured,
        "mean_request_ms": 1e3 * measured / lengths.size,
        "speedup": speedup,
        "token_ideal_x": token_ideal(lengths, resumes),
        "step_ideal_x": None if step_tokens is None else step_ideal(lengths, resumes, step_tokens),
        "ideal_speedup": ideal,
        "pct_of_ideal": None if speedup is None or ideal is None else 100.0 * speedup / ideal,
        "engine_overhead_pct": 100.0 * (1.0 - prefill_s / float(r["time_s"].sum())),
        "host_ms_per_request": 1e3 * (float(r["time_s"].sum()) - prefill_s) / lengths.size,
        "prefill_pct_of_model": None if modelled_s is None or prefill_s <= 0 else 100.0 * modelled_s / prefill_s,
        "warm_s": timing.warm_s,
        "setup_s": timing.setup_s,
        "compiles_during_measurement": timing.compiles,
        "simulator_mismatches": timing.simulator_mismatches,
    }


@dataclasses.dataclass(frozen=True)
class PooledPolicy:
    """A policy's replays over the rounds of a run, pooled.

    Attributes:
      timing: a `PolicyTiming` whose records are the pooled rounds' records one after the other (plus
        ``round``: each request's round), with their warm and setup seconds, compilations and
        mismatches summed (the timing's round: how many rounds).
      baseline_s: the no-cache seconds summed over the rounds this policy completed (None: no no-cache
        run in any of them).
      speedup_per_round: each of those rounds' no-cache seconds over this policy's, in round order.
    """

    timing: PolicyTiming
    baseline_s: float | None
    speedup_per_round: tuple[float, ...]


def _sum_or_none(values: Sequence[int | None]) -> int | None:
    return None if any(v is None for v in values) else int(sum(values))


def pool_rounds(result: TimedReplay) -> list[PooledPolicy]:
    """Every completed policy, in the order of its first run, pooled over the rounds (`PooledPolicy`).
    A round counts toward a policy's speedup only where both it and the no-cache run completed."""
    baselines = {t.round: t.measured_s for t in result.timings if t.policy == "none"}
    pooled = []
    for policy in dict.fromkeys(t.policy for t in result.timings):
        runs = [t for t in result.timings if t.policy == policy]
        matched = [t for t in runs if t.round in baselines]
        pooled_runs = matched or runs               # no baseline anywhere: pool every run, no speedup
        records = {name: np.concatenate([t.records[name] for t in pooled_runs]) for name in runs[0].records}
        records["round"] = np.concatenate([np.full(t.records["time_s"].size, t.round, np.int64)
                                           for t in pooled_runs])
        timing = PolicyTiming(policy, records, float(sum(t.warm_s for t in pooled_runs)),
                              float(sum(t.setup_s for t in pooled_runs)),
                              _sum_or_none([t.compiles for t in pooled_runs]),
                              _sum_or_none([t.simulator_mismatches for t in pooled_runs]), len(pooled_runs))
        baseline = float(sum(baselines[t.round] for t in matched)) if matched else None
        pooled.append(PooledPolicy(timing, baseline,
                                   tuple(baselines[t.round] / t.measured_s for t in matched)))
    return pooled


def summary_rows(result: TimedReplay, cost: Any = None, step_tokens: int | None = None
                 ) -> list[dict[str, Any]]:
    """`policy_metrics` of every completed policy pooled over the rounds (`pool_rounds`), in the order
    of its first run, with ``rounds`` (how many were pooled) and ``speedup_per_round``."""
    return pooled_rows(pool_rounds(result), cost, step_tokens)


def no_cache_cost(pooled: Sequence[PooledPolicy]) -> Any | None:
    """t(n) = c0 + a n + b n^2 fitted (`costmodel.fit_cost`) to the no-cache run's own requests:
    each measured request's prefill seconds (dispatch + wait) against its length, pooled over the
    rounds. None without a no-cache run or with fewer than 3 distinct lengths.

    A second ideal beside the calibration's: the calibration times bare `model.prefill` calls before
    the replay, and its c0 moves by +-20% from run to run on one machine (fifteenth session); this
    one comes from the Engine's own path in the same minutes as the policies'."""
    from sparse_prefix.experiments.costmodel import fit_cost

    for policy in pooled:
        if policy.timing.policy == "none":
            records = policy.timing.records
            if np.unique(records["length"]).size < 3:
                return None
            return fit_cost(records["length"], records["prefill_s"])
    return None


def pooled_rows(pooled: Sequence[PooledPolicy], cost: Any = None, step_tokens: int | None = None
                ) -> list[dict[str, Any]]:
    """`summary_rows` from `pool_rounds`' output (for callers that also need the pooled records).
    Each row also gets ``ideal_no_cache_fit`` and ``pct_of_no_cache_fit_ideal``: the ideal of
    `no_cache_cost` (None where there is none) and the speedup against it."""
    fit = no_cache_cost(pooled)
    rows = []
    for policy in pooled:
        row = policy_metrics(policy.timing, baseline_s=policy.baseline_s, cost=cost, step_tokens=step_tokens)
        r = policy.timing.records
        ideal = None if fit is None else fit.ideal_speedup(r["length"], r["resume_position"])
        row["ideal_no_cache_fit"] = ideal
        row["pct_of_no_cache_fit_ideal"] = (None if ideal is None or row["speedup"] is None
                                            else 100.0 * row["speedup"] / ideal)
        row["rounds"] = policy.timing.round
        row["speedup_per_round"] = list(policy.speedup_per_round)
        rows.append(row)
    return rows


def step_tokens_of(model: Any) -> int | None:
    """Tokens per prefill step of `model` (C x G) when every call runs whole G-chunk steps, else None
    (a hybrid whose `fit_steps` lets one-chunk calls run narrower programs)."""
    if getattr(model, "fit_steps", "off") != "off":
        return None
    return int(model.chunk_size) * int(getattr(model, "chunks_per_step", 1))


TABLE_HEADER = ("policy", "ckpts/request", "tokens saved %", "hit %", "measured s", "speedup",
                "ideal speedup", "% of ideal", "token ideal", "step bound", "overhead %", "paper speedup")


def table_cells(rows: Sequence[Mapping[str, Any]], paper_speedups: Mapping[str, float] | None = None
                ) -> list[list[str]]:
    """Formatted cells for `TABLE_HEADER` ("-" where a value is unavailable)."""
    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    paper_speedups = paper_speedups or {}
    return [[row["policy"], fmt(row["checkpoints_per_request"], "{:.2f}"), fmt(row["tokens_saved_pct"], "{:.1f}"),
             fmt(row["hit_rate_pct"], "{:.0f}"), fmt(row["measured_s"], "{:.2f}"), fmt(row["speedup"], "{:.2f}x"),
             fmt(row["ideal_speedup"], "{:.2f}x"), fmt(row["pct_of_ideal"], "{:.0f}"),
             fmt(row["token_ideal_x"], "{:.2f}x"), fmt(row.get("step_ideal_x"), "{:.2f}x"),
             fmt(row["engine_overhead_pct"], "{:.1f}"),
             fmt(paper_speedups.get(row["policy"]), "{:.2f}x")] for row in rows]


def records_as_lists(timing: PolicyTiming) -> dict[str, list]:
    """JSON-ready per-request records."""
    return {name: values.tolist() for name, values in timing.records.items()}


if __name__ == "__main__":
    from sparse_prefix.experiments.cli_timed import main

    raise SystemExit(main())
