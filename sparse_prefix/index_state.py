"""The versioned state dict of a `PrefixIndex`: export of entries and validation on load (host side).

Layout (version 1)::

    {"type": "PrefixIndex", "version": 1,
     "capacity_entries", "capacity_slots", "eviction", "grid", "capture", "block_size", "utility_alpha",
     "entries": [{"entry_id", "group", "length", "checkpoints": [[position, slot], ...], "payload",
                  "created", "last_used"}, ...],          # in eviction order (oldest / least recent first)
     "tokens": int32[sum of lengths],                     # the entries' tokens, concatenated in that order
     "next_entry", "next_slot", "clock",                  # the id, slot and clock counters
     "stats": {"lookups", "hits", "commits", "evictions", "dropped"}}

Groups must be None, a string or an int; payloads None or a sequence of ints (the engine's KV pages).
Pins and open plans are not state: they belong to requests in flight. `parse_index_state` checks every
invariant the index relies on -- configuration equal to the loading index's, positions in 1..length on
the grid and strictly increasing, slots in range and distinct within an entry, a slot shared by several
entries held at the same position of the same tokens, ids and clock values below their counters, the
eviction order consistent with the policy -- and raises ValueError naming the field otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Hashable

import numpy as np

from sparse_prefix.state_dicts import StateReader, header

STATE_VERSION = 1
STAT_KEYS = ("lookups", "hits", "commits", "evictions", "dropped")
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class SavedEntry:
    """One validated entry: tokens int32[L] (read-only), checkpoints ((position, slot), ...) sorted."""

    entry_id: int
    group: Hashable
    tokens: np.ndarray
    checkpoints: tuple[tuple[int, int], ...]
    payload: tuple[int, ...] | None
    created: int
    last_used: int


@dataclasses.dataclass(frozen=True)
class SavedIndex:
    """A validated index state: entries in eviction order and the counters."""

    entries: tuple[SavedEntry, ...]
    next_entry: int
    next_slot: int
    clock: int
    stats: dict[str, int]


def _json_group(group: Any, entry_id: int) -> Any:
    if group is None or isinstance(group, (str, int)):
        return group
    raise TypeError(f"entry {entry_id}: group {group!r} cannot be exported (None, str or int only)")


def _json_payload(payload: Any, entry_id: int) -> list[int] | None:
    if payload is None:
        return None
    try:
        values = [int(p) for p in payload]
        if all(v == p for v, p in zip(values, payload)) and not isinstance(payload, (str, bytes)):
            return values
    except (TypeError, ValueError):
        pass
    raise TypeError(f"entry {entry_id}: payload {payload!r} cannot be exported (None or a sequence of ints)")


def export_index(config: dict[str, Any], entries: list[Any], counters: dict[str, Any]) -> dict[str, Any]:
    """The state dict of an index: `config` fields, `entries` (objects with entry_id, group, tokens,
    checkpoints, payload, created, last_used) in eviction order, and `counters` (next_entry, next_slot,
    clock, stats)."""
    tokens = (np.concatenate([e.tokens for e in entries]) if entries else np.zeros(0, np.int32))
    return {**header("PrefixIndex", STATE_VERSION), **config,
            "entries": [{"entry_id": e.entry_id, "group": _json_group(e.group, e.entry_id),
                         "length": int(e.tokens.size),
                         "checkpoints": [[int(p), int(s)] for p, s in e.checkpoints],
                         "payload": _json_payload(e.payload, e.entry_id),
                         "created": int(e.created), "last_used": int(e.last_used)} for e in entries],
            "tokens": tokens.astype(np.int32), **counters}


def parse_index_state(state: Any, config: dict[str, Any]) -> SavedIndex:
    """Validate an index state dict against the loading index's `config` (see the module docstring).

    Raises:
      TypeError: `state` (or a nested entry) is not a dict.
      ValueError: a missing, malformed or inconsistent field (named), or a differing configuration.
    """
    reader = StateReader(state, "PrefixIndex")
    reader.check_header("PrefixIndex", STATE_VERSION)
    for key, value in config.items():
        reader.same(key, value)
    capacity_slots = config["capacity_slots"]
    next_entry = reader.int("next_entry", minimum=0)
    clock = reader.int("clock", minimum=1)
    next_slot = reader.int("next_slot", minimum=0)
    if capacity_slots is not None and next_slot != capacity_slots:
        raise reader.error("next_slot", f"must equal capacity_slots ({capacity_slots}), got {next_slot}")
    stats_reader = reader.child("stats")
    if sorted(stats_reader.state) != sorted(STAT_KEYS):
        raise reader.error("stats", f"must have exactly the keys {list(STAT_KEYS)}, "
                                    f"got {sorted(stats_reader.state)}")
    stats = {key: stats_reader.int(key, minimum=0) for key in STAT_KEYS}
    tokens = reader.array("tokens", "iu", 1)
    if tokens.size and (tokens.min() < 0 or tokens.max() > _INT32_MAX):
        raise reader.error("tokens", f"must lie in 0..{_INT32_MAX}")
    count = len(reader.list("entries"))
    if count > config["capacity_entries"]:
        raise reader.error("entries", f"holds {count} entries, capacity_entries is "
                                      f"{config['capacity_entries']}")
    entries, offset = [], 0
    for i in range(count):
        entry = _parse_entry(reader.item("entries", i), tokens, offset, next_entry=next_entry,
                             next_slot=next_slot, clock=clock, grid=config["grid"])
        entries.append(entry)
        offset += entry.tokens.size
    if offset != tokens.size:
        raise reader.error("tokens", f"holds {tokens.size} tokens, the entries' lengths add up to {offset}")
    _check_shared_slots(reader, entries)
    _check_order(reader, entries, config["eviction"])
    return SavedIndex(tuple(entries), next_entry, next_slot, clock, stats)


def _parse_entry(reader: StateReader, tokens: np.ndarray, offset: int, *, next_entry: int, next_slot: int,
                 clock: int, grid: int) -> SavedEntry:
    entry_id = reader.int("entry_id", 0, next_entry - 1)
    group = reader.raw("group")
    if group is not None and not isinstance(group, (str, int)):
        raise reader.error("group", f"must be None, a string or an int, got {group!r}")
    length = reader.int("length", 1, tokens.size - offset)
    created = reader.int("created", 1, clock - 1)
    last_used = reader.int("last_used", created, clock - 1)
    checkpoints = []
    for pair in reader.list("checkpoints"):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or \
                not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair):
            raise reader.error("checkpoints", f"must be [position, slot] integer pairs, got {pair!r}")
        checkpoints.append((int(pair[0]), int(pair[1])))
    positions = [p for p, _ in checkpoints]
    slots = [s for _, s in checkpoints]
    if any(not 1 <= p <= length or p % grid for p in positions) or np.any(np.diff(positions) <= 0):
        raise reader.error("checkpoints", f"positions must strictly increase within 1..{length} on the grid "
                                          f"{grid}, got {positions}")
    if any(not 0 <= s < next_slot for s in slots) or len(set(slots)) != len(slots):
        raise reader.error("checkpoints", f"slots must be distinct and lie in 0..{next_slot - 1}, "
                                          f"got {slots}")
    payload = reader.raw("payload")
    if payload is not None:
        payload = reader.list("payload")
        if not all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in payload):
            raise reader.error("payload", f"must be None or a list of ints, got {payload!r}")
        payload = tuple(int(p) for p in payload)
    row = tokens[offset:offset + length].astype(np.int32)
    row.flags.writeable = False
    return SavedEntry(entry_id, group, row, tuple(checkpoints), payload, created, last_used)


def _check_shared_slots(reader: StateReader, entries: list[SavedEntry]) -> None:
    """A slot held by several entries (an inherited state) must sit at one position of one prefix."""
    holder: dict[int, tuple[int, SavedEntry]] = {}
    for entry in entries:
        for position, slot in entry.checkpoints:
            if slot not in holder:
                holder[slot] = (position, entry)
                continue
            first_position, first = holder[slot]
            if position != first_position or first.group != entry.group or \
                    not np.array_equal(first.tokens[:position], entry.tokens[:position]):
                raise reader.error("entries", f"slot {slot} is shared by entries {first.entry_id} and "
                                              f"{entry.entry_id} at different positions or prefixes")
    ids = [e.entry_id for e in entries]
    if len(set(ids)) != len(ids):
        raise reader.error("entries", "repeats an entry_id")


def _check_order(reader: StateReader, entries: list[SavedEntry], eviction: str) -> None:
    """lru lists entries by last use, fifo and utility by creation (the order `_victim` reads)."""
    keys = [e.last_used if eviction == "lru" else e.created for e in entries]
    if np.any(np.diff(keys) <= 0):
        raise reader.error("entries", f"are not in {eviction} eviction order")
