"""PrefixIndex: the host-side cache index shared by the simulator and the engine (plain Python/NumPy).

It keeps retained entries (a request's tokens, its checkpoints ``(position, slot)``, an opaque payload),
finds the exact token-level longest common prefix (LCP) of a new request with the entries of its group,
picks the resume entry, and turns a Planner's positions into a `RequestPlan`; `commit` inserts the
request as a new entry, allocates state slots, refcounts shared ones and evicts.

Keys (`sparse_prefix.prefix_trie`). Each group has a trie of token blocks whose children are keyed
by a chained prefix hash ``hash_fn(block)`` under their parent; every probe is VERIFIED against the
tokens, so a hash collision (tests inject ``hash_fn``) costs time, never a false hit. A lookup costs
O(L) (at most L / block_size probes), not O(entries x L).

Resume choice (DESIGN's replay protocol): among all checkpoints (entry e, position c) with c <=
min(LCP_e, L - 1), take the deepest; among its holders, the one with the largest LCP_e; ties go to the
newest entry. Without any usable checkpoint the resume entry is the newest entry of maximal LCP (resume
position 0). The observed overlap is the resume entry's LCP (0 on a miss); ``lcp`` is the group's max.

Capture modes (docs/ARCHITECTURE.md): ``one-pass`` (the engine): positions <= the resume position can't
be emitted; the resume entry's checkpoints at positions <= min(LCP, L) are inherited by reference
(slot refcounts). ``separate`` (the paper's protocol): every planned position is a new state.

Capacity. ``capacity_entries`` bounds entries, ``capacity_slots`` (optional) distinct resident states;
slot ids are 0..capacity_slots-1 then (the engine's slab rows). `commit` evicts unpinned entries in
policy order (``fifo``, ``lru``, ``utility``) until the new entry fits. If it can't fit even after
evicting every unpinned entry, the new entry is DROPPED: nothing is evicted, no slot is allocated, and
`CommitResult.entry_id` is None (the engine then simply does not store the request). If a plan's resume
entry was evicted before its commit (it was not pinned), its inherited states are not attached.

State export (public, versioned; layout in `sparse_prefix.index_state`): `state_dict()` returns the
configuration, every entry (tokens, group, checkpoints, payload, recency) in eviction order and the
counters; `load_state_dict(state)` validates all of it and replaces the index's contents at once, so a
loaded index answers every later plan / commit exactly like the saved one (same entry ids, slot
allocation order and tie-breaking).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import numbers
import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, NamedTuple

import numpy as np

from sparse_prefix.histogram import check_int
from sparse_prefix.index_state import SavedIndex, export_index, parse_index_state
from sparse_prefix.planner import snap_positions
from sparse_prefix.prefix_trie import PrefixTrie

_INT32_MAX = int(np.iinfo(np.int32).max)
EVICTION_POLICIES = ("fifo", "lru", "utility")
CAPTURE_MODES = ("one-pass", "separate")
_INDEX_IDS = itertools.count()  # tells plans of different indexes apart


def _as_tokens(tokens: Any) -> np.ndarray:
    array = np.array(tokens, copy=True)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"tokens: expected a non-empty 1-D sequence, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"tokens: expected integer token ids, got dtype {array.dtype}")
    if array.min() < 0 or array.max() > _INT32_MAX:
        raise ValueError(f"tokens: ids must lie in 0..{_INT32_MAX}, got min {array.min()}, "
                         f"max {array.max()}")
    array = array.astype(np.int32)
    array.flags.writeable = False
    return array


@dataclasses.dataclass(eq=False)
class _Entry:
    entry_id: int
    group: Hashable
    tokens: np.ndarray
    checkpoints: tuple[tuple[int, int], ...]
    payload: Any
    created: int
    last_used: int
    pins: int = 0


@dataclasses.dataclass(frozen=True)
class EntryInfo:
    """A read-only view of an entry (for `PrefixIndex.entries` and custom utility functions)."""

    entry_id: int
    group: Hashable
    length: int
    checkpoints: tuple[tuple[int, int], ...]
    created: int
    last_used: int
    pins: int


@dataclasses.dataclass(frozen=True, eq=False)
class RequestPlan:
    """What `PrefixIndex.plan` decided for one request (commit or abort it exactly once).

    Attributes:
      tokens: int32[L], read-only. length: L. group: its group.
      match: the resume entry's id, or None on a miss. match_payload: that entry's payload.
      overlap: the resume entry's LCP with the request (0 on a miss); what the planner observed.
      lcp: the longest common prefix with any retained entry of the group.
      hit: overlap > 0.
      resume_position: deepest usable checkpoint (<= min(overlap, L - 1)); 0 = from scratch.
      resume_slot: its slot, or None.
      positions: int64[k], the planner's positions (snapped to the index grid).
      emit_positions: int64[e], the positions this request stores as new states (sorted).
      inherited: ((position, slot), ...) shared from the resume entry (one-pass capture only).
      recomputed_tokens: L - resume_position.
      pinned: whether the resume entry is pinned until commit/abort.
    """

    tokens: np.ndarray = dataclasses.field(repr=False)
    length: int
    group: Hashable
    match: int | None
    match_payload: Any = dataclasses.field(repr=False)
    overlap: int
    lcp: int
    hit: bool
    resume_position: int
    resume_slot: int | None
    positions: np.ndarray
    emit_positions: np.ndarray
    inherited: tuple[tuple[int, int], ...]
    recomputed_tokens: int
    pinned: bool
    serial: int = dataclasses.field(repr=False)
    index_id: int = dataclasses.field(repr=False)


class EvictedEntry(NamedTuple):
    entry_id: int
    payload: Any


class CommitResult(NamedTuple):
    """entry_id: the new entry (None if dropped: see the module doc); slots: one per emit position;
    evicted: entries evicted by this commit; freed_slots: slots whose refcount reached 0 (a freed slot
    may be re-allocated within the same commit, so it can also appear in ``slots``)."""

    entry_id: int | None
    slots: tuple[int, ...]
    evicted: tuple[EvictedEntry, ...]
    freed_slots: tuple[int, ...]


class PrefixIndex:
    """Retained entries, exact LCP lookup, resume choice, slot refcounts and eviction (thread-safe).

    Args:
      capacity_entries: the most entries retained (>= 1).
      capacity_slots: the most distinct resident states (>= 1), or None for unbounded.
      eviction: ``fifo`` (the paper), ``lru`` or ``utility``.
      grid: planned positions are snapped down to multiples of this (the model's exactness grid).
      capture: ``one-pass`` or ``separate`` (see the module doc).
      hash_fn: block -> hashable key (default: hash of the bytes); collisions are harmless.
      utility_alpha: weight of tokens-saved-per-state against recency for ``utility`` eviction.
      utility_fn: EntryInfo -> float replacing the default efficiency (deepest checkpoint / states).
      block_size: tokens per trie block (>= 1); larger blocks mean fewer nodes per entry, smaller
        ones less token comparison against sibling blocks.
    """

    def __init__(self, *, capacity_entries: int, capacity_slots: int | None = None,
                 eviction: str = "fifo", grid: int = 1, capture: str = "one-pass",
                 hash_fn: Callable[[np.ndarray], Hashable] | None = None,
                 utility_alpha: float = 0.5, utility_fn: Callable[[EntryInfo], float] | None = None,
                 block_size: int = 256):
        self.capacity_entries = check_int("capacity_entries", capacity_entries, minimum=1)
        self.capacity_slots = (None if capacity_slots is None
                               else check_int("capacity_slots", capacity_slots, minimum=1))
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {eviction!r}")
        if capture not in CAPTURE_MODES:
            raise ValueError(f"capture must be one of {CAPTURE_MODES}, got {capture!r}")
        if (isinstance(utility_alpha, bool) or not isinstance(utility_alpha, numbers.Real)
                or not 0.0 <= utility_alpha <= 1.0):
            raise ValueError(f"utility_alpha must be a number in [0, 1], got {utility_alpha!r}")
        for name, fn in (("hash_fn", hash_fn), ("utility_fn", utility_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        self.eviction, self.capture = eviction, capture
        self.grid = check_int("grid", grid, minimum=1)
        self.block_size = check_int("block_size", block_size, minimum=1)
        self.utility_alpha = float(utility_alpha)
        self._utility_fn = utility_fn
        self._lock = threading.RLock()
        self._trie_hash = hash_fn
        self._trie = PrefixTrie(self.block_size, hash_fn)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # fifo: creation order; lru: use order
        self._refcount: dict[int, int] = {}
        self._free_slots: list[int] = list(range(self.capacity_slots or 0))  # a heap
        self._next_slot = self.capacity_slots or 0
        self._next_entry = 0     # the next entry id
        self._clock = 1          # the next recency stamp (creation and use)
        self._serial = itertools.count()
        self._index_id = next(_INDEX_IDS)
        self._open_plans: dict[int, int | None] = {}  # plan serial -> pinned entry id
        self._stats = dict(lookups=0, hits=0, commits=0, evictions=0, dropped=0)

    # ------------------------------------------------------------------------------ plan/commit
    def plan(self, tokens: Any, group: Hashable = None, hints: Iterable[int] = (), planner=None,
             *, pin: bool = False, validated: bool = False) -> RequestPlan:
        """Looks the request up and plans its checkpoints (docs/ARCHITECTURE.md, the request path).

        Calls ``planner.observe(overlap, L)`` BEFORE ``planner.positions(L, overlap, hints)``.

        Args:
          tokens: int[L] token ids (0..2^31-1), L >= 1.
          group: the request's group (hashable); it matches only entries of the same group.
          hints: caller-suggested positions, passed to the planner.
          planner: a `Planner` (or anything with observe/positions); None plans no positions.
          pin: pin the resume entry against eviction until `commit` / `abort`.
          validated: `tokens` is a read-only int32[L] array in range that nobody writes to (the
            Engine's checked rows): kept as it is instead of checked and copied again.

        Returns:
          The `RequestPlan`.
        """
        if not (validated and isinstance(tokens, np.ndarray) and tokens.dtype == np.int32
                and tokens.ndim == 1 and tokens.size and not tokens.flags.writeable):
            tokens = _as_tokens(tokens)
        try:
            hash(group)
        except TypeError:
            raise TypeError(f"group must be hashable, got {type(group).__name__}") from None
        if not isinstance(pin, bool):
            raise TypeError(f"pin must be a bool, got {pin!r}")
        length = int(tokens.size)
        with self._lock:
            match = self._trie.lookup(tokens, group)
            entry = None if match.entry_id is None else self._entries[match.entry_id]
            overlap, lcp, resume, slot = match[1:]
            if planner is None:
                planned = np.zeros(0, dtype=np.int64)
            else:
                planner.observe(overlap, length)
                raw = np.asarray(planner.positions(length, overlap, hints)).reshape(-1)
                values = raw.tolist()
                if values and (raw.dtype.kind not in "iu" or min(values) < 1 or max(values) > length):
                    raise ValueError(f"planner returned positions that are not integers in "
                                     f"1..{length}: {values}")
                planned = snap_positions(raw, self.grid)
            inherited: tuple[tuple[int, int], ...] = ()
            emit = planned
            if self.capture == "one-pass":
                if entry is not None:
                    inherited = tuple(c for c in entry.checkpoints if c[0] <= min(overlap, length))
                above = {p for p, _ in inherited if p > resume}  # at most L, when LCP == L
                emit = np.array([p for p in planned.tolist() if p > resume and p not in above], np.int64)
            self._stats["lookups"] += 1
            self._stats["hits"] += int(overlap > 0)
            serial = next(self._serial)
            pinned = pin and entry is not None
            if pinned:
                entry.pins += 1
            self._open_plans[serial] = entry.entry_id if pinned else None
            return RequestPlan(
                tokens=tokens, length=length, group=group,
                match=None if entry is None else entry.entry_id,
                match_payload=None if entry is None else entry.payload,
                overlap=overlap, lcp=lcp, hit=overlap > 0, resume_position=resume, resume_slot=slot,
                positions=planned, emit_positions=emit, inherited=inherited,
                recomputed_tokens=length - resume, pinned=pinned, serial=serial,
                index_id=self._index_id)

    def _close(self, plan: RequestPlan, verb: str) -> None:
        if not isinstance(plan, RequestPlan):
            raise TypeError(f"plan must be a RequestPlan, got {type(plan).__name__}")
        if plan.index_id != self._index_id:
            raise ValueError(f"cannot {verb} plan #{plan.serial}: it comes from another index")
        if plan.serial not in self._open_plans:
            raise ValueError(f"cannot {verb} plan #{plan.serial}: it was already committed or aborted")
        pinned = self._open_plans.pop(plan.serial)
        if pinned is not None and pinned in self._entries:
            self._entries[pinned].pins -= 1

    def abort(self, plan: RequestPlan) -> None:
        """Forgets a plan without storing anything (unpins its resume entry)."""
        with self._lock:
            self._close(plan, "abort")

    def commit(self, plan: RequestPlan, payload: Any = None) -> CommitResult:
        """Inserts the planned request as a new entry, evicting as needed (see the module doc).

        Args:
          plan: an open plan of this index.
          payload: opaque data kept with the entry (e.g. the engine's KV pages), returned on eviction.

        Returns:
          `CommitResult`; ``slots[i]`` holds the state at ``plan.emit_positions[i]``.
        """
        with self._lock:
            self._close(plan, "commit")
            self._stats["commits"] += 1
            match = self._entries.get(plan.match) if plan.match is not None else None
            inherited = plan.inherited if match is not None else ()
            new_states = len(plan.emit_positions)
            if not self._fits(new_states) and not self._can_fit(new_states,
                                                                [s for _, s in inherited]):
                self._stats["dropped"] += 1
                return CommitResult(None, (), (), ())
            for _, slot in inherited:
                self._refcount[slot] += 1
            if match is not None:
                self._touch(match)  # before evicting: under lru the entry just used is the newest
            evicted, freed = [], []
            while not self._fits(new_states):
                victim = self._victim()
                evicted.append(EvictedEntry(victim.entry_id, victim.payload))
                freed += self._remove(victim)
            slots = tuple(self._allocate() for _ in range(new_states))
            checkpoints = tuple(sorted(
                list(inherited) + [(int(p), s) for p, s in zip(plan.emit_positions, slots)]))
            entry_id = self._insert(plan.tokens, plan.group, checkpoints, payload)
            return CommitResult(entry_id, slots, tuple(evicted), tuple(freed))

    def evict(self) -> EvictedEntry | None:
        """Evicts the policy's next unpinned victim now (e.g. under KV-page pressure).

        Returns:
          The evicted entry (its slots are freed as their refcounts reach 0), or None when no
          entry is unpinned.
        """
        with self._lock:
            if not any(entry.pins == 0 for entry in self._entries.values()):
                return None
            victim = self._victim()
            self._remove(victim)
            return EvictedEntry(victim.entry_id, victim.payload)

    # ------------------------------------------------------------------------ capacity/eviction
    def _fits(self, new_states: int) -> bool:
        if len(self._entries) + 1 > self.capacity_entries:
            return False
        return self.capacity_slots is None or len(self._refcount) + new_states <= self.capacity_slots

    def _can_fit(self, new_states: int, inherited_slots: list[int]) -> bool:
        """Whether evicting every unpinned entry would make room (inherited slots stay resident)."""
        pinned = [e for e in self._entries.values() if e.pins > 0]
        if len(pinned) + 1 > self.capacity_entries:
            return False
        if self.capacity_slots is None:
            return True
        kept = set(inherited_slots).union(*({s for _, s in e.checkpoints} for e in pinned))
        return len(kept) + new_states <= self.capacity_slots

    def _victim(self) -> _Entry:
        if self.eviction != "utility":   # OrderedDict order: creation (fifo) or last use (lru)
            return next(e for e in self._entries.values() if e.pins == 0)
        candidates = [e for e in self._entries.values() if e.pins == 0]
        return min(zip(self._utilities(candidates), (e.entry_id for e in candidates), candidates),
                   key=lambda item: item[:2])[2]

    def _utilities(self, entries: list[_Entry]) -> np.ndarray:
        """alpha * normalised efficiency + (1 - alpha) * normalised recency, per entry."""
        if self._utility_fn is not None:
            efficiency = np.array([float(self._utility_fn(self._info(e))) for e in entries])
        else:
            efficiency = np.array([e.checkpoints[-1][0] / len(e.checkpoints) if e.checkpoints
                                   else 0.0 for e in entries])
        recency = np.array([e.last_used for e in entries], dtype=np.float64)
        span = recency.max() - recency.min()
        recency = (recency - recency.min()) / span if span > 0 else np.ones_like(recency)
        top = np.abs(efficiency).max()
        efficiency = efficiency / top if top > 0 else efficiency
        return self.utility_alpha * efficiency + (1.0 - self.utility_alpha) * recency

    def _tick(self) -> int:
        now, self._clock = self._clock, self._clock + 1
        return now

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = self._tick()
        if self.eviction == "lru":
            self._entries.move_to_end(entry.entry_id)

    def _allocate(self) -> int:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        self._refcount[slot] = 1
        return slot

    def _insert(self, tokens, group, checkpoints, payload) -> int:
        entry_id, self._next_entry = self._next_entry, self._next_entry + 1
        self._trie.insert(entry_id, group, tokens, checkpoints)
        now = self._tick()
        self._entries[entry_id] = _Entry(entry_id, group, tokens, checkpoints, payload,
                                         created=now, last_used=now)
        return entry_id

    def _remove(self, entry: _Entry) -> list[int]:
        """Removes an entry from the trie and the tables; returns the slots it freed."""
        del self._entries[entry.entry_id]
        self._trie.remove(entry.entry_id)
        self._stats["evictions"] += 1
        freed = []
        for _, slot in entry.checkpoints:
            self._refcount[slot] -= 1
            if self._refcount[slot] == 0:
                del self._refcount[slot]
                heapq.heappush(self._free_slots, slot)
                freed.append(slot)
        return freed

    # ------------------------------------------------------------------------------- inspection
    def _info(self, entry: _Entry) -> EntryInfo:
        return EntryInfo(entry.entry_id, entry.group, int(entry.tokens.size), entry.checkpoints,
                         entry.created, entry.last_used, entry.pins)

    def entries(self) -> tuple[EntryInfo, ...]:
        """Read-only views of the retained entries, oldest (fifo) / least recently used (lru) first."""
        with self._lock:
            return tuple(self._info(e) for e in self._entries.values())

    def refcounts(self) -> dict[int, int]:
        """slot -> number of entries holding it (resident states only)."""
        with self._lock:
            return dict(self._refcount)

    @property
    def resident_checkpoints(self) -> int:
        """Distinct resident states (shared inherited states count once)."""
        with self._lock:
            return len(self._refcount)

    def stats(self) -> dict[str, int]:
        """entries, resident_states, lookups, hits, commits, evictions, dropped, open_plans."""
        with self._lock:
            return dict(entries=len(self._entries), resident_states=len(self._refcount),
                        open_plans=len(self._open_plans), **self._stats)

    # ------------------------------------------------------------------------------ state export
    def _config(self) -> dict[str, Any]:
        return {"capacity_entries": self.capacity_entries, "capacity_slots": self.capacity_slots,
                "eviction": self.eviction, "grid": self.grid, "capture": self.capture,
                "block_size": self.block_size, "utility_alpha": self.utility_alpha}

    def state_dict(self) -> dict[str, Any]:
        """The index as plain data (public, versioned; layout in `sparse_prefix.index_state`).

        Pins and open plans are not included (they belong to requests in flight).

        Raises:
          TypeError: an entry's group is not None / str / int, or its payload not None / ints.
        """
        with self._lock:
            return export_index(self._config(), list(self._entries.values()),
                                {"next_entry": self._next_entry, "next_slot": self._next_slot,
                                 "clock": self._clock, "stats": dict(self._stats)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace every entry, slot refcount and counter by `state` (from `state_dict` of an index
        configured like this one), all or nothing. ``hash_fn`` and ``utility_fn`` stay this index's.

        Raises:
          ValueError: a missing, malformed or inconsistent field, or a differing configuration (named).
          RuntimeError: plans are open (they refer to the entries being replaced).
        """
        saved = parse_index_state(state, self._config())
        trie = PrefixTrie(self.block_size, self._trie_hash)
        for entry in sorted(saved.entries, key=lambda e: e.entry_id):
            trie.insert(entry.entry_id, entry.group, entry.tokens, entry.checkpoints)
        with self._lock:
            if self._open_plans:
                raise RuntimeError(f"cannot load state while {len(self._open_plans)} plans are open")
            self._install(saved, trie)

    def _install(self, saved: SavedIndex, trie: PrefixTrie) -> None:
        self._trie = trie
        self._entries = OrderedDict(
            (e.entry_id, _Entry(e.entry_id, e.group, e.tokens, e.checkpoints, e.payload, e.created,
                                e.last_used)) for e in saved.entries)
        self._refcount = {}
        for entry in saved.entries:
            for _, slot in entry.checkpoints:
                self._refcount[slot] = self._refcount.get(slot, 0) + 1
        self._free_slots = [s for s in range(saved.next_slot) if s not in self._refcount]
        heapq.heapify(self._free_slots)
        self._next_slot, self._next_entry, self._clock = saved.next_slot, saved.next_entry, saved.clock
        self._stats = dict(saved.stats)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], *,
                        hash_fn: Callable[[np.ndarray], Hashable] | None = None,
                        utility_fn: Callable[[EntryInfo], float] | None = None) -> "PrefixIndex":
        """A new index configured and filled from `state` (see `load_state_dict`)."""
        if not isinstance(state, dict):
            raise TypeError(f"PrefixIndex state must be a dict, got {type(state).__name__}")
        config = {key: state.get(key) for key in ("capacity_entries", "capacity_slots", "eviction", "grid",
                                                   "capture", "block_size", "utility_alpha")}
        index = cls(**config, hash_fn=hash_fn, utility_fn=utility_fn)
        index.load_state_dict(state)
        return index
