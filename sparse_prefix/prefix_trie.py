"""The prefix trie behind `PrefixIndex`: exact token-level LCP and resume lookup in O(request length).

Each group has a trie of token blocks (``block_size`` tokens; an entry's last block may be shorter,
and is then a leaf). A node's children sit in a dict keyed by ``hash_fn(block)`` -- a chained prefix
hash, since a key is only ever looked up under its parent -- and every probe is VERIFIED by comparing
the block's tokens, so a collision (tests inject ``hash_fn``) costs time, never a false hit.

Lookup of a request of L tokens: walk the fully matching blocks (at most L / block_size probes,
O(L) token comparisons), then compare the next (partial) block with every child of the node where
the walk stopped: that gives the exact LCP with the group. The resume checkpoint is the deepest
(entry, position c) with c <= min(LCP_entry, L - 1): scanning the walked levels from the deepest,
each level offers the checkpoints on the path node (LCP >= its end) and on siblings that share a part
of the block with the request (only siblings that hold checkpoints are visited). Holders of that
checkpoint are ranked by their LCP (binary search of their node path against the walked path), ties
to the newest entry. Work per lookup: O(L) plus O(block_size) per sibling holding checkpoints on the
scanned levels -- never O(entries x L).
"""

from __future__ import annotations

import bisect
import itertools
from typing import Callable, Hashable, Iterable, NamedTuple

import numpy as np


def default_block_hash(block: np.ndarray) -> int:
    """A block's key (int32[<= block_size]): Python's hash of its bytes. (Without a ``hash_fn`` the
    trie keys children by the bytes themselves, which a dict hashes the same way, but faster.)"""
    return hash(block.tobytes())


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two 1-D token arrays."""
    n = min(a.size, b.size)
    mismatch = np.flatnonzero(a[:n] != b[:n])
    return int(mismatch[0]) if mismatch.size else n


class _Node:
    """One block of tokens (positions end - len(block) + 1 .. end) below its parent."""

    __slots__ = ("parent", "key", "raw", "block", "end", "children", "ckpt_children", "entries",
                 "ckpt_positions", "ckpt")

    def __init__(self, parent: _Node | None, key: Hashable, raw: bytes, end: int):
        self.parent, self.key, self.raw, self.end = parent, key, raw, end
        self.block = np.frombuffer(raw, dtype=np.int32)  # read-only view of the block's tokens
        self.children: dict[Hashable, list[_Node]] = {}
        self.ckpt_children: set[_Node] = set()     # children holding at least one checkpoint
        self.entries: set[int] = set()             # entries whose tokens pass through this block
        self.ckpt_positions: list[int] = []        # sorted distinct checkpoint positions in the block
        self.ckpt: dict[int, dict[int, int]] = {}  # position -> {entry id: slot}

    def child(self, key: Hashable, raw: bytes) -> _Node | None:
        """The child whose block has exactly these token bytes (verified, whatever the key)."""
        for node in self.children.get(key, ()):
            if node.raw == raw:
                return node
        return None

    def all_children(self) -> Iterable[_Node]:
        return itertools.chain.from_iterable(self.children.values())

    def deepest_at_most(self, cap: int) -> int:
        i = bisect.bisect_right(self.ckpt_positions, cap)
        return self.ckpt_positions[i - 1] if i else 0


class Match(NamedTuple):
    """A lookup result: the resume entry (None on a miss), its LCP (the overlap), the group's LCP,
    the resume position (0 = none) and its slot (None when 0)."""

    entry_id: int | None
    overlap: int
    lcp: int
    resume_position: int
    resume_slot: int | None


MISS = Match(None, 0, 0, 0, None)


class PrefixTrie:
    """Per-group block tries of the retained entries, with their checkpoints (not thread-safe:
    `PrefixIndex` holds the lock).

    Args:
      block_size: tokens per block (>= 1, validated by the caller).
      hash_fn: block -> hashable key; None for `default_block_hash`.
    """

    def __init__(self, block_size: int, hash_fn: Callable[[np.ndarray], Hashable] | None = None):
        self.block_size = block_size
        self._hash = hash_fn
        self._roots: dict[Hashable, _Node] = {}
        self._paths: dict[int, tuple[Hashable, list[_Node], tuple[tuple[int, int], ...]]] = {}

    def _keys(self, tokens: np.ndarray) -> Iterable[tuple[int, Hashable, bytes]]:
        """(start, dict key, token bytes) of every block of int32[L] ``tokens``, in order, lazily.

        The request's bytes are taken once and sliced per block (no NumPy call per block unless a
        ``hash_fn`` needs the block's array)."""
        data, size, item = tokens.tobytes(), self.block_size, tokens.itemsize
        for start in range(0, tokens.size, size):
            raw = data[start * item:(start + size) * item]
            yield start, (raw if self._hash is None else self._hash(tokens[start:start + size])), raw

    def insert(self, entry_id: int, group: Hashable, tokens: np.ndarray,
               checkpoints: tuple[tuple[int, int], ...]) -> None:
        """Adds an entry: int32[L] tokens and its sorted (position in 1..L, slot) checkpoints."""
        node = self._roots.get(group)
        if node is None:
            node = self._roots[group] = _Node(None, None, b"", 0)
        nodes = []
        for start, key, raw in self._keys(tokens):
            child = node.child(key, raw)
            if child is None:
                child = _Node(node, key, raw, min(start + self.block_size, tokens.size))
                node.children.setdefault(key, []).append(child)
            child.entries.add(entry_id)
            nodes.append(child)
            node = child
        for position, slot in checkpoints:
            holder = nodes[(position - 1) // self.block_size]
            if position not in holder.ckpt:
                bisect.insort(holder.ckpt_positions, position)
                holder.ckpt[position] = {}
                holder.parent.ckpt_children.add(holder)
            holder.ckpt[position][entry_id] = slot
        self._paths[entry_id] = (group, nodes, checkpoints)

    def remove(self, entry_id: int) -> None:
        """Removes an entry and prunes the nodes no other entry passes through."""
        group, nodes, checkpoints = self._paths.pop(entry_id)
        for position, _ in checkpoints:
            holder = nodes[(position - 1) // self.block_size]
            holders = holder.ckpt[position]
            del holders[entry_id]
            if not holders:
                del holder.ckpt[position]
                holder.ckpt_positions.remove(position)
                if not holder.ckpt_positions:
                    holder.parent.ckpt_children.discard(holder)
        for node in reversed(nodes):
            node.entries.discard(entry_id)
            if not node.entries:  # its children are gone already: they hold subsets of its entries
                bucket = node.parent.children[node.key]
                bucket.remove(node)
                if not bucket:
                    del node.parent.children[node.key]
        if not self._roots[group].children:
            del self._roots[group]

    def lookup(self, tokens: np.ndarray, group: Hashable) -> Match:
        """The resume choice for int32[L] ``tokens`` among the entries of ``group`` (module doc)."""
        if group not in self._roots:
            return MISS
        path, depth, partial = self._walk(tokens, group)
        group_lcp = depth + max(partial.values(), default=0)
        best, holders = self._resume(tokens, group, path, partial)
        if best:
            lcp, entry_id, slot = max(holders)
            return Match(entry_id, lcp, group_lcp, best, slot)
        if group_lcp == 0:
            return MISS
        if group_lcp > depth:
            candidates = set().union(*(c.entries for c, ext in partial.items()
                                       if depth + ext == group_lcp))
        else:
            candidates = set(path[-1].entries)
            last = path[-1]
            if last.block.size < self.block_size:
                # The request ended inside this block: siblings whose longer block starts with the
                # request's last tokens share all of it too.
                rest = tokens[last.parent.end:]
                for sibling in last.parent.all_children():
                    if sibling is not last and common_prefix(rest, sibling.block) == rest.size:
                        candidates |= sibling.entries
        return Match(max(candidates), group_lcp, group_lcp, 0, None)

    def _walk(self, tokens: np.ndarray, group: Hashable):
        """(fully matched nodes, depth matched, {child of the last node: its partial LCP > 0})."""
        node, depth, path = self._roots[group], 0, []
        size = self.block_size
        for _, key, raw in self._keys(tokens):
            child = node.child(key, raw)
            if child is None:
                break
            path.append(child)
            node, depth = child, child.end
        rest = tokens[depth:depth + size]
        partial = {}
        if rest.size:
            for child in node.all_children():
                ext = common_prefix(rest, child.block)
                if ext:
                    partial[child] = ext
        return path, depth, partial

    def _entry_lcp(self, entry_id: int, tokens: np.ndarray, path: list[_Node], shared: int) -> int:
        """Exact LCP of an entry known to pass through path[shared - 1]."""
        nodes = self._paths[entry_id][1]
        lo, hi = shared, min(len(nodes), len(path))  # nodes[:lo] == path[:lo]; find the largest lo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if nodes[mid - 1] is path[mid - 1]:
                lo = mid
            else:
                hi = mid - 1
        depth = path[lo - 1].end if lo else 0
        if lo == len(nodes):
            return depth
        return depth + common_prefix(tokens[depth:depth + self.block_size], nodes[lo].block)

    def _resume(self, tokens: np.ndarray, group: Hashable, path: list[_Node],
                partial: dict[_Node, int]) -> tuple[int, list[tuple[int, int, int]]]:
        """The deepest usable checkpoint and its holders [(LCP, entry id, slot)] (position 0: none).

        Level i is the block of positions (start, start + block_size] below path[i - 1]. A usable
        checkpoint there sits on path[i] (any position <= L - 1) or on a sibling that shares ext
        tokens of the block with the request (positions <= start + ext). Levels are scanned from the
        deepest; the first that has a usable checkpoint holds the deepest one.
        """
        limit, size = tokens.size - 1, self.block_size
        for level in range(len(path), -1, -1):
            parent = path[level - 1] if level else self._roots[group]
            on_path = path[level] if level < len(path) else None
            start = parent.end
            best, holders = 0, []
            for child in parent.ckpt_children:
                if child is on_path:
                    continue
                ext = (partial.get(child, 0) if on_path is None
                       else common_prefix(tokens[start:start + size], child.block))
                position = child.deepest_at_most(min(start + ext, limit)) if ext else 0
                if position and position >= best:
                    if position > best:
                        best, holders = position, []
                    holders += [(start + ext, e, s) for e, s in child.ckpt[position].items()]
            position = on_path.deepest_at_most(limit) if on_path is not None else 0
            if position and position >= best:
                if position > best:
                    best, holders = position, []
                holders += [(self._entry_lcp(e, tokens, path, level + 1), e, s)
                            for e, s in on_path.ckpt[position].items()]
            if best:
                return best, holders
        return 0, []
