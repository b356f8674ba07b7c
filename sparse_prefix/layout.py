"""Sizing a cache before anything is allocated (public via `Engine.abstract` / `StateStore`).

`plan_layout(model, policy, capacity_entries, capacity_bytes)` turns a model's memory profile (bytes of
one checkpoint's recurrent state, KV bytes per token) and a policy's most states per request into a
`CacheLayout`: slots, KV pages and their bytes. Host side; it reads only abstract shapes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from sparse_prefix.planner import Planner, parse_policy
from sparse_prefix.protocol import State


def abstract_state_of(model: Any) -> State:
    """The model's one-row abstract `State` (ShapeDtypeStructs): `model.abstract_state(1)` if offered."""
    if hasattr(model, "abstract_state"):
        return model.abstract_state(1)
    return jax.eval_shape(lambda: model.init_state(1))


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """What the cache will allocate, computed before anything is (see `Engine.abstract`).

    Attributes:
      num_slots: recurrent-state slots.  num_pages: KV pages per attention layer (0 for a pure SSM).
      slot_bytes: one checkpoint's recurrent state.  page_bytes: one page of KV (all attention layers).
      slots_per_entry: the most states one request stores under the policy (budget + fork/end/hints).
      pages_per_sequence: pages a max_length sequence needs.
    """

    num_slots: int
    num_pages: int
    slot_bytes: int
    page_bytes: int
    slots_per_entry: int
    pages_per_sequence: int

    @property
    def allocated_bytes(self) -> int:
        """Device bytes of the slabs and page pools."""
        return self.num_slots * self.slot_bytes + self.num_pages * self.page_bytes


def state_bytes(model: Any) -> tuple[int, int]:
    """(bytes of one checkpoint's recurrent state, bytes of one KV page of chunk_size tokens)."""
    if hasattr(model, "memory_profile"):
        profile = model.memory_profile()
        return int(profile.checkpoint_bytes), int(profile.kv_bytes_per_token) * int(model.chunk_size)
    abstract = abstract_state_of(model)
    slot = sum(math.prod(leaf.shape[1:]) * leaf.dtype.itemsize
               for leaf in jax.tree_util.tree_leaves(abstract.recurrent))
    per_token = sum(math.prod(leaf.shape[2:]) * leaf.dtype.itemsize
                    for leaf in jax.tree_util.tree_leaves(abstract.kv or ()))
    return int(slot), int(per_token) * int(model.chunk_size)


def slots_per_entry(policy: str, max_length: int, grid: int, max_hints: int) -> int:
    """The most states one request of up to `max_length` tokens stores under `policy`."""
    spec = parse_policy(policy)
    if spec.budget is not None:
        base = spec.budget
    else:
        planner = Planner(spec, grid=grid, max_length=max_length)
        base = len(planner.positions(max_length))
    return max(1, base + spec.fork + spec.end + (max_hints if spec.hints else 0) + 1)


def plan_layout(model: Any, *, policy: str = "ldp:8+fork", capacity_entries: int = 64,
                capacity_bytes: int | None = None, max_hints: int = 4) -> CacheLayout:
    """Size the slabs and page pool of a cache for `model` (nothing is allocated).

    Without `capacity_bytes`, `capacity_entries` entries of max_length always fit (slots for the
    policy's most states per entry, pages for a full sequence each). With it, slots take at most
    half of the budget for hybrids (all of it for pure SSMs) and pages the rest; running short of
    either makes the index evict.

    Raises:
      ValueError: a bad capacity, or a budget that holds no checkpoint (or no KV page).
    """
    if isinstance(capacity_entries, bool) or not isinstance(capacity_entries, int) or capacity_entries < 1:
        raise ValueError(f"capacity_entries must be an int >= 1, got {capacity_entries!r}")
    if capacity_bytes is not None and (isinstance(capacity_bytes, bool)
                                       or not isinstance(capacity_bytes, int) or capacity_bytes < 1):
        raise ValueError(f"capacity_bytes must be None or an int >= 1, got {capacity_bytes!r}")
    if isinstance(max_hints, bool) or not isinstance(max_hints, int) or max_hints < 0:
        raise ValueError(f"max_hints must be an int >= 0, got {max_hints!r}")
    chunk, max_length = int(model.chunk_size), int(model.max_length)
    slot_bytes, page_bytes = state_bytes(model)
    has_kv = page_bytes > 0
    per_entry = slots_per_entry(policy, max_length, chunk, max_hints)
    pages_per_sequence = -(-max_length // chunk) if has_kv else 0
    slots = capacity_entries * per_entry
    pages = capacity_entries * pages_per_sequence
    if capacity_bytes is not None:
        slots = min(slots, (capacity_bytes // 2 if has_kv else capacity_bytes) // slot_bytes)
        pages = (capacity_bytes - slots * slot_bytes) // page_bytes if has_kv else 0
        if slots < 1 or (has_kv and pages < 1):
            raise ValueError(f"capacity_bytes={capacity_bytes} holds no checkpoint ({slot_bytes} B)"
                             + (f" and KV page ({page_bytes} B)" if has_kv else ""))
    return CacheLayout(num_slots=int(slots), num_pages=int(pages), slot_bytes=int(slot_bytes),
                       page_bytes=int(page_bytes), slots_per_entry=per_entry,
                       pages_per_sequence=pages_per_sequence)
