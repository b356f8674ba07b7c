"""StateStore: slots and KV pages round-trip exactly, padding never touches other rows, refcounts hold."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparse_prefix.protocol import Checkpoints, KVCache, RecurrentState, State
from sparse_prefix.store import (PageRefs, PoolExhausted, StateStore, _gather_state, _insert_rows, move_bucket,
                                 pack_moves)

PAGE = 4
KV_LEN = 18            # not a multiple of PAGE on purpose: the last page is partial


def toy_abstract(kv: bool) -> State:
    """A one-row abstract state: two recurrent layers (float32 ssm, bf16 conv), optionally one KV layer."""
    recurrent = tuple(RecurrentState(ssm=jax.ShapeDtypeStruct((1, 2, 3, 4), jnp.float32),
                                     conv=jax.ShapeDtypeStruct((1, 3, 5), jnp.bfloat16)) for _ in range(2))
    cache = (KVCache(k=jax.ShapeDtypeStruct((1, KV_LEN, 2, 3), jnp.bfloat16),
                     v=jax.ShapeDtypeStruct((1, KV_LEN, 2, 3), jnp.bfloat16)),) if kv else None
    return State(recurrent=recurrent, kv=cache, length=jax.ShapeDtypeStruct((1,), jnp.int32))


def random_checkpoints(seed: int, batch: int, slots: int) -> Checkpoints:
    rng = np.random.default_rng(seed)
    recurrent = tuple(
        RecurrentState(ssm=jnp.asarray(rng.normal(size=(batch, slots, 2, 3, 4)), jnp.float32),
                       conv=jnp.asarray(rng.normal(size=(batch, slots, 3, 5)), jnp.bfloat16))
        for _ in range(2))
    return Checkpoints(recurrent=recurrent, lengths=jnp.ones((batch, slots), jnp.int32))


def random_kv(seed: int, batch: int) -> tuple:
    rng = np.random.default_rng(seed)
    shape = (batch, KV_LEN, 2, 3)
    return (KVCache(k=jnp.asarray(rng.normal(size=shape), jnp.bfloat16),
                    v=jnp.asarray(rng.normal(size=shape), jnp.bfloat16)),)


@pytest.fixture(scope="module")
def hybrid_store():
    return StateStore(toy_abstract(kv=True), num_slots=16, page_size=PAGE, num_pages=24)


def test_sizes_are_planned_from_the_abstract_state_alone():
    store = StateStore(toy_abstract(kv=True), num_slots=10, page_size=PAGE, num_pages=7)
    slot_bytes = 2 * (2 * 3 * 4 * 4 + 3 * 5 * 2)
    page_bytes = 2 * PAGE * 2 * 3 * 2
    assert store.slot_bytes == slot_bytes and store.page_bytes == page_bytes
    assert store.allocated_bytes == 10 * slot_bytes + 7 * page_bytes
    assert store.pages_per_sequence == 5


def test_leaves_of_equal_shape_and_dtype_share_one_device_array_and_stay_apart_in_use(hybrid_store):
    """Two layers' ssm slabs are one [N, 2, ...] array, their conv slabs another, the layer's K and V
    pages one pool: an insert returns 2 arrays, a page write 1 (not 4 and 2); the logical leaves the
    callers see (restore, export) do not change, and each keeps its own values."""
    assert [len(m) for m in hybrid_store.slab_packing.groups] == [2, 2]
    assert [len(m) for m in hybrid_store.pool_packing.groups] == [2]
    assert [a.shape for a in hybrid_store._buffers.slabs] == [(16, 2, 2, 3, 4), (16, 2, 3, 5)]
    assert hybrid_store._buffers.pools[0].shape == (24, 2, PAGE, 2, 3)
    ckpt = random_checkpoints(11, batch=1, slots=1)
    hybrid_store.insert(ckpt, rows=[0], ks=[0], slots=[3])
    state = hybrid_store.restore(slots=[3], lengths=[4])
    for layer in range(2):
        np.testing.assert_array_equal(state.recurrent[layer].ssm[0], ckpt.recurrent[layer].ssm[0, 0])
        np.testing.assert_array_equal(state.recurrent[layer].conv[0], ckpt.recurrent[layer].conv[0, 0])
    arrays, _ = hybrid_store.export()
    assert [arrays[f"leaf_{i:03d}"].shape for i in range(4)] == [(16, 2, 3, 4), (16, 3, 5)] * 2


def test_inserted_checkpoints_come_back_bitwise_and_misses_are_zero(hybrid_store):
    ckpt = random_checkpoints(0, batch=2, slots=3)
    hybrid_store.insert(ckpt, rows=[0, 1, 1], ks=[2, 0, 1], slots=[5, 9, 0])
    state = hybrid_store.restore(slots=[9, -1, 5, 0], lengths=[4, 0, 8, 12])
    for layer, src in zip(state.recurrent, ckpt.recurrent):
        for got, full in ((layer.ssm, src.ssm), (layer.conv, src.conv)):
            assert got.dtype == full.dtype and got.shape == (4,) + full.shape[2:]
            np.testing.assert_array_equal(got[0], full[1, 0])
            np.testing.assert_array_equal(got[1], np.zeros(full.shape[2:], full.dtype))
            np.testing.assert_array_equal(got[2], full[0, 2])
            np.testing.assert_array_equal(got[3], full[1, 1])
    np.testing.assert_array_equal(state.length, [4, 0, 8, 12])
    assert state.kv[0].k.shape == (4, KV_LEN, 2, 3)


def test_padding_rows_of_a_bucket_never_touch_other_slots():
    store = StateStore(toy_abstract(kv=False), num_slots=8, page_size=PAGE)
    first = random_checkpoints(1, batch=1, slots=8)
    store.insert(first, rows=[0] * 8, ks=range(8), slots=range(8))
    second = random_checkpoints(2, batch=1, slots=1)
    store.insert(second, rows=[0], ks=[0], slots=[3])     # 1 row padded to a bucket of 8
    state = store.restore(slots=range(8), lengths=[1] * 8)
    for slot in range(8):
        want = second.recurrent[0].ssm[0, 0] if slot == 3 else first.recurrent[0].ssm[0, slot]
        np.testing.assert_array_equal(state.recurrent[0].ssm[slot], want)


def test_one_compilation_serves_every_move_count_within_a_bucket():
    store = StateStore(toy_abstract(kv=False), num_slots=32, page_size=PAGE)
    ckpt = random_checkpoints(3, batch=2, slots=4)
    before = _insert_rows._cache_size()
    for count in range(1, 9):
        store.insert(ckpt, rows=[0] * count, ks=[1] * count, slots=range(count))
    assert _insert_rows._cache_size() - before <= 1
    assert [move_bucket(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 32]


def test_kv_pages_round_trip_to_dense_buffers_and_share_by_reference(hybrid_store):
    kv = random_kv(4, batch=2)
    pages = hybrid_store.allocate_pages(5)
    # row 1's pages 0..4 (the last one partial: positions 16, 17)
    hybrid_store.write_pages(kv, rows=[1] * 5, seq_pages=range(5), pages=pages)
    hybrid_store.retain_pages(pages[:2])                      # a second entry shares 2 pages
    table = np.stack([pages, np.concatenate([pages[:2], [-1, -1, -1]])])
    state = hybrid_store.restore(slots=[-1, -1], lengths=[KV_LEN, 2 * PAGE], page_table=table)
    np.testing.assert_array_equal(state.kv[0].k[0], kv[0].k[1])
    np.testing.assert_array_equal(state.kv[0].v[0], kv[0].v[1])
    np.testing.assert_array_equal(state.kv[0].k[1, :2 * PAGE], kv[0].k[1, :2 * PAGE])
    assert hybrid_store.release_pages(pages) == 3             # the shared two stay live
    assert hybrid_store.release_pages(pages[:2]) == 2
    assert hybrid_store.pages_in_use == 0


def test_page_refs_refuse_overdraw_and_double_release_without_side_effects():
    refs = PageRefs(3)
    taken = refs.allocate(2)
    with pytest.raises(PoolExhausted):
        refs.allocate(2)
    assert refs.free == 1
    assert refs.release(taken) == 2
    with pytest.raises(ValueError, match="free page"):
        refs.release(taken[:1])
    with pytest.raises(ValueError, match="free page"):
        refs.retain(taken[:1])
    assert refs.free == 3 and refs.refcount.tolist() == [0, 0, 0]


def test_bad_arguments_are_refused_naming_the_problem():
    store = StateStore(toy_abstract(kv=False), num_slots=4, page_size=PAGE)
    ckpt = random_checkpoints(5, batch=1, slots=1)
    with pytest.raises(ValueError, match="slots must lie"):
        store.insert(ckpt, rows=[0], ks=[0], slots=[4])
    with pytest.raises(ValueError, match="equal lengths"):
        store.insert(ckpt, rows=[0, 0], ks=[0], slots=[1])
    with pytest.raises(ValueError, match="num_slots"):
        StateStore(toy_abstract(kv=False), num_slots=0, page_size=PAGE)
    with pytest.raises(TypeError, match="num_slots"):
        StateStore(toy_abstract(kv=False), num_slots=2.0, page_size=PAGE)


def test_concurrent_inserts_from_threads_all_land():
    store = StateStore(toy_abstract(kv=False), num_slots=32, page_size=PAGE)
    ckpts = [random_checkpoints(10 + i, batch=1, slots=1) for i in range(8)]
    _insert_rows(store._buffers.slabs, ckpts[0].recurrent,
                 pack_moves((np.zeros(0, np.int32),) * 3, 99), store.slab_packing)  # compile outside the race
    store.reset()

    def worker(i):
        for rep in range(4):
            store.insert(ckpts[i], rows=[0], ks=[0], slots=[4 * i + rep])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    state = store.restore(slots=range(32), lengths=[1] * 32)
    for slot in range(32):
        np.testing.assert_array_equal(state.recurrent[1].ssm[slot], ckpts[slot // 4].recurrent[1].ssm[0, 0])


def test_export_then_load_restores_buffers_and_refcounts_and_rejects_other_shapes():
    store = StateStore(toy_abstract(kv=True), num_slots=4, page_size=PAGE, num_pages=6)
    store.insert(random_checkpoints(6, batch=1, slots=2), rows=[0, 0], ks=[0, 1], slots=[1, 2])
    pages = store.allocate_pages(2)
    store.write_pages(random_kv(7, batch=1), rows=[0, 0], seq_pages=[0, 1], pages=pages)
    arrays, refcount = store.export()
    before = store.restore(slots=[1, 2], lengths=[8, 8], page_table=[pages, pages])
    other = StateStore(toy_abstract(kv=True), num_slots=4, page_size=PAGE, num_pages=6)
    other.load(arrays, refcount)
    after = other.restore(slots=[1, 2], lengths=[8, 8], page_table=[pages, pages])
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
    assert other.pages_in_use == 2
    smaller = StateStore(toy_abstract(kv=True), num_slots=3, page_size=PAGE, num_pages=6)
    with pytest.raises(ValueError, match="snapshot buffer"):
        smaller.load(arrays, refcount)
    assert smaller.pages_in_use == 0


def test_restore_writes_only_the_listed_pages_into_recycled_scratch(hybrid_store):
    kv = random_kv(8, batch=1)
    pages = hybrid_store.allocate_pages(2)
    hybrid_store.write_pages(kv, rows=[0, 0], seq_pages=[0, 1], pages=pages)
    stale = tuple(KVCache(k=jnp.full((1, KV_LEN, 2, 3), 7, jnp.bfloat16),
                          v=jnp.full((1, KV_LEN, 2, 3), 7, jnp.bfloat16)) for _ in kv)
    hybrid_store.recycle(stale)                       # e.g. a prefill's final KV, its pages stored
    state = hybrid_store.restore(slots=[-1], lengths=[2 * PAGE], page_table=[pages])
    np.testing.assert_array_equal(state.kv[0].k[0, :2 * PAGE], kv[0].k[0, :2 * PAGE])
    np.testing.assert_array_equal(state.kv[0].v[0, :2 * PAGE], kv[0].v[0, :2 * PAGE])
    np.testing.assert_array_equal(state.kv[0].k[0, 2 * PAGE:], 7)    # untouched: reused, not refilled
    hybrid_store.release_pages(pages)
    with pytest.raises(ValueError, match="recycled KV"):
        hybrid_store.recycle(random_kv(9, batch=1)[0])
    with pytest.raises(ValueError, match="page_table entries"):
        hybrid_store.restore(slots=[-1], lengths=[4], page_table=[[24]])
    with pytest.raises(ValueError, match="page_table must be"):
        hybrid_store.restore(slots=[-1], lengths=[4], page_table=[[0] * 6])


def test_the_restore_program_moves_pages_in_place_and_builds_nothing_of_max_length():
    """Only the donated scratch and in-place scatters into it have the [B, S, ...] shape: no fill,
    gather or copy of S positions per request (S = 4096 here, 3 pages restored). float32 KV: XLA on
    CPU widens writes into 16-bit float buffers to f32 over the whole buffer (see `_gather_state`)."""
    abstract = toy_abstract(kv=True)
    long_kv = tuple(KVCache(*(jax.ShapeDtypeStruct((1, 4096, 2, 3), jnp.float32),) * 2) for _ in abstract.kv)
    store = StateStore(abstract._replace(kv=long_kv), num_slots=4, page_size=PAGE, num_pages=8)
    moves = store._page_moves(1, [[5, 6, 7]])
    scratch = jax.tree_util.tree_map(lambda leaf: leaf, long_kv)
    packed = np.concatenate([np.zeros(1, np.int32), moves.reshape(-1)])
    hlo = _gather_state.lower(store._buffers.slabs, store._buffers.pools, scratch, packed, 1,
                              store.slab_packing, store.pool_packing).compile().as_text()
    assert "input_output_alias" in hlo
    producers = [line.split("=", 1)[1].split("(", 1)[0].split()[-1] + " " + line.split("=", 1)[0].strip()
                 for line in hlo.splitlines() if "= f32[1,4096," in line]
    assert producers and all(p.split()[0] == "parameter" or "scatter" in p for p in producers), producers


def test_moves_are_packed_into_one_bucketed_array_whose_padding_targets_the_dropped_index():
    rows, ks, slots = np.array([1, 0, 1]), np.array([2, 2, 0]), np.array([5, 6, 7])
    packed = pack_moves((rows, ks, slots), drop=99)
    assert packed.shape == (3, move_bucket(3)) and packed.dtype == np.int32
    np.testing.assert_array_equal(packed[:, :3], [rows, ks, slots])
    np.testing.assert_array_equal(packed[:, 3:], [[0] * 5, [0] * 5, [99] * 5])
    pages = pack_moves((rows, ks, slots), drop=4, drop_column=0)
    np.testing.assert_array_equal(pages[:, 3:], [[4] * 5, [0] * 5, [0] * 5])
