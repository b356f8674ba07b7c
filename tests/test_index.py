"""PrefixIndex: exact LCP vs a naive scan, collisions, resume choice, capture modes, eviction, refcounts."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_prefix import Planner
from sparse_prefix.index import CommitResult, PrefixIndex, RequestPlan
from sparse_prefix.prefix_trie import common_prefix


def naive_lcp(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def naive_lookup(tokens, group, retained):
    """(resume position, overlap, match, group lcp) by scanning every retained entry of the group."""
    best = (0, 0, -1)
    group_lcp = 0
    for entry_id, (entry_group, entry_tokens, checkpoints) in retained.items():
        if entry_group != group:
            continue
        lcp = naive_lcp(tokens, entry_tokens)
        group_lcp = max(group_lcp, lcp)
        if lcp:
            best = max(best, (0, lcp, entry_id))
        for position, _ in checkpoints:
            if position <= min(lcp, len(tokens) - 1):
                best = max(best, (position, lcp, entry_id))
    resume, overlap, match = best
    return resume, overlap, (None if match < 0 else match), group_lcp


def random_request(rng, previous, alphabet=3, max_len=24):
    """A request sharing a random prefix with an earlier one (a random trie), or a fresh one."""
    if previous and rng.random() < 0.8:
        base = previous[rng.integers(len(previous))]
        keep = int(rng.integers(0, len(base) + 1))
        tail = rng.integers(0, alphabet, size=int(rng.integers(0 if keep else 1, 10)))
        return np.concatenate([base[:keep], tail]).astype(np.int32)
    return rng.integers(0, alphabet, size=int(rng.integers(1, max_len))).astype(np.int32)


def replay_against_naive(seed, block_size, capacity, hash_fn, capture="one-pass", eviction="fifo"):
    rng = np.random.default_rng(seed)
    index = PrefixIndex(capacity_entries=capacity, block_size=block_size, hash_fn=hash_fn,
                        capture=capture, eviction=eviction)
    planner = Planner("block:3+fork+hints", max_length=64)
    retained, previous = {}, []
    for _ in range(30):
        tokens = random_request(rng, previous)
        group = ["a", "b"][int(rng.integers(2))]
        hints = [int(h) for h in rng.integers(1, len(tokens) + 1, size=1)]
        plan = index.plan(tokens, group, hints, planner)
        resume, overlap, match, group_lcp = naive_lookup(tokens, group, retained)
        assert (plan.resume_position, plan.overlap, plan.match, plan.lcp) == (
            resume, overlap, match, group_lcp)
        assert plan.hit == (overlap > 0) and plan.recomputed_tokens == len(tokens) - resume
        if match is not None and resume:
            assert plan.resume_slot == dict(retained[match][2])[resume]
        result = index.commit(plan)
        for victim in result.evicted:
            del retained[victim.entry_id]
        retained[result.entry_id] = (group, tokens, index.entries()[-1].checkpoints)
        assert {e.entry_id for e in index.entries()} == set(retained)
        previous.append(tokens)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31), block_size=st.sampled_from([1, 2, 3, 5, 64]),
       capacity=st.integers(1, 8), eviction=st.sampled_from(["fifo", "lru", "utility"]))
def test_lookup_matches_a_naive_scan_on_random_tries(seed, block_size, capacity, eviction):
    replay_against_naive(seed, block_size, capacity, None, eviction=eviction)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31), block_size=st.sampled_from([1, 2, 4]),
       hash_fn=st.sampled_from([lambda block: 0, lambda block: int(block.size),
                                lambda block: int(block.sum()) % 2]))
def test_forced_hash_collisions_never_give_a_false_hit(seed, block_size, hash_fn):
    replay_against_naive(seed, block_size, 6, hash_fn)


def test_many_entries_diverging_inside_one_block_give_the_exact_lcp_as_they_come_and_go():
    """A shared 100-token prompt, then different questions: every entry diverges inside the block
    64..127, so the LCP comes from comparing the request with every child of one node, as entries
    are added and evicted."""
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 5, 100)
    index = PrefixIndex(capacity_entries=12, block_size=64, eviction="fifo")
    kept = {}
    for _ in range(60):
        tokens = np.concatenate([prompt, rng.integers(0, 3, int(rng.integers(1, 40)))]).astype(np.int32)
        plan = index.plan(tokens, "g")
        assert plan.lcp == max((common_prefix(tokens, other) for other in kept.values()), default=0)
        result = index.commit(plan)
        for victim in result.evicted:
            del kept[victim.entry_id]
        kept[result.entry_id] = tokens


def test_colliding_blocks_are_told_apart_by_their_tokens():
    index = PrefixIndex(capacity_entries=4, block_size=2, hash_fn=lambda block: "same")
    index.commit(index.plan([1, 1, 1, 1], "g"))
    miss = index.plan([2, 2, 2, 2], "g")
    assert miss.match is None and miss.overlap == 0 and miss.lcp == 0
    partial = index.plan([1, 1, 1, 2], "g")
    assert partial.lcp == 3


def test_a_request_ending_inside_a_block_matches_longer_siblings():
    index = PrefixIndex(capacity_entries=4, block_size=4)
    index.commit(index.plan([7, 8], "g"))
    longer = index.commit(index.plan([7, 8, 9], "g")).entry_id
    plan = index.plan([7, 8], "g")  # equal to the first entry, a prefix of the newer one
    assert (plan.match, plan.overlap, plan.lcp) == (longer, 2, 2)


def test_groups_isolate_entries():
    index = PrefixIndex(capacity_entries=4)
    index.commit(index.plan([5, 6, 7], "a"))
    assert index.plan([5, 6, 7], "b").lcp == 0
    assert index.plan([5, 6, 7], "a").lcp == 3
    assert index.plan([5, 6, 7]).lcp == 0  # group None is a group of its own


def hinted(index, tokens, hints, group="g", **kwargs):
    planner = Planner("none+hints", max_length=1000)
    plan = index.plan(tokens, group, hints, planner, **kwargs)
    return plan, index.commit(plan)


def test_resume_choice_maximises_resume_position_then_lcp():
    base = np.arange(100, 140)
    index = PrefixIndex(capacity_entries=8, block_size=4)
    _, a = hinted(index, base[:30], [4])                                   # deep LCP, shallow ckpt
    _, b = hinted(index, np.concatenate([base[:12], [1] * 10]), [10])      # LCP 12, ckpt at 10
    plan = index.plan(base[:35], "g")
    assert (plan.lcp, plan.resume_position, plan.match, plan.overlap) == (30, 10, b.entry_id, 12)
    assert plan.resume_slot == b.slots[0]


def test_resume_ties_go_to_the_larger_lcp_then_the_newest_entry():
    base = np.arange(100, 140)
    index = PrefixIndex(capacity_entries=8, block_size=4)
    _, x = hinted(index, np.concatenate([base[:12], [1] * 10]), [10])  # checkpoint (10, s)
    _, y = hinted(index, np.concatenate([base[:20], [3] * 3]), [])     # inherits (10, s), LCP 20
    assert index.entries()[-1].checkpoints == ((10, x.slots[0]),)
    plan = index.plan(base[:25], "g")
    assert (plan.resume_position, plan.match, plan.overlap) == (10, y.entry_id, 20)
    _, z = hinted(index, np.concatenate([base[:20], [4] * 3]), [])     # same (10, LCP 20), newer
    plan = index.plan(base[:25], "g")
    assert (plan.resume_position, plan.match, plan.overlap) == (10, z.entry_id, 20)
    assert plan.resume_slot == x.slots[0] and index.refcounts() == {x.slots[0]: 3}


def test_resume_position_never_reaches_the_last_token():
    index = PrefixIndex(capacity_entries=2)
    hinted(index, [1, 2, 3, 4], [2, 4])
    plan = index.plan([1, 2, 3, 4], "g")
    assert plan.overlap == 4 and plan.resume_position == 2
    assert plan.inherited == ((2, 0), (4, 1))  # one-pass inherits up to min(LCP, L)
    assert plan.recomputed_tokens == 2


def test_no_checkpoint_resume_entry_is_the_newest_of_maximal_lcp():
    index = PrefixIndex(capacity_entries=4, block_size=2)
    first = index.commit(index.plan([1, 2, 3, 9], "g")).entry_id
    second = index.commit(index.plan([1, 2, 3, 8], "g")).entry_id
    index.commit(index.plan([1, 2, 7], "g"))
    plan = index.plan([1, 2, 3, 4, 5], "g")
    assert (plan.match, plan.overlap, plan.resume_position, plan.resume_slot) == (second, 3, 0, None)
    assert first != second


def test_one_pass_and_separate_capture_on_a_three_request_example():
    t = list(range(1, 30))
    requests = [t[:10], t[:16], t[:14] + [80] * 4]
    results = {}
    for capture in ("one-pass", "separate"):
        index = PrefixIndex(capacity_entries=8, capture=capture, block_size=4)
        planner = Planner("block:4", max_length=64)
        plans, commits = [], []
        for tokens in requests:
            plans.append(index.plan(tokens, "g", (), planner))
            commits.append(index.commit(plans[-1]))
        results[capture] = (plans, commits, index.resident_checkpoints)
    plans, commits, resident = results["one-pass"]
    assert [p.emit_positions.tolist() for p in plans] == [[4, 8], [12, 16], [16]]
    assert [c.slots for c in commits] == [(0, 1), (2, 3), (4,)]
    assert plans[1].inherited == ((4, 0), (8, 1)) and plans[1].resume_slot == 1
    assert plans[2].inherited == ((4, 0), (8, 1), (12, 2)) and plans[2].resume_slot == 2
    assert [p.resume_position for p in plans] == [0, 8, 12]
    assert resident == 5
    plans, commits, resident = results["separate"]
    assert [p.emit_positions.tolist() for p in plans] == [[4, 8], [4, 8, 12, 16], [4, 8, 12, 16]]
    assert all(p.inherited == () for p in plans)
    assert [p.resume_position for p in plans] == [0, 8, 12]
    assert plans[2].resume_slot == commits[1].slots[2]
    assert resident == 10


def test_an_identical_request_is_a_new_entry_sharing_every_state():
    index = PrefixIndex(capacity_entries=4)
    planner = Planner("block:4", max_length=64)
    first = index.commit(index.plan(list(range(1, 9)), "g", (), planner))
    plan = index.plan(list(range(1, 9)), "g", (), planner)
    assert (plan.overlap, plan.resume_position) == (8, 4)  # the last token is always computed
    assert plan.inherited == ((4, first.slots[0]), (8, first.slots[1]))
    assert plan.emit_positions.tolist() == []  # 8 is inherited, not emitted again
    second = index.commit(plan)
    assert second.entry_id != first.entry_id and second.slots == ()
    assert index.stats()["entries"] == 2 and index.refcounts() == {0: 2, 1: 2}


def test_plan_observes_before_asking_for_positions():
    calls = []

    class Recorder:
        def observe(self, overlap, length):
            calls.append(("observe", overlap, length))

        def positions(self, length, overlap, hints):
            calls.append(("positions", length, overlap, tuple(hints)))
            return np.array([2, length])

    index = PrefixIndex(capacity_entries=2, grid=2)
    index.commit(index.plan([1, 2, 3], "g", planner=Recorder()))
    plan = index.plan([1, 2, 4, 5, 6], "g", hints=[3], planner=Recorder())
    assert calls[-2:] == [("observe", 2, 5), ("positions", 5, 2, (3,))]
    assert plan.positions.tolist() == [2, 4]  # snapped to the index grid
    assert plan.emit_positions.tolist() == [4] and plan.inherited == ((2, 0),)


def test_fifo_and_lru_evict_in_their_orders():
    for eviction, survivor in (("fifo", "b"), ("lru", "a")):
        index = PrefixIndex(capacity_entries=2, eviction=eviction)
        ids = {}
        ids["a"] = index.commit(index.plan([1, 1, 1], "g")).entry_id
        ids["b"] = index.commit(index.plan([2, 2, 2], "g")).entry_id
        result = index.commit(index.plan([1, 1, 5], "g"))  # resumes from a: touches it under lru
        kept = {e.entry_id for e in index.entries()}
        assert kept == {ids[survivor], result.entry_id}, eviction
        assert [v.entry_id for v in result.evicted] == [ids["b" if survivor == "a" else "a"]]


def test_utility_eviction_weighs_efficiency_against_recency():
    def fill(alpha, utility_fn=None):
        index = PrefixIndex(capacity_entries=3, eviction="utility", utility_alpha=alpha,
                            utility_fn=utility_fn)
        a = hinted(index, [1] * 40, [32], group="a")[1].entry_id   # 32 tokens per state
        b = hinted(index, [2] * 40, [4, 8], group="b")[1].entry_id  # 4 per state
        c = hinted(index, [3] * 40, [], group="c")[1].entry_id      # no state
        victim = hinted(index, [4] * 40, [], group="d")[1].evicted[0].entry_id
        return victim, (a, b, c)

    victim, (a, b, c) = fill(1.0)
    assert victim == c
    victim, (a, b, c) = fill(0.0)
    assert victim == a  # least recently used
    victim, (a, b, c) = fill(1.0, utility_fn=lambda info: -info.length - len(info.checkpoints))
    assert victim == b


def test_pinned_entries_survive_eviction_and_a_full_pinned_index_drops_the_new_entry():
    index = PrefixIndex(capacity_entries=2)
    a = hinted(index, [1, 2, 3, 4], [2])[1].entry_id
    pinned = index.plan([1, 2, 3, 4, 5], "g", pin=True)
    assert pinned.pinned and pinned.match == a
    b = hinted(index, [7, 7, 7], [1])[1].entry_id
    third = hinted(index, [8, 8, 8], [1])[1]
    assert [v.entry_id for v in third.evicted] == [b]  # a is pinned: the next oldest goes
    result = index.commit(pinned)  # unpins a, evicts it, keeps its inherited state alive
    assert [v.entry_id for v in result.evicted] == [a] and result.freed_slots == ()
    assert index.entries()[-1].checkpoints[0] == (2, 0) and index.refcounts()[0] == 1
    full = PrefixIndex(capacity_entries=1)
    hinted(full, [1, 2, 3], [1])
    held = full.plan([1, 2, 3, 4], "g", pin=True)
    dropped = hinted(full, [5, 5], [1])[1]
    assert dropped == CommitResult(None, (), (), ()) and full.stats()["dropped"] == 1
    full.abort(held)
    assert hinted(full, [5, 5], [1])[1].entry_id is not None


def test_more_states_than_slot_capacity_drops_the_entry():
    index = PrefixIndex(capacity_entries=4, capacity_slots=2)
    result = hinted(index, [1, 2, 3, 4], [1, 2, 3])[1]
    assert result.entry_id is None and index.resident_checkpoints == 0
    assert hinted(index, [1, 2, 3, 4], [1, 2])[1].slots == (0, 1)


def check_invariants(index, live):
    refcounts = index.refcounts()
    assert set(refcounts) == live
    holders = {}
    for entry in index.entries():
        for _, slot in entry.checkpoints:
            holders[slot] = holders.get(slot, 0) + 1
    assert holders == refcounts
    stats = index.stats()
    assert stats["entries"] <= index.capacity_entries
    if index.capacity_slots is not None:
        assert stats["resident_states"] <= index.capacity_slots
        assert all(0 <= s < index.capacity_slots for s in live)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 31), capacity=st.integers(1, 6), slots=st.integers(3, 20),
       eviction=st.sampled_from(["fifo", "lru", "utility"]))
def test_refcounted_slots_are_freed_exactly_once(seed, capacity, slots, eviction):
    rng = np.random.default_rng(seed)
    index = PrefixIndex(capacity_entries=capacity, capacity_slots=slots, eviction=eviction,
                        block_size=2)
    planner = Planner("block:6+fork", max_length=64)
    live, open_plans, previous = set(), [], []
    for _ in range(40):
        if open_plans and rng.random() < 0.5:
            plan = open_plans.pop(int(rng.integers(len(open_plans))))
            if rng.random() < 0.2:
                index.abort(plan)
                continue
            result = index.commit(plan, payload=plan.length)
            for slot in result.freed_slots:
                assert slot in live
                live.remove(slot)
            for slot in result.slots:
                assert slot not in live
                live.add(slot)
            assert len(result.slots) == (len(plan.emit_positions) if result.entry_id is not None else 0)
            assert all(v.payload is not None for v in result.evicted)
        else:
            tokens = random_request(rng, previous)
            previous.append(tokens)
            open_plans.append(index.plan(tokens, "g", (), planner, pin=bool(rng.random() < 0.5)))
        check_invariants(index, live)
    for plan in open_plans:
        index.abort(plan)
    assert index.stats()["open_plans"] == 0
    assert all(e.pins == 0 for e in index.entries())


def test_threads_doing_plan_and_commit_keep_the_invariants():
    index = PrefixIndex(capacity_entries=8, capacity_slots=40, block_size=4)
    planner = Planner("dp:2+fork", bin_size=8, resolve_every=5, max_length=64)
    shared = np.arange(1, 40, dtype=np.int32)
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(25):
                tokens = np.concatenate([shared[: rng.integers(0, 39)], rng.integers(0, 4, size=5)])
                plan = index.plan(tokens, "g", (), planner, pin=True)
                index.commit(plan)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    check_invariants(index, set(index.refcounts()))
    stats = index.stats()
    assert stats["commits"] == stats["lookups"] == 100 and stats["open_plans"] == 0
    assert planner.observations == 100


def test_lookup_probes_are_bounded_by_request_blocks_not_entries():
    probes = []

    def counting(block):
        probes.append(1)
        return hash(block.tobytes())

    index = PrefixIndex(capacity_entries=200, block_size=8, hash_fn=counting)
    shared = np.arange(1, 257, dtype=np.int32)
    for k in range(100):
        index.commit(index.plan(np.concatenate([shared, [1000 + k] * 9]), "g"))
    probes.clear()
    plan = index.plan(np.concatenate([shared, [5000] * 64]), "g")
    assert plan.lcp == 256
    assert len(probes) <= 320 // 8 + 1


def test_commit_and_abort_accept_each_plan_once():
    index, other = PrefixIndex(capacity_entries=2), PrefixIndex(capacity_entries=2)
    plan = index.plan([1, 2], "g")
    index.commit(plan)
    with pytest.raises(ValueError, match="already committed"):
        index.commit(plan)
    with pytest.raises(ValueError, match="already committed or aborted"):
        index.abort(plan)
    other.plan([3], "g")  # same serial number in another index
    with pytest.raises(ValueError, match="another index"):
        other.commit(plan)
    with pytest.raises(TypeError, match="RequestPlan"):
        index.commit("plan")
    assert isinstance(plan, RequestPlan) and not plan.tokens.flags.writeable


@pytest.mark.parametrize("tokens, error", [([], ValueError), ([[1, 2]], ValueError),
                                           ([1.0, 2.0], TypeError), ([-1, 2], ValueError),
                                           ([2 ** 31], ValueError)])
def test_plan_rejects_bad_tokens(tokens, error):
    with pytest.raises(error, match="tokens"):
        PrefixIndex(capacity_entries=1).plan(tokens)


def test_validated_rows_are_kept_and_anything_else_is_checked_and_copied():
    from sparse_prefix.request_checks import check_row

    index = PrefixIndex(capacity_entries=2)
    row = check_row([5, 6, 7], "tokens", vocab_size=8, max_length=8)
    assert row.dtype == np.int32 and not row.flags.writeable
    assert index.plan(row, validated=True).tokens is row          # the engine's checked row: no copy
    writable = np.array([5, 6, 7], np.int32)
    kept = index.plan(writable, validated=True).tokens             # a caller could still write to it
    assert kept is not writable and not kept.flags.writeable
    writable[0] = 0
    assert kept.tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="tokens"):                 # the flag does not skip the checks
        index.plan(np.array([-1, 2], np.int64), validated=True)


def test_plan_rejects_bad_group_pin_and_planner_output():
    index = PrefixIndex(capacity_entries=1)
    with pytest.raises(TypeError, match="group"):
        index.plan([1], ["unhashable"])
    with pytest.raises(TypeError, match="pin"):
        index.plan([1], pin=1)

    class Broken:
        def observe(self, overlap, length):
            pass

        def positions(self, length, overlap, hints):
            return np.array([length + 1])

    with pytest.raises(ValueError, match="not integers in 1..2"):
        index.plan([1, 2], planner=Broken())
    Broken.positions = lambda self, length, overlap, hints: np.array([0, 1])
    with pytest.raises(ValueError, match="not integers in 1..2"):
        index.plan([1, 2], planner=Broken())
    Broken.positions = lambda self, length, overlap, hints: np.array([1.0])
    with pytest.raises(ValueError, match="not integers"):
        index.plan([1, 2], planner=Broken())


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(capacity_entries=0), ValueError, "capacity_entries"),
    (dict(capacity_entries=1.5), TypeError, "capacity_entries"),
    (dict(capacity_entries=1, capacity_slots=0), ValueError, "capacity_slots"),
    (dict(capacity_entries=1, eviction="random"), ValueError, "eviction"),
    (dict(capacity_entries=1, capture="two-pass"), ValueError, "capture"),
    (dict(capacity_entries=1, grid=0), ValueError, "grid"),
    (dict(capacity_entries=1, block_size=0), ValueError, "block_size"),
    (dict(capacity_entries=1, utility_alpha=1.5), ValueError, "utility_alpha"),
    (dict(capacity_entries=1, hash_fn=3), TypeError, "hash_fn"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word):
        PrefixIndex(**kwargs)


def test_evict_removes_the_next_unpinned_victim_and_frees_its_slots():
    index = PrefixIndex(capacity_entries=4)
    first = hinted(index, [1, 2, 3], [1])[1]
    second = hinted(index, [4, 5, 6], [2])[1]
    held = index.plan([1, 2, 3, 9], "g", pin=True)
    evicted = index.evict()
    assert evicted.entry_id == second.entry_id and index.refcounts() == {first.slots[0]: 1}
    assert index.evict() is None  # the only entry left is pinned
    index.abort(held)
    assert index.evict().entry_id == first.entry_id and index.resident_checkpoints == 0
    assert index.stats()["evictions"] == 2
