"""Device side of the cache: preallocated slabs of recurrent states and a pool of KV pages (public).

A *slot* holds one checkpoint's recurrent state (every recurrent layer's float32 SSM state and conv
window). The store keeps one slab per recurrent leaf, ``[num_slots, ...]``, shaped from the model's
abstract state, so nothing is allocated per request. Which slot holds what is decided by the host-side
index (`sparse_prefix.index`); the store only moves rows:

  * `insert` scatters rows of emitted `Checkpoints` ([B, K, ...] leaves) into given slots;
  * `restore` gathers slots back into a batch `State` ([B, ...] leaves) ready for `model.prefill`.

Hybrid models also cache attention KV. Keeping a ``max_length`` buffer per entry would waste memory on
short entries, so KV lives in a pool of *pages* of ``page_size`` (= the model's chunk size) tokens per
attention layer: ``k, v: [num_pages, page_size, Hkv, D]``. An entry owns the pages covering its tokens up
to its deepest checkpoint; an entry that resumed from another shares the pages of the common prefix by
reference (host-side refcounts). `restore` writes the pages of a page table ``[B, P]`` into dense
``[B, S, Hkv, D]`` buffers the model reads. Those are *scratch* buffers the store keeps per batch size
and gets back through `recycle` (the engine hands back each prefill's final KV once its pages are
stored), so a restore moves only the listed pages: no O(S) allocation, fill or copy per request.
Positions no page covers hold stale finite values, which is fine: attention reads positions < length
only. The scratch (at most `MAX_SCRATCH` sets of B x S KV per batch size in use) is working memory
outside `allocated_bytes`, like the buffers a model call needs anyway.

Leaves of equal shape and dtype share one array (`Packing`): the slabs of all 18 GDN layers' SSM states
of qwen3.5-0.8b are one [num_slots, 18, ...] array, all its attention layers' K and V pages one pool.
A jitted call's host cost grows with the arrays it returns (~10-20 us each), so an insert returns 2
slab arrays instead of 36 and a page write 1 pool instead of 12; `export` / `load` keep one array per
logical leaf.

Every device function is jitted once per shape; the number of rows moved per call is padded to a power
of two (padding rows target index ``num_slots`` / ``num_pages``, which the scatter drops), so the
compilations stay bounded. Slabs and pools are donated to the scatters (updated in place); state data
never leaves the device. All methods are thread-safe.

Shapes: B batch rows, K checkpoint slots per row, S the KV buffer length (max_length), P =
ceil(S / page_size) pages per sequence, n rows moved in one call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_prefix.layout import (CacheLayout, abstract_state_of, plan_layout,  # noqa: F401 (re-exported)
                                  slots_per_entry, state_bytes)
from sparse_prefix.planner import default_bin_size  # noqa: F401 (re-exported)
from sparse_prefix.protocol import Checkpoints, State

Array = jax.Array
MIN_BUCKET = 8
MAX_SCRATCH = 2      # dense KV scratch sets kept per batch size (see `StateStore.recycle`)


class PoolExhausted(RuntimeError):
    """Raised when a page or slot request exceeds what is free (the caller evicts and retries)."""


def move_bucket(count: int) -> int:
    """Rows moved per scatter call, padded to a power of two (at least `MIN_BUCKET`)."""
    return max(MIN_BUCKET, 1 << max(0, int(count) - 1).bit_length())


def pack_moves(columns: tuple, drop: int, drop_column: int = 2, width: int = 0) -> np.ndarray:
    """int32[3, max(move_bucket(n), width)]: three index columns of n moves (rows of the result), padded
    with moves that are 0 except `drop` in row `drop_column`: an out-of-range index the scatter drops,
    so padding moves change nothing."""
    count = columns[0].size
    packed = np.zeros((3, max(move_bucket(count), width)), np.int32)
    for row, column in enumerate(columns):
        packed[row, :count] = column
    packed[drop_column, count:] = drop
    return packed


def _leaf_bytes(leaf: Any) -> int:
    """Bytes of one batch row of an abstract leaf [1, ...]."""
    return math.prod(leaf.shape[1:]) * jnp.dtype(leaf.dtype).itemsize


# ----------------------------------------------------------------------------- packing


class Packing(NamedTuple):
    """Which logical leaves share one stacked array (static: hashable, a jit argument).

    Attributes:
      groups: per array, the indices of its leaves (in `tree_leaves` order), stacked on axis 1.
      where: per leaf, (array, position on axis 1).
      treedef: the structure the leaves unflatten to (State.recurrent, or the tuple of KVCache).
    """

    groups: tuple
    where: tuple
    treedef: Any


def make_packing(tree: Any, skip: int) -> Packing:
    """Group the leaves of `tree` by (shape[skip:], dtype), first occurrence first."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys: dict = {}
    where = []
    for index, leaf in enumerate(leaves):
        key = (tuple(leaf.shape[skip:]), jnp.dtype(leaf.dtype).name)
        members = keys.setdefault(key, [])
        where.append((list(keys).index(key), len(members)))
        members.append(index)
    return Packing(tuple(tuple(m) for m in keys.values()), tuple(where), treedef)


def _pack_leaves(leaves: list, packing: Packing) -> tuple:
    """Stack logical leaves [X, ...] into the packing's arrays [X, n_g, ...]."""
    return tuple(jnp.stack([leaves[i] for i in members], axis=1) for members in packing.groups)


def _unpack_leaves(arrays: tuple, packing: Packing) -> list:
    """The logical leaves [X, ...] of packed arrays [X, n_g, ...] (axis-1 slices)."""
    return [arrays[group][:, position] for group, position in packing.where]


# ----------------------------------------------------------------------------- device functions


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _insert_rows(slabs: tuple, recurrent: tuple, moves: Array, packing: Packing) -> tuple:
    """slab rows[slots[i]] = recurrent[rows[i], ks[i]] where (rows, ks, slots) = moves int32[3, n]
    (packed slabs [N, n_g, ...], recurrent leaves [B, K, ...]; slots >= N dropped). One index array:
    one host-to-device copy; one output array per packed slab."""
    rows, ks, slots = moves[0], moves[1], moves[2]
    leaves = jax.tree_util.tree_leaves(recurrent)
    out = []
    for slab, members in zip(slabs, packing.groups):
        update = jnp.stack([leaves[i][rows, ks].astype(slab.dtype) for i in members], axis=1)
        out.append(slab.at[slots].set(update, mode="drop"))
    return tuple(out)


def _page_positions(seq_pages: Array, page_size: int) -> Array:
    """int32[n, C]: the token positions of page seq_pages[i] of a sequence."""
    return seq_pages[:, None] * page_size + jnp.arange(page_size, dtype=seq_pages.dtype)[None, :]


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _write_pages(pools: tuple, kv: tuple, moves: Array, packing: Packing) -> tuple:
    """pool page pages[i] = page seq_pages[i] of kv row rows[i], (rows, seq_pages, pages) = moves
    int32[3, n] (packed pools [M, n_g, C, ...], kv leaves [B, S, ...]).

    Reads only the n moved pages (positions past S, in a partial last page, repeat position S - 1:
    nobody reads them back). Pages >= M are dropped (padding)."""
    rows, seq_pages, pages = moves[0], moves[1], moves[2]
    leaves = jax.tree_util.tree_leaves(kv)
    out = []
    for pool, members in zip(pools, packing.groups):
        positions = jnp.minimum(_page_positions(seq_pages, pool.shape[2]), leaves[members[0]].shape[1] - 1)
        update = jnp.stack([leaves[i][rows[:, None], positions].astype(pool.dtype) for i in members],
                           axis=1)
        out.append(pool.at[pages].set(update, mode="drop"))
    return tuple(out)


@functools.partial(jax.jit, donate_argnums=2, static_argnums=(4, 5, 6))
def _gather_state(slabs: tuple, pools: tuple | None, scratch: tuple | None, packed: Array,
                  batch: int, slab_packing: Packing, pool_packing: Packing | None
                  ) -> tuple[tuple, tuple | None]:
    """(recurrent, kv) of a batch State: recurrent rows of `slots` int32[B] (-1: the empty state), KV
    the `scratch` with the listed pages written in: scratch[rows[i], page seq_pages[i]] = pools[pages[i]]
    (rows >= B: padding). packed = int32[B + 3 n]: slots, then rows, seq_pages, pages (one index array,
    one host-to-device copy); batch = B (static); the packings map packed arrays to logical leaves.

    Work: O(B * slot state + n * page); the scratch buffers [B, S, ...] are donated and updated in place,
    so nothing is O(S) per call. Positions the pages do not cover keep whatever the scratch held.
    (XLA on CPU widens any write into a 16-bit float buffer to f32 over the whole buffer, so there a
    bf16 KV restore is O(S) after all; f32 on CPU and every dtype on GPU update in place.) The lengths
    stay on the host (see `StateStore.restore`)."""
    slots = packed[:batch]
    rows, seq_pages, pages = packed[batch:].reshape(3, -1)
    present = slots >= 0
    index = jnp.maximum(slots, 0)

    def take(slab):
        rows_ = slab[index]
        mask = present.reshape((-1,) + (1,) * (rows_.ndim - 1))
        return jnp.where(mask, rows_, jnp.zeros_like(rows_))

    recurrent = jax.tree_util.tree_unflatten(
        slab_packing.treedef, _unpack_leaves(tuple(take(slab) for slab in slabs), slab_packing))
    kv = None
    if pools is not None:
        page_rows = _unpack_leaves(tuple(pool[pages] for pool in pools), pool_packing)

        def put(buffer, pool_pages):
            positions = _page_positions(seq_pages, pool_pages.shape[1])
            return buffer.at[rows[:, None], positions].set(pool_pages.astype(buffer.dtype), mode="drop")

        buffers = jax.tree_util.tree_leaves(scratch)
        kv = jax.tree_util.tree_unflatten(pool_packing.treedef,
                                          [put(b, p) for b, p in zip(buffers, page_rows)])
    return recurrent, kv


gather_state = _gather_state     # public name: traced inside fused programs (`Engine(fuse_restore=)`)


def _committed(tree: Any) -> Any:
    """Place buffers on the default device explicitly. jit keys its compilations on whether inputs are
    committed to a device, and scatter outputs are; committing the fresh buffers too means one
    compilation (of the store's functions and of the model's prefill fed by `restore`), not two."""
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


# ----------------------------------------------------------------------------- host side


class PageRefs:
    """Host-side refcounts of KV pages with a free list (plain NumPy; the caller holds the lock)."""

    def __init__(self, num_pages: int):
        self.refcount = np.zeros((num_pages,), np.int32)
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free(self) -> int:
        """Pages with refcount 0."""
        return len(self._free)

    def allocate(self, count: int) -> np.ndarray:
        """`count` fresh pages with refcount 1; raises PoolExhausted (nothing taken) if too few are free."""
        if count > len(self._free):
            raise PoolExhausted(f"{count} KV pages requested, {len(self._free)} free")
        taken = np.array([self._free.pop() for _ in range(count)], np.int32)
        self.refcount[taken] = 1
        return taken

    def retain(self, pages: np.ndarray) -> None:
        """One more reference to each of `pages` (all must be live)."""
        listed = np.asarray(pages, np.int64).reshape(-1).tolist()   # a few dozen: plain ints are cheaper
        refcount = self.refcount
        dead = [p for p in listed if refcount[p] <= 0]
        if dead:
            raise ValueError(f"retain of a free page: {dead}")
        for page in listed:
            refcount[page] += 1

    def release(self, pages: np.ndarray) -> int:
        """Drop one reference from each of `pages`; returns how many became free."""
        listed = np.asarray(pages, np.int64).reshape(-1).tolist()
        refcount = self.refcount
        dead = [p for p in listed if refcount[p] <= 0]
        if dead:
            raise ValueError(f"release of a free page: {dead}")
        for page in listed:
            refcount[page] -= 1
        freed = [p for p in sorted(set(listed)) if refcount[p] == 0]
        self._free.extend(freed)
        return len(freed)

    def load(self, refcount: np.ndarray) -> None:
        """Replace the refcounts (from a snapshot); the free list follows."""
        self.refcount = np.asarray(refcount, np.int32).copy()
        self._free = [int(p) for p in np.flatnonzero(self.refcount == 0)[::-1]]


class StoreBuffers(NamedTuple):
    """The device buffers of a store, packed (`Packing`): `slabs` a tuple of [num_slots, n_g, ...]
    arrays holding State.recurrent's leaves; `pools` a tuple of [num_pages, n_g, page_size, Hkv, D]
    arrays holding every attention layer's K and V pages, or None."""

    slabs: tuple
    pools: tuple | None


class StateStore:
    """Preallocated device storage for checkpoint states and KV pages of ONE model (public).

    Args:
      abstract: the model's one-row abstract State (`abstract_state_of(model)`): leaves [1, ...].
      num_slots: recurrent-state slots (the index's ``capacity_slots``).
      page_size: tokens per KV page (the model's chunk size).
      num_pages: KV pages per attention layer (ignored, 0, for a pure SSM).
    """

    def __init__(self, abstract: State, *, num_slots: int, page_size: int, num_pages: int = 0):
        for name, value in (("num_slots", num_slots), ("page_size", page_size), ("num_pages", num_pages)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if num_slots < 1 or page_size < 1 or num_pages < 0:
            raise ValueError(f"need num_slots >= 1, page_size >= 1, num_pages >= 0; got "
                             f"{num_slots}, {page_size}, {num_pages}")
        self.abstract = abstract
        self.num_slots = int(num_slots)
        self.page_size = int(page_size)
        self.has_kv = abstract.kv is not None and len(abstract.kv) > 0
        self.num_pages = int(num_pages) if self.has_kv else 0
        self.kv_length = int(abstract.kv[0].k.shape[1]) if self.has_kv else 0
        self.pages_per_sequence = -(-self.kv_length // self.page_size) if self.has_kv else 0
        self.slot_bytes = sum(_leaf_bytes(leaf) for leaf in jax.tree_util.tree_leaves(abstract.recurrent))
        self.page_bytes = self.page_size * sum(
            math.prod(leaf.shape[2:]) * jnp.dtype(leaf.dtype).itemsize
            for leaf in jax.tree_util.tree_leaves(abstract.kv)) if self.has_kv else 0
        self.slab_packing = make_packing(abstract.recurrent, skip=1)
        self.pool_packing = make_packing(tuple(abstract.kv), skip=2) if self.has_kv else None
        self._lock = threading.RLock()
        self._refs = PageRefs(self.num_pages)
        self._buffers = self._allocate()
        self._scratch: dict[int, list[tuple]] = {}     # batch size -> free dense KV sets
        self._kv_specs: dict[int, tuple] = {}           # batch size -> (treedef, leaf shapes and dtypes)

    @classmethod
    def for_model(cls, model: Any, *, num_slots: int, num_pages: int = 0) -> "StateStore":
        """A store shaped for `model` (page size = model.chunk_size)."""
        return cls(abstract_state_of(model), num_slots=num_slots, page_size=int(model.chunk_size),
                   num_pages=num_pages)

    def _logical_shapes(self) -> list[tuple[tuple, Any]]:
        """(shape, dtype) of every logical buffer leaf: the slabs' [num_slots, ...] then the pools'
        [num_pages, page_size, Hkv, D] (the `export` layout)."""
        out = [((self.num_slots,) + tuple(leaf.shape[1:]), jnp.dtype(leaf.dtype))
               for leaf in jax.tree_util.tree_leaves(self.abstract.recurrent)]
        if self.has_kv:
            out += [((max(self.num_pages, 1), self.page_size) + tuple(leaf.shape[2:]), jnp.dtype(leaf.dtype))
                    for leaf in jax.tree_util.tree_leaves(tuple(self.abstract.kv))]
        return out

    def _packed_shapes(self) -> tuple[list, list]:
        shapes = self._logical_shapes()
        count = len(self.slab_packing.where)

        def packed(packing, offset):
            return [(shapes[offset + m[0]][0][:1] + (len(m),) + shapes[offset + m[0]][0][1:],
                     shapes[offset + m[0]][1]) for m in packing.groups]

        return packed(self.slab_packing, 0), (packed(self.pool_packing, count) if self.has_kv else [])

    def _allocate(self) -> StoreBuffers:
        slab_shapes, pool_shapes = self._packed_shapes()
        slabs = tuple(jnp.zeros(shape, dtype) for shape, dtype in slab_shapes)
        pools = tuple(jnp.zeros(shape, dtype) for shape, dtype in pool_shapes) if self.has_kv else None
        return _committed(StoreBuffers(slabs=slabs, pools=pools))

    # ------------------------------------------------------------------ sizes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of all slabs and page pools (what the store holds on the device)."""
        return self.num_slots * self.slot_bytes + self.num_pages * self.page_bytes

    @property
    def pages_in_use(self) -> int:
        """KV pages referenced by at least one entry."""
        with self._lock:
            return self.num_pages - self._refs.free

    @property
    def free_pages(self) -> int:
        """KV pages with no reference."""
        with self._lock:
            return self._refs.free

    def page_refcounts(self) -> np.ndarray:
        """A copy of the page refcounts int32[num_pages]."""
        with self._lock:
            return self._refs.refcount.copy()

    # ------------------------------------------------------------------ recurrent slots

    def insert(self, checkpoints: Checkpoints, rows, ks, slots) -> None:
        """Copy emitted checkpoint states into slots: slot slots[i] <- checkpoints[rows[i], ks[i]].

        Args:
          checkpoints: from `model.prefill`, leaves [B, K, ...].
          rows, ks, slots: int sequences of equal length n (row, checkpoint slot k, destination slot).
        """
        rows, ks, slots = (np.asarray(a, np.int32).reshape(-1) for a in (rows, ks, slots))
        if not rows.shape == ks.shape == slots.shape:
            raise ValueError(f"rows, ks, slots must have equal lengths, got {rows.size}, {ks.size}, "
                             f"{slots.size}")
        if rows.size == 0:
            return
        if np.any((slots < 0) | (slots >= self.num_slots)):
            raise ValueError(f"slots must lie in 0..{self.num_slots - 1}, got {slots.tolist()}")
        moves = pack_moves((rows, ks, slots), self.num_slots)
        with self._lock:
            slabs = _insert_rows(self._buffers.slabs, checkpoints.recurrent, moves, self.slab_packing)
            self._buffers = self._buffers._replace(slabs=slabs)

    def restore(self, slots, lengths, page_table=None) -> State:
        """The batch State to resume from: recurrent rows from `slots`, KV from `page_table`.

        Args:
          slots: int[B]; -1 restores the empty (zero) state of a miss.
          lengths: int[B], the tokens each restored state has consumed (0 for a miss).
          page_table: int[B, <= P] page ids covering positions [0, lengths) in order (-1: none);
            hybrids only (None: no pages, e.g. all misses).

        Returns:
          State with recurrent leaves [B, ...], KV [B, S, Hkv, D] (or None), and `length` a HOST
          int32[B] array (NumPy): the lengths are the caller's, so a model that checks them on the
          host (`check_prefill_args`) reads them without waiting for the gather to finish on the
          device, and the prefill is dispatched while the gather runs. The KV buffers are scratch
          the store reuses (`recycle`): the listed pages are written in, other positions hold stale
          finite values (attention reads positions < length only). One device dispatch; the device
          work is O(B * slot state + pages listed), never O(S).
        """
        slots = np.asarray(slots, np.int32).reshape(-1)
        lengths = np.asarray(lengths, np.int32).reshape(-1)
        if slots.shape != lengths.shape:
            raise ValueError(f"slots and lengths must have equal lengths, got {slots.size}, {lengths.size}")
        moves = self._page_moves(self._checked_slots(slots).size, page_table)
        with self._lock:
            return self._gather(slots, lengths, moves)

    def _checked_slots(self, slots: np.ndarray) -> np.ndarray:
        if np.any(slots >= self.num_slots):
            raise ValueError(f"slots must be < {self.num_slots}, got {slots.tolist()}")
        return slots

    def _page_moves(self, batch: int, page_table: Any, widest: bool = False) -> np.ndarray:
        """int32[3, n']: (rows, seq_pages, pages) of the table's pages, padded to a bucket with rows = B
        (dropped); with `widest`, to the largest bucket B rows can need (one shape per batch size)."""
        rows = seq_pages = pages = np.zeros((0,), np.int32)
        if self.has_kv and page_table is not None:
            table = np.asarray(page_table)
            if table.ndim != 2 or table.shape[0] != batch or table.shape[1] > self.pages_per_sequence \
                    or (table.size and table.dtype.kind not in "iu"):
                raise ValueError(f"page_table must be an integer array of shape [{batch}, <= "
                                 f"{self.pages_per_sequence}], got {table.dtype} {table.shape}")
            if np.any((table < -1) | (table >= self.num_pages)):
                raise ValueError(f"page_table entries must lie in -1..{self.num_pages - 1}")
            rows, seq_pages = np.nonzero(table >= 0)
            pages = table[rows, seq_pages]
        width = move_bucket(batch * self.pages_per_sequence) if widest and self.has_kv else 0
        return pack_moves((rows, seq_pages, pages), batch, drop_column=0, width=width)

    def _gather_args(self, slots: np.ndarray, moves: np.ndarray) -> tuple:
        """(slabs, pools, scratch, packed) of a gather: a scratch KV of this batch size (taken from
        the recycled sets, else allocated) and the packed indices. Holds the lock."""
        batch = slots.size
        scratch = None
        if self.has_kv:
            free = self._scratch.get(batch)
            scratch = free.pop() if free else _committed(jax.tree_util.tree_map(
                lambda leaf: jnp.zeros((batch,) + tuple(leaf.shape[1:]), leaf.dtype),
                tuple(self.abstract.kv)))
        packed = np.concatenate([slots, moves.reshape(-1)]).astype(np.int32)
        return self._buffers.slabs, self._buffers.pools, scratch, packed

    def _gather(self, slots: np.ndarray, lengths: np.ndarray, moves: np.ndarray) -> State:
        """Run `_gather_state` (one dispatch) on a scratch KV of this batch size. Holds the lock."""
        slabs, pools, scratch, packed = self._gather_args(slots, moves)
        recurrent, kv = _gather_state(slabs, pools, scratch, packed, slots.size, self.slab_packing,
                                      self.pool_packing)
        return State(recurrent=recurrent, kv=kv, length=lengths.astype(np.int32))

    def gather_fn(self, batch: int):
        """The restore's device function for `batch` rows, to trace inside a caller's program:
        ``gather(slabs, pools, scratch, packed) -> (recurrent, kv)`` on `gather_inputs`' arrays
        (`gather_state` with this store's packings)."""
        slab_packing, pool_packing = self.slab_packing, self.pool_packing
        return lambda slabs, pools, scratch, packed: gather_state(
            slabs, pools, scratch, packed, batch, slab_packing, pool_packing)

    @contextlib.contextmanager
    def gather_inputs(self, slots, page_table=None):
        """`restore` split for fusion: yields (slabs, pools, scratch, packed), the inputs of
        `gather_fn(B)`, with the store's lock held -- dispatch the program that reads them inside the
        `with` (a later insert donates the slabs). The scratch KV set is the caller's: the program
        must donate it (the prefill's final KV is what goes back through `recycle`).

        Args: slots int[B] (-1: the zero state); page_table int[B, <= P] or None, as `restore`.
        """
        slots = self._checked_slots(np.asarray(slots, np.int32).reshape(-1))
        # One shape per batch size (the caller's program is big): moves padded to the widest bucket.
        moves = self._page_moves(slots.size, page_table, widest=True)
        with self._lock:
            yield self._gather_args(slots, moves)

    def recycle(self, kv: tuple | None) -> None:
        """Hand dense KV buffers (`State.kv`, leaves [B, S, Hkv, D]) back for a later `restore` of B rows.

        The engine recycles a prefill's final KV once its pages are written, so a request costs no
        O(S) allocation or fill. The caller must not use `kv` afterwards (a restore donates it). At
        most `MAX_SCRATCH` sets are kept per batch size; extra ones are dropped.

        Raises:
          ValueError: `kv` does not have this store's KV structure, shapes and dtypes.
        """
        if not self.has_kv or kv is None:
            return
        kv = tuple(kv)
        leaves, treedef = jax.tree_util.tree_flatten(kv)
        batch = leaves[0].shape[0]
        want = self._kv_specs.get(batch)
        if want is None:                  # once per batch size: the check runs on every request
            abstract = jax.tree_util.tree_flatten(tuple(self.abstract.kv))
            want = self._kv_specs.setdefault(batch, (abstract[1], [
                ((batch,) + tuple(leaf.shape[1:]), jnp.dtype(leaf.dtype)) for leaf in abstract[0]]))
        got = (treedef, [(tuple(leaf.shape), jnp.dtype(leaf.dtype)) for leaf in leaves])
        if got != want:
            raise ValueError(f"recycled KV has shapes {got[1]} ({got[0]}), this store's are {want[1]} "
                             f"({want[0]})")
        with self._lock:
            free = self._scratch.setdefault(batch, [])
            if len(free) < MAX_SCRATCH:
                free.append(kv)

    def compile_restore(self, batch: int) -> None:
        """Compile `restore` for every page bucket a batch of `batch` rows can use (ahead of traffic)."""
        top = move_bucket(batch * self.pages_per_sequence)
        slots, zeros = np.full(batch, -1, np.int32), np.zeros(batch, np.int32)
        size = MIN_BUCKET
        while size <= top:
            moves = np.zeros((3, size), np.int32)
            moves[0] = batch                                  # every move is padding
            with self._lock:
                state = self._gather(slots, zeros, moves)
            self.recycle(state.kv)
            size *= 2

    # ------------------------------------------------------------------ KV pages

    def allocate_pages(self, count: int) -> np.ndarray:
        """`count` fresh pages (refcount 1); PoolExhausted if fewer are free (nothing is taken)."""
        with self._lock:
            return self._refs.allocate(int(count))

    def retain_pages(self, pages) -> None:
        """One more reference to each page (an entry sharing a prefix's pages)."""
        with self._lock:
            self._refs.retain(np.asarray(pages, np.int64).reshape(-1))

    def release_pages(self, pages) -> int:
        """Drop one reference from each page; returns the number of pages freed."""
        pages = np.asarray(pages, np.int64).reshape(-1)
        if pages.size == 0:
            return 0
        with self._lock:
            return self._refs.release(pages)

    def write_pages(self, kv: tuple, rows, seq_pages, pages) -> None:
        """Copy KV pages out of dense buffers: pool page pages[i] <- page seq_pages[i] of row rows[i].

        Args:
          kv: `State.kv` of a prefill's final state (KVCache leaves [B, S, Hkv, D]).
          rows, seq_pages, pages: int sequences of equal length n.
        """
        rows, seq_pages, pages = (np.asarray(a, np.int32).reshape(-1) for a in (rows, seq_pages, pages))
        if not rows.shape == seq_pages.shape == pages.shape:
            raise ValueError("rows, seq_pages, pages must have equal lengths")
        if rows.size == 0 or not self.has_kv:
            return
        if np.any((pages < 0) | (pages >= self.num_pages)):
            raise ValueError(f"pages must lie in 0..{self.num_pages - 1}, got {pages.tolist()}")
        moves = pack_moves((rows, seq_pages, pages), self.num_pages)
        with self._lock:
            pools = _write_pages(self._buffers.pools, tuple(kv), moves, self.pool_packing)
            self._buffers = self._buffers._replace(pools=pools)

    def compile_for(self, checkpoints: Checkpoints, kv: tuple | None) -> None:
        """Compile insert / page writes for these emitted shapes (every row is padding: no change)."""
        empty = np.zeros((0,), np.int32)
        with self._lock:
            slabs = _insert_rows(self._buffers.slabs, checkpoints.recurrent,
                                 pack_moves((empty,) * 3, self.num_slots), self.slab_packing)
            self._buffers = self._buffers._replace(slabs=slabs)
            if self.has_kv and kv is not None:
                pools = _write_pages(self._buffers.pools, tuple(kv), pack_moves((empty,) * 3, self.num_pages),
                                     self.pool_packing)
                self._buffers = self._buffers._replace(pools=pools)

    # ------------------------------------------------------------------ whole-store operations

    def synchronize(self) -> None:
        """Block until every dispatched insert and page write has landed (e.g. before timing)."""
        with self._lock:
            jax.block_until_ready(self._buffers)

    def reset(self) -> None:
        """Forget every page reference and zero the buffers (slots are the index's to forget)."""
        with self._lock:
            self._refs = PageRefs(self.num_pages)
            self._buffers = self._allocate()

    def export(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Host copies of every buffer (flattened leaf name -> array) and the page refcounts."""
        with self._lock:
            leaves = _unpack_leaves(self._buffers.slabs, self.slab_packing)    # slices: copies, never
            if self.has_kv:                                                   # a donated buffer
                leaves += _unpack_leaves(self._buffers.pools, self.pool_packing)
            refcount = self._refs.refcount.copy()
        return {f"leaf_{i:03d}": np.asarray(jax.device_get(c)) for i, c in enumerate(leaves)}, refcount

    def load(self, arrays: dict[str, np.ndarray], refcount: np.ndarray) -> None:
        """Replace every buffer and the page refcounts from `export`-shaped data (validated first)."""
        template = self._logical_shapes()
        if len(arrays) != len(template):
            raise ValueError(f"snapshot has {len(arrays)} buffers, this store has {len(template)}")
        leaves = []
        for i, (shape, dtype) in enumerate(template):
            got = arrays.get(f"leaf_{i:03d}")
            if got is None or got.shape != shape or got.dtype != dtype:
                raise ValueError(f"snapshot buffer {i} is {None if got is None else (got.shape, got.dtype)}"
                                 f", this store needs {(shape, dtype)}")
            leaves.append(got)
        refcount = np.asarray(refcount)
        if refcount.shape != (self.num_pages,) or refcount.dtype.kind not in "iu" or np.any(refcount < 0):
            raise ValueError(f"snapshot page refcounts have shape {refcount.shape}, need ({self.num_pages},)")
        count = len(self.slab_packing.where)
        slabs = _pack_leaves(leaves[:count], self.slab_packing)
        pools = _pack_leaves(leaves[count:], self.pool_packing) if self.has_kv else None
        buffers = _committed(StoreBuffers(slabs=slabs, pools=pools))
        with self._lock:
            self._buffers = buffers
            self._refs.load(refcount)
