"""The Engine (public): exact prefix caching in front of any `RecurrentLM`.

    engine = Engine(model, params, policy="ldp:8+fork", eviction="lru", capacity_entries=64)
    result = engine.prefill(tokens)             # last_logits f32[V], stats: RequestStats
    out = engine.generate(tokens, 32)           # and caches prompt + generated for the next turn

Per request (rows of a batch are planned one by one, run as one batch):

  1. `PrefixIndex.plan` finds the longest cached prefix in the request's namespace, lets the Planner
     observe the overlap and choose positions (snapped DOWN to the model's chunk size), and pins the
     resume entry;
  2. `StateStore.restore` gathers the resume checkpoint (and, for hybrids, its KV pages) on device;
  3. `model.prefill` runs only the suffix, emitting states at the planned positions in the same pass;
  4. `PrefixIndex.commit` stores the request as an entry (evicting as needed); the emitted states go to
     the slots it allocated, new KV pages are copied out of the final state; the pin is released.

Every resume point and checkpoint is a multiple of ``model.chunk_size``, so every answer is bitwise
identical to an uncached `model.prefill` at the same batch size. Steps 1-2 and 4 hold the engine's
lock (short host work and asynchronous device dispatch); step 3 runs outside it, so concurrent
callers overlap on the device. The Planner's DP re-solve runs on a background thread.

Host cost of a hit (issue 7). Nothing on the request path waits for the device before the logits:
`restore` hands the model host-side lengths (its checks never wait for the gather), every device
step is one compiled dispatch with one packed index array (gather; prefill; at most one scatter of
states and one of pages), and step 4 runs while the prefill is still computing on the device -- the
request blocks only at the end, on its logits. (That needs a model whose call returns before the
device finishes: the built-in models' static step loop, their default on a GPU; a device-counted
loop returns only at its end on a GPU, and step 4 then adds to the hit.) On a GPU the restore is
traced into the prefill's program by default (`fuse_restore`). What a hit adds to a bare
`model.prefill` is the host time of steps 1-2 (plus the gather's device time where it outlasts the
prefill's own dispatch).

Namespaces isolate tenants: an entry is only ever matched by requests of its own namespace.

What the fixed shapes cost. Every prefill call pads each row's suffix to ``max_length`` tokens and its
checkpoint list to ``min_checkpoint_slots`` slots, or to none when no row stores a state (two programs
per batch size then serve every request storing up to that many states; see `__init__`; a model on
the static step loop cuts the tokens to the steps the call needs and compiles once per step count). A call that
stores nothing allocates and writes no emission buffers (K states per row; one state of mamba2-1.3b
is ~100 MB). The token padding costs bytes, not compute: a call sends B x max_length int32 tokens from
host to device (64 KiB per row at max_length 16384) plus (K + 1) int32 per row, and the chunk loop
stops at the longest real row, so no chunk of padding runs. Nothing else the engine does per request
is O(max_length) on the device: the restore writes only the resume entry's KV pages into dense KV
buffers recycled from an earlier request of the same batch size (`StateStore.recycle`: no allocation,
zero-fill or copy of max_length positions), page writes copy only the new pages, slots move whole
states. Two limits outside the engine: XLA on CPU widens any write into a bf16 buffer to f32 over the
whole buffer (float32 models are O(pages) there, every dtype on GPU), and a model's own prefill may
be O(max_length) (e.g. attention that reads its whole KV buffer densely).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from sparse_prefix.index import PrefixIndex, RequestPlan
from sparse_prefix.planner import Planner
from sparse_prefix.protocol import FusablePrefill, State
from sparse_prefix.request_checks import split_requests
from sparse_prefix.sampling import Sampling, sample
from sparse_prefix.store import (CacheLayout, Packing, PoolExhausted, StateStore, abstract_state_of,
                                 gather_state, plan_layout, state_bytes)


@dataclasses.dataclass(frozen=True)
class RequestStats:
    """What one request cost and stored.

    Attributes:
      overlap_depth: tokens shared with the resume entry (0 on a miss).
      resume_position: where the prefill started (a multiple of chunk_size; 0 = from scratch).
      recomputed_tokens: length - resume_position.
      checkpoints_stored: states this request newly stored (0 if its entry was dropped).
      bytes: device bytes newly taken by those states and by new KV pages.
      timings: seconds of the batch the request ran in (host clock): plan (index lookup and
        planning), restore (the gather's host work and dispatch), dispatch (`model.prefill` until it
        returned: its host checks and dispatch), commit (index commit, store scatters' dispatch,
        KV recycling; it overlaps the prefill running on the device), wait (blocked until the logits
        were ready), prefill = dispatch + wait, total.
    """

    overlap_depth: int
    resume_position: int
    recomputed_tokens: int
    checkpoints_stored: int
    bytes: int
    timings: Mapping[str, float]


class PrefillResult(NamedTuple):
    """last_logits: f32[V] for one request, f32[B, V] for a batch; stats: RequestStats (or a tuple)."""

    last_logits: jax.Array
    stats: RequestStats | tuple[RequestStats, ...]


class GenerateResult(NamedTuple):
    """tokens: int32[n] generated; prompt: stats of the prompt's prefill; cached: stats of the prefill
    that cached prompt + generated (resumed from the prompt's checkpoints)."""

    tokens: np.ndarray
    prompt: RequestStats
    cached: RequestStats


class _EndPlanner:
    """A planner view that also places a checkpoint at the request's end (snapped by the index).

    Used by `generate`, whose sequences are turns a chat resumes at their end; `observe=False` keeps the
    internal re-prefill of prompt + generated tokens out of the overlap histogram."""

    def __init__(self, planner: Planner, observe: bool):
        self._planner, self._observe = planner, observe

    def observe(self, overlap: int, length: int) -> None:
        if self._observe:
            self._planner.observe(overlap, length)

    def positions(self, length: int, overlap: int | None = None, hints=()) -> np.ndarray:
        planned = self._planner.positions(length, overlap, hints)
        return np.union1d(planned, [length]).astype(np.int64)


def serving_params(model: Any, params: Any) -> Any:
    """`params` in the layout the Engine serves with: `model.prepare_params(params)` where the model
    has it (Mamba2: per-layer weights, no per-call slicing), else `params` as they are."""
    prepare = getattr(model, "prepare_params", None)
    return prepare(params) if callable(prepare) else params


@functools.lru_cache(maxsize=64)
def _fused_program(prefill: Any, slab_packing: Packing, pool_packing: Packing | None, batch: int,
                   compiler_options: tuple = ()):
    """One jitted program per (model program, store layout, batch size), shared by every engine of an
    equal model: the store's gather, then the model's prefill program (`FusablePrefill`); the scratch
    KV (argument 3) is donated and comes back as the final KV."""

    def run(params, slabs, pools, scratch, packed, resumed, tokens, checkpoints, lengths):
        recurrent, kv = gather_state(slabs, pools, scratch, packed, batch, slab_packing, pool_packing)
        state = State(recurrent=recurrent, kv=kv, length=resumed)
        return prefill(params, tokens, state, checkpoints, lengths)

    return jax.jit(run, donate_argnums=3, compiler_options=dict(compiler_options) or None)


@jax.jit
def _first_row(logits: jax.Array) -> jax.Array:
    """logits[0] as one compiled dispatch (an eager index costs ~0.5 ms of Python on the hit path)."""
    return logits[0]


def _checked_layout(layout: Any, model: Any, capacity_bytes: int | None) -> CacheLayout:
    """`layout` if an Engine of `model` can allocate it (see `Engine`'s `layout`), else an error."""
    if not isinstance(layout, CacheLayout):
        raise TypeError(f"layout must be a CacheLayout (e.g. from Engine.abstract), got {type(layout).__name__}")
    if capacity_bytes is not None:
        raise ValueError("give either layout or capacity_bytes, not both (a layout fixes the bytes)")
    slot_bytes, page_bytes = state_bytes(model)
    if (layout.slot_bytes, layout.page_bytes) != (slot_bytes, page_bytes):
        raise ValueError(f"layout is for another model: slot / page bytes {layout.slot_bytes} / "
                         f"{layout.page_bytes}, this model's {slot_bytes} / {page_bytes}")
    if layout.num_slots < 1 or layout.num_pages < (1 if page_bytes else 0):
        raise ValueError(f"layout holds no checkpoint{' or no KV page' if page_bytes else ''}: "
                         f"{layout.num_slots} slots, {layout.num_pages} pages")
    return layout


def _pow2(count: int) -> int:
    return 1 << max(0, int(count) - 1).bit_length()


class Engine:
    """Serves prefill and generation from an exact, sparse prefix cache (public; thread-safe).

    Args:
      model: a `RecurrentLM` (with ``abstract_state`` / ``memory_profile`` when it offers them).
      params: its parameters; a model with ``prepare_params`` (Mamba2: per-layer weights, no
        per-call copies) has them prepared once here -- a copy when the layout changes, so drop
        the caller's set if memory is tight.
      policy: the Planner spec (positions are snapped down to ``model.chunk_size``).
      eviction: ``lru``, ``fifo`` or ``utility`` (the index's policies).
      capacity_entries: the most cached requests.
      capacity_bytes: a device-memory budget for slots and KV pages (None: sized so that
        `capacity_entries` entries always fit). KV pages that run short evict entries.
      namespace: the default namespace of requests (a string, or None for the shared default).
      max_hints: hints per request the slot budget allows for (``+hints`` policies).
      background_resolve: re-solve the DP on a background thread (False: inline, deterministic).
      min_checkpoint_slots: checkpoint lists are padded to a power of two at least this large, so
        requests storing 1 to that many states share one compilation (and those storing none
        another, with no emission buffers: at most two programs per batch size).
      layout: an explicit `CacheLayout` to allocate instead of sizing one from `policy`,
        `capacity_entries` and `capacity_bytes` (e.g. ``Engine.abstract`` of the policy that stores
        the most): engines of one model with equal layouts share every compiled program (the fused
        prefill, the store's gather and scatters), whatever their policies. Its slot and page bytes
        must be this model's; with fewer slots than `capacity_entries` entries of this policy need,
        the index evicts by slots as under `capacity_bytes`. Not combined with `capacity_bytes`.
      fuse_restore: for a model with `FusablePrefill` (the built-in ones), gather the resumed state
        out of the store inside the prefill's program: one dispatch per request, no restored State
        returned to Python as one array per leaf (less host time per hit), at the price of one
        prefill compilation per store shape (engines of other capacities do not share it). "auto"
        (default): fused on a GPU (measured faster there, BENCHMARKS.md), separate elsewhere (where
        the extra compilations cost more than the dispatch saves). False: `store.restore`, then
        `model.prefill`.
      planner_options / index_options: extra `Planner` / `PrefixIndex` keyword arguments.
    """

    def __init__(self, model: Any, params: Any, *, policy: str = "ldp:8+fork", eviction: str = "lru",
                 capacity_entries: int = 64, capacity_bytes: int | None = None,
                 namespace: str | None = None, max_hints: int = 4, background_resolve: bool = True,
                 min_checkpoint_slots: int = 8, fuse_restore: bool | str = "auto",
                 layout: CacheLayout | None = None, planner_options: Mapping[str, Any] | None = None,
                 index_options: Mapping[str, Any] | None = None):
        _check_namespace(namespace)
        if isinstance(min_checkpoint_slots, bool) or not isinstance(min_checkpoint_slots, int) \
                or min_checkpoint_slots < 1:
            raise ValueError(f"min_checkpoint_slots must be an int >= 1, got {min_checkpoint_slots!r}")
        self.model, self.params = model, serving_params(model, params)
        self.policy, self.eviction, self.namespace = policy, eviction, namespace
        self.chunk_size = int(model.chunk_size)
        if layout is None:
            self.layout = self.abstract(model, policy=policy, capacity_entries=capacity_entries,
                                        capacity_bytes=capacity_bytes, max_hints=max_hints)
        else:
            self.layout = _checked_layout(layout, model, capacity_bytes)
        # Calls pad tokens to max_length (bytes, not compute: see the module docstring) and
        # checkpoint lists to 0 (nothing stored) or a power of two >= min_checkpoint_slots: two
        # compilations per batch size (and per step count, on a static step loop) serve almost
        # every request.
        self._k_bucket = _pow2(min_checkpoint_slots)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="sparse-prefix-dp") \
            if background_resolve else None      # starts no thread before the first re-solve
        self._planner_options = {"max_length": int(model.max_length), **dict(planner_options or {})}
        self._index_options = {"capacity_entries": capacity_entries, "eviction": eviction,
                               **dict(index_options or {})}
        self._lock = threading.RLock()
        self._reset_host()                       # validates the policy, eviction and options
        self.store = StateStore(abstract_state_of(model), num_slots=self.layout.num_slots,
                                page_size=self.chunk_size, num_pages=self.layout.num_pages)
        if not isinstance(fuse_restore, bool) and fuse_restore != "auto":
            raise TypeError(f"fuse_restore must be a bool or 'auto', got {fuse_restore!r}")
        if fuse_restore == "auto":
            fuse_restore = jax.default_backend() == "gpu"
        self.fused = fuse_restore and isinstance(model, FusablePrefill)
        self._fused_programs: dict[int, tuple] = {}     # batch -> (slab packing, pool packing, program)

    # ------------------------------------------------------------------ sizing

    @staticmethod
    def abstract(model: Any, *, policy: str = "ldp:8+fork", capacity_entries: int = 64,
                 capacity_bytes: int | None = None, max_hints: int = 4) -> CacheLayout:
        """The cache layout an Engine with these arguments allocates (nothing is allocated here)."""
        return plan_layout(model, policy=policy, capacity_entries=capacity_entries,
                           capacity_bytes=capacity_bytes, max_hints=max_hints)

    def _reset_host(self) -> None:
        """A fresh planner, index and counters (the cache becomes empty)."""
        self.planner = Planner(self.policy, grid=self.chunk_size, executor=self._executor,
                               **self._planner_options)
        self.index = PrefixIndex(capacity_slots=self.layout.num_slots, grid=self.chunk_size,
                                 capture="one-pass", **self._index_options)
        self._counters = dict(requests=0, hits=0, tokens=0, recomputed_tokens=0, overlap_tokens=0,
                              checkpoints_stored=0, page_evictions=0, dropped=0)

    def clear(self) -> None:
        """Empty the cache (entries, states, pages, histograms, counters). Not during requests."""
        with self._lock:
            self._require_idle("clear")
            self._reset_host()
            self.store.reset()

    def close(self) -> None:
        """Stop the background re-solve thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _require_idle(self, verb: str) -> None:
        if self.index.stats()["open_plans"]:
            raise RuntimeError(f"cannot {verb} the cache while requests are in flight")

    def save(self, path: Any) -> Any:
        """Snapshot the whole cache under folder `path` for a warm restart (see `sparse_prefix.persist`)."""
        from sparse_prefix.persist import save_engine
        return save_engine(self, path)

    def load(self, path: Any) -> None:
        """Replace the cache by the snapshot under `path`; on any problem raise `SnapshotError` and leave
        the cache empty and working (never half-loaded or foreign)."""
        from sparse_prefix.persist import load_engine
        load_engine(self, path)

    # ------------------------------------------------------------------ input checks

    def _requests(self, tokens: Any, hints: Any) -> tuple[list[np.ndarray], list[tuple[int, ...]], bool]:
        return split_requests(tokens, hints, vocab_size=self.model.vocab_size,
                              max_length=self.model.max_length)

    # ------------------------------------------------------------------ the request path

    def prefill(self, tokens: Any, hints: Any = (), *, namespace: str | None = None) -> PrefillResult:
        """Prefill one request (int[L]) or a batch (a list of int[L_b], or int[B, L]) from the cache.

        Args:
          tokens: token ids in 0..V-1, 1..max_length of them per request.
          hints: positions in 1..L suggested for checkpoints (``+hints`` policies); for a batch, ()
            or one sequence per row.
          namespace: overrides the engine's default namespace for this call.

        Returns:
          `PrefillResult`: logits at each request's last token (bitwise equal to an uncached prefill
          at the same batch size) and its `RequestStats`.
        """
        rows, per_row_hints, batch = self._requests(tokens, hints)
        logits, _, stats = self._run(rows, per_row_hints, self._namespace(namespace), self.planner,
                                     first_row=not batch)
        return PrefillResult(logits, tuple(stats)) if batch else PrefillResult(logits, stats[0])

    def _namespace(self, namespace: str | None) -> str | None:
        _check_namespace(namespace)
        return self.namespace if namespace is None else namespace

    def _run(self, rows: list[np.ndarray], hints: list[tuple[int, ...]], group: str | None,
             planner: Any, keep_final: bool = False, first_row: bool = False
             ) -> tuple[jax.Array, State | None, list[RequestStats]]:
        """Plan, restore, prefill and commit a validated batch; returns (logits [B, V], final, stats).

        Unless `keep_final`, the final state's KV goes back to the store as scratch for the next
        restore (and None is returned in its place). With `first_row` the logits returned are row 0's
        [V], cut by a kernel queued right behind the prefill -- before the commit's writes, which the
        device runs in order after it: cut afterwards, the answer waited for the store's writes
        (~0.9 ms of a 16 ms 98%-overlap hit of qwen3.5-0.8b on an H200)."""
        start = time.perf_counter()
        plans: list[RequestPlan] = []
        with self._lock:
            try:
                for row, row_hints in zip(rows, hints):
                    plans.append(self.index.plan(row, group=group, hints=row_hints, planner=planner,
                                                 pin=True, validated=True))
                planned = time.perf_counter()
                state = None if self.fused else self._restore(plans)
            except BaseException:
                for plan in plans:
                    self.index.abort(plan)
                raise
        restored = time.perf_counter()
        try:
            if self.fused:                      # the gather runs inside the prefill's program
                logits, final, emitted = self._fused_call(*self._restore_args(plans),
                                                          *self._prefill_args(plans))
            else:
                logits, final, emitted = self._prefill(plans, state)
            if first_row:
                logits = _first_row(logits)
        except BaseException:
            with self._lock:
                for plan in plans:
                    self.index.abort(plan)
            raise
        dispatched = time.perf_counter()
        # The commit's host work and its scatters' dispatch overlap the prefill on the device (the
        # scatters read the emitted states, so the device orders them after it).
        with self._lock:
            stored = self._commit(plans, final, emitted)
        if not keep_final:
            self.store.recycle(final.kv)
            final = None
        committed = time.perf_counter()
        try:
            logits = jax.block_until_ready(logits)
        except BaseException:                  # the device failed after the commit: states unwritten
            with self._lock:
                self._reset_host()
                self.store.reset()
            raise
        done = time.perf_counter()
        timings = {"plan": planned - start, "restore": restored - planned, "dispatch": dispatched - restored,
                   "commit": committed - dispatched, "wait": done - committed,
                   "prefill": (dispatched - restored) + (done - committed), "total": done - start}
        stats = [RequestStats(overlap_depth=plan.overlap, resume_position=plan.resume_position,
                              recomputed_tokens=plan.recomputed_tokens, checkpoints_stored=count,
                              bytes=size, timings=timings)
                 for plan, (count, size) in zip(plans, stored)]
        return logits, final, stats

    def _restore_args(self, plans: list[RequestPlan]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(slots int32[B] (-1: a miss), resume lengths int32[B], page table int32[B, P] or None)."""
        slots = np.array([plan.resume_slot if plan.resume_position > 0 else -1 for plan in plans], np.int32)
        lengths = np.array([plan.resume_position for plan in plans], np.int32)
        table = None
        if self.store.has_kv:
            table = np.full((len(plans), self.store.pages_per_sequence), -1, np.int32)
            for b, plan in enumerate(plans):
                used = plan.resume_position // self.chunk_size
                if used:
                    table[b, :used] = plan.match_payload[:used]
        return slots, lengths, table

    def _restore(self, plans: list[RequestPlan]) -> State:
        """The batch state to resume from (zero rows for misses), gathered on device."""
        return self.store.restore(*self._restore_args(plans))

    def _prefill_args(self, plans: list[RequestPlan]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens int32[B, max_length], checkpoints int32[B, K], lengths int32[B]) of every row's
        suffix, checkpoints relative to its resume point."""
        batch = len(plans)
        emits = max(len(plan.emit_positions) for plan in plans)
        tokens = np.zeros((batch, self.model.max_length), np.int32)   # one shape: see __init__
        lengths = np.zeros((batch,), np.int32)
        checkpoints = np.zeros((batch, self._checkpoint_width(emits)), np.int32)
        for b, plan in enumerate(plans):
            start = plan.resume_position
            tokens[b, :plan.length - start] = plan.tokens[start:]
            lengths[b] = plan.length - start
            checkpoints[b, :len(plan.emit_positions)] = np.asarray(plan.emit_positions) - start
        return tokens, checkpoints, lengths

    def _prefill(self, plans: list[RequestPlan], state: State):
        """model.prefill on every row's suffix, emitting at positions relative to its resume point."""
        tokens, checkpoints, lengths = self._prefill_args(plans)
        return self.model.prefill(self.params, tokens, state, checkpoints, lengths)

    def _fused_call(self, slots, resumed, table, tokens, checkpoints, lengths):
        """Restore + prefill as one dispatch: (logits, final, emitted) like `model.prefill`, the
        emitted leaves with the model's padded K (slots past the requested ones are padding)."""
        tokens, checkpoints, lengths = self.model.prepare_prefill(tokens, checkpoints, lengths, resumed)
        slab, pool = self.store.slab_packing, self.store.pool_packing
        known = self._fused_programs.get(len(slots))    # skips hashing the packings on every request
        if known is None or known[0] is not slab or known[1] is not pool:
            known = (slab, pool, _fused_program(self.model.prefill_program, slab, pool, len(slots),
                                                tuple(getattr(self.model, "prefill_compiler_options", ()))))
            self._fused_programs[len(slots)] = known
        program = known[2]
        with self.store.gather_inputs(slots, table) as inputs:
            return program(self.params, *inputs, resumed, tokens, checkpoints, lengths)

    def _checkpoint_width(self, emits: int) -> int:
        """K of a call whose rows emit at most `emits` states: 0 when none does (the model allocates
        no emission buffers), else a power of two >= min_checkpoint_slots."""
        return 0 if emits == 0 else max(self._k_bucket, _pow2(emits))

    def _commit(self, plans: list[RequestPlan], final: State, emitted) -> list[tuple[int, int]]:
        """Commit every row, then write all new states and pages at once. Holds the engine lock.

        Returns per row (states stored, bytes taken). If anything fails after the first commit, the
        open plans are aborted and the whole cache is dropped: the index may list entries whose
        states were never written, and serving one of them would be a wrong answer.
        """
        try:
            return self._commit_rows(plans, final, emitted)
        except BaseException:
            for plan in plans:
                try:
                    self.index.abort(plan)
                except ValueError:                         # already committed or aborted
                    pass
            self._reset_host()
            self.store.reset()
            raise

    def _commit_rows(self, plans: list[RequestPlan], final: State, emitted) -> list[tuple[int, int]]:
        slot_writes: dict[int, tuple[int, int]] = {}     # slot -> (row, k); later commits win
        page_writes: dict[int, tuple[int, int]] = {}     # page -> (row, page index in the sequence)
        stored = []
        for b, plan in enumerate(plans):
            self._count(plan)
            shared, fresh = self._pages_for(plan)
            if fresh is None:                              # KV pool exhausted even after evicting
                self.index.abort(plan)
                self.store.release_pages(shared)
                self._counters["dropped"] += 1
                stored.append((0, 0))
                continue
            result = self.index.commit(plan, payload=tuple(int(p) for p in (*shared, *fresh)))
            for victim in result.evicted:
                self.store.release_pages(victim.payload)
            if result.entry_id is None:
                self.store.release_pages(np.concatenate([shared, fresh]))
                self._counters["dropped"] += 1
                stored.append((0, 0))
                continue
            for k, slot in enumerate(result.slots):
                slot_writes[int(slot)] = (b, k)
            for i, page in enumerate(fresh):
                page_writes[int(page)] = (b, shared.size + i)
            stored.append((len(result.slots), len(result.slots) * self.layout.slot_bytes
                           + len(fresh) * self.layout.page_bytes))
            self._counters["checkpoints_stored"] += len(result.slots)
        if slot_writes:
            (rows, ks), slots = zip(*slot_writes.values()), list(slot_writes)
            self.store.insert(emitted, rows, ks, slots)
        if page_writes:
            (rows, seq_pages), pages = zip(*page_writes.values()), list(page_writes)
            self.store.write_pages(final.kv, rows, seq_pages, pages)
        return stored

    def _count(self, plan: RequestPlan) -> None:
        counters = self._counters
        counters["requests"] += 1
        counters["hits"] += int(plan.hit)
        counters["tokens"] += plan.length
        counters["recomputed_tokens"] += plan.recomputed_tokens
        counters["overlap_tokens"] += plan.overlap

    def _pages_for(self, plan: RequestPlan) -> tuple[np.ndarray, np.ndarray | None]:
        """(pages shared with the resume entry, retained; fresh pages allocated) for a new entry.

        An entry keeps KV for its tokens up to its deepest checkpoint. Full pages inside the common
        prefix with the resume entry are shared; the rest are copied from this request's final state.
        Fresh is None when the pool cannot provide them even after evicting every unpinned entry.
        """
        empty = np.zeros((0,), np.int32)
        if not self.store.has_kv:
            return empty, empty
        deepest = max([p for p, _ in plan.inherited] + [int(p) for p in plan.emit_positions], default=0)
        needed = deepest // self.chunk_size
        shared = empty
        if plan.match is not None:
            count = min(plan.overlap // self.chunk_size, needed, len(plan.match_payload))
            shared = np.asarray(plan.match_payload[:count], np.int32)
            self.store.retain_pages(shared)
        while True:
            try:
                return shared, self.store.allocate_pages(needed - shared.size)
            except PoolExhausted:
                victim = self.index.evict()
                if victim is None:
                    return shared, None
                self.store.release_pages(victim.payload)
                self._counters["page_evictions"] += 1

    # ------------------------------------------------------------------ generation

    def generate(self, tokens: Any, max_new_tokens: int, sampling: Sampling | None = None, *,
                 hints: Any = (), namespace: str | None = None,
                 stop_tokens: Sequence[int] = ()) -> GenerateResult:
        """Prefill a prompt from the cache, decode up to `max_new_tokens`, and cache the whole turn.

        The prompt and prompt + generated tokens each get a checkpoint at their end (snapped down to
        the chunk size), so the next turn of a conversation resumes close to where this one stopped.
        The turn's states are computed by prefill (bitwise equal to an uncached prefill of the same
        tokens), not taken from the decode loop.

        Args:
          tokens: the prompt, int[L].  max_new_tokens: >= 1, with L + max_new_tokens <= max_length.
          sampling: `Sampling` (default greedy).  hints / namespace: as in `prefill`.
          stop_tokens: generation ends after emitting any of these.

        Returns:
          `GenerateResult` (the generated ids and the two prefills' stats).
        """
        rows, per_row_hints, batch = self._requests(tokens, hints)
        if batch:
            raise ValueError("generate takes one prompt (int[L]), not a batch")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if rows[0].size + max_new_tokens > self.model.max_length:
            raise ValueError(f"prompt of {rows[0].size} tokens + max_new_tokens {max_new_tokens} exceeds "
                             f"max_length {self.model.max_length}")
        sampling = Sampling() if sampling is None else sampling
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        if any(not 0 <= int(t) < self.model.vocab_size for t in sampling.banned):
            raise ValueError(f"sampling.banned ids must lie in 0..{self.model.vocab_size - 1}, "
                             f"got {list(sampling.banned)}")
        group = self._namespace(namespace)
        logits, state, prompt_stats = self._run(rows, per_row_hints, group, _EndPlanner(self.planner, True),
                                                keep_final=True)
        rng = np.random.default_rng(sampling.seed)
        stops = {int(t) for t in stop_tokens}
        generated: list[int] = []
        for step in range(max_new_tokens):
            token = sample(np.asarray(logits[0], np.float64), sampling, rng)
            generated.append(token)
            if token in stops or step + 1 == max_new_tokens:
                break
            logits, state = self.model.decode(self.params, np.asarray([token], np.int32), state)
        turn = np.concatenate([rows[0], np.asarray(generated, np.int32)])
        _, _, cached_stats = self._run([turn], [per_row_hints[0]], group, _EndPlanner(self.planner, False))
        return GenerateResult(np.asarray(generated, np.int32), prompt_stats[0], cached_stats[0])

    # ------------------------------------------------------------------ compilation and statistics

    def warmup(self, batch_sizes: Sequence[int] = (1,), *, max_tokens: int | None = None) -> int:
        """Compile the prefill and store programs requests of these batch sizes use, ahead of traffic.

        Every call pads tokens to max_length and checkpoints to 0 slots (a request storing nothing)
        or `min_checkpoint_slots` (see `__init__`), so two programs per batch size serve every request
        storing that few states; both are compiled here, and those of a one-chunk suffix where the
        model gives it a width of its own (`HybridLM.fit_steps`). A model on the static step loop
        (`step_loop`, the default on a GPU) compiles once per step count as well: every count a
        suffix of up to `max_tokens` tokens (default max_length) takes is compiled here.

        Returns:
          The number of batch sizes prepared.
        """
        width = self.chunk_size * int(getattr(self.model, "chunks_per_step", 1) or 1)
        top = int(self.model.max_length if max_tokens is None else max_tokens)
        if isinstance(max_tokens, bool) or not 1 <= top <= self.model.max_length:
            raise ValueError(f"max_tokens must be an int in 1..{self.model.max_length}, got {max_tokens!r}")
        static = getattr(self.model, "step_loop", "dynamic") == "static"
        # a one-chunk suffix has a width of its own where the model runs it as one chunk (`fit_steps`)
        suffixes = [min(self.chunk_size, top), min(2 * self.chunk_size, top)]
        if static:
            suffixes += [min(steps * width, top) for steps in range(1, -(-top // width) + 1)]
        suffixes = sorted(set(suffixes))
        for batch in batch_sizes:
            if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
                raise ValueError(f"batch_sizes must be ints >= 1, got {batch!r}")
            if not self.fused:
                self.store.compile_restore(int(batch))
            first = min(self.chunk_size, self.model.max_length)
            for length in suffixes:
                for slots in (0, self._k_bucket):
                    self._warm_call(int(batch), length, slots, first)
        return len(batch_sizes)

    def _warm_call(self, batch: int, length: int, slots: int, first: int) -> None:
        """One miss of `batch` rows of `length` tokens with `slots` checkpoint slots (one at `first`)."""
        tokens = np.zeros((batch, self.model.max_length), np.int32)
        checkpoints = np.zeros((batch, slots), np.int32)
        checkpoints[:, :1] = min(first, length)
        lengths = np.full((batch,), length, np.int32)
        misses, zeros = np.full((batch,), -1, np.int32), np.zeros((batch,), np.int32)
        if self.fused:     # the page-table bucket of a miss (a hit's may compile later)
            _, final, emitted = self._fused_call(misses, zeros, None, tokens, checkpoints, lengths)
        else:
            state = self.store.restore(misses, zeros)
            _, final, emitted = self.model.prefill(self.params, tokens, state, checkpoints, lengths)
        if slots:
            self.store.compile_for(emitted, final.kv)
        self.store.recycle(final.kv)

    def stats(self) -> dict[str, float]:
        """Hit rate, token savings, resident and allocated bytes, entries, evictions, drops."""
        with self._lock:
            counters = dict(self._counters)
            index = self.index.stats()
            pages = self.store.pages_in_use
        requests = max(counters["requests"], 1)
        resident = index["resident_states"] * self.layout.slot_bytes + pages * self.layout.page_bytes
        return {**counters, "hit_rate": counters["hits"] / requests,
                "saved_fraction": 1.0 - counters["recomputed_tokens"] / max(counters["tokens"], 1),
                "entries": index["entries"], "resident_states": index["resident_states"],
                "pages_in_use": pages, "resident_bytes": resident,
                "allocated_bytes": self.layout.allocated_bytes,
                "evictions": index["evictions"], "in_flight": index["open_plans"]}


def _check_namespace(namespace: Any) -> None:
    if namespace is not None and not isinstance(namespace, str):
        raise TypeError(f"namespace must be a string or None, got {type(namespace).__name__}")
