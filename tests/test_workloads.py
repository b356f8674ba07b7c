"""Built-in synthetic workloads: determinism, sizes, and the designed overlap structure."""

from collections import defaultdict

import numpy as np
import pytest

from sparse_prefix.workloads import WORKLOADS, build_workload


def lcp(a, b):
    n = min(a.size, b.size)
    mismatch = np.flatnonzero(a[:n] != b[:n])
    return int(mismatch[0]) if mismatch.size else n


def grouped(requests):
    groups = defaultdict(list)
    for request in requests:
        groups[request.group].append(request)
    return groups


@pytest.fixture(scope="module")
def built():
    return {name: builder(7, scale=0.2) for name, builder in WORKLOADS.items()}


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_deterministic_per_seed_and_seeds_differ(name, built):
    again = WORKLOADS[name](7, scale=0.2)
    assert again == built[name]
    assert WORKLOADS[name](8, scale=0.2) != built[name]


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_group_has_several_requests_within_the_protocol_cut(name, built):
    for members in grouped(built[name]).values():
        assert len(members) >= 2
    assert all(1 <= r.length <= 16384 for r in built[name])


def test_documents_share_exactly_the_document_and_hint_it(built):
    for members in grouped(built["documents"]).values():
        boundary = members[0].hints[0]
        assert 4000 <= boundary <= 8000 and 10 <= len(members) <= 20
        for a in members:
            assert a.hints == (boundary,) and 20 <= a.length - boundary <= 60
            for b in members:
                if a is not b:
                    assert lcp(a.tokens, b.tokens) == boundary


def test_system_prompts_thirty_queries_per_prompt(built):
    for members in grouped(built["system-prompts"]).values():
        assert len(members) == 30
        boundary = members[0].hints[0]
        assert 1000 <= boundary <= 12000
        assert all(10 <= r.length - boundary <= 300 for r in members)
        assert lcp(members[0].tokens, members[1].tokens) == boundary


def test_chat_each_turn_extends_the_previous_request(built):
    for members in grouped(built["chat"]).values():
        for previous, current in zip(members, members[1:]):
            assert current.length > previous.length
            assert np.array_equal(current.tokens[: previous.length], previous.tokens)
            assert previous.length in current.hints and current.hints[-1] == current.length


def test_agent_tree_nodes_extend_their_parent_and_siblings_share_it(built):
    for members in grouped(built["agent-tree"]).values():
        root = members[0]
        for node in members[1:]:
            parent_length = node.hints[-2]
            parent = next(m for m in members if m.length == parent_length)
            assert np.array_equal(node.tokens[:parent_length], parent.tokens)
            assert lcp(node.tokens, root.tokens) == root.length
        siblings = defaultdict(list)
        for node in members[1:]:
            siblings[node.hints[-2]].append(node)
        for parent_length, kids in siblings.items():
            for a, b in zip(kids, kids[1:]):
                assert lcp(a.tokens, b.tokens) == parent_length


def test_uniform_overlap_is_min_of_copied_depths_and_spread(built):
    depths_over_length = []
    for members in grouped(built["uniform"]).values():
        for a, b in zip(members, members[1:]):
            assert lcp(a.tokens, b.tokens) == min(a.meta["depth"], b.meta["depth"])
        depths_over_length += [r.meta["depth"] / r.length for r in members]
    histogram = np.histogram(depths_over_length, bins=4, range=(0, 1))[0]
    assert histogram.min() > 0.1 * len(depths_over_length)


def test_unknown_workload_and_bad_scale_are_errors():
    with pytest.raises(ValueError, match="documents"):
        build_workload("nope")
    with pytest.raises(ValueError, match="scale"):
        build_workload("documents", scale=0)
