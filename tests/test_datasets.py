"""Loaders of the real data sets (QuALITY, System Prompts, ShareGPT) and their tokenised traces."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from sparse_prefix.experiments import datasets, requests
from sparse_prefix.paths import shared_dir
from sparse_prefix.traces import Request, load_trace

try:
    SHARED = shared_dir()
except FileNotFoundError:
    SHARED = None
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared (the real data) is absent")


# ------------------------------------------------------------------------------- pure text builders


def test_quality_request_text_follows_the_protocol_string():
    text, boundary = datasets.quality_request_text("Doc.", "Why?", ["a", "b", "c", "d"], 3)
    assert text == "Doc. Question: Why? Options: (A) a (B) b (C) c (D) d Answer: c"
    assert text[:boundary] == "Doc."


@pytest.mark.parametrize("options, gold", [(["a", "b", "c"], 1), (["a", "b", "c", "d"], 0),
                                           (["a", "b", "c", "d"], 5)])
def test_quality_request_text_rejects_bad_options_and_gold(options, gold):
    with pytest.raises(ValueError, match="options|gold_label"):
        datasets.quality_request_text("Doc.", "Q", options, gold)


def test_quality_records_dedupe_identical_requests_and_drop_singleton_groups():
    question = {"question": "Q1", "options": ["a", "b", "c", "d"], "gold_label": 1}
    other = {"question": "Q2", "options": ["a", "b", "c", "d"], "gold_label": 2}
    records = [
        {"article_id": "1", "article": "A", "questions": [question, other]},
        {"article_id": "1", "article": "A", "questions": [question]},          # a second set repeats Q1
        {"article_id": "2", "article": "B", **question},                        # hub layout, one question
    ]
    texts = datasets.quality_from_records(records)
    assert [t.group for t in texts] == ["1", "1"]
    assert [t.text.split(" Question: ")[1][:2] for t in texts] == ["Q1", "Q2"]


def test_quality_records_name_a_missing_field():
    with pytest.raises(ValueError, match="article_id"):
        datasets.quality_from_records([{"article": "A", "questions": []}])


def test_system_prompt_requests_deal_queries_round_robin_in_file_order():
    prompts = [("p0", "P0"), ("p1", "P1")]
    texts = datasets.system_prompt_requests(prompts, ["q0", "q1", "q2"], queries_per_prompt=2)
    assert [t.text for t in texts] == ["P0\n\nUser: q0", "P0\n\nUser: q1",
                                       "P1\n\nUser: q2", "P1\n\nUser: q0"]
    assert all(t.text[:t.boundary] == t.text[:2] for t in texts)


def test_system_prompt_requests_reject_a_bad_count():
    with pytest.raises(ValueError, match="queries_per_prompt"):
        datasets.system_prompt_requests([("p", "P")], ["q"], queries_per_prompt=0)


def test_first_groups_keeps_whole_groups_in_order():
    texts = [datasets.TextRequest(g, g + "x", 1) for g in ["a", "b", "a", "c", "b"]]
    assert [t.group for t in requests.first_groups(texts, 2)] == ["a", "b", "a", "b"]


class _CharTokenizer:
    """One token per character (ids = code points): hints are exact character offsets."""

    def encode(self, text):
        return np.asarray([ord(c) for c in text], dtype=np.int32)

    def positions_for_chars(self, text, chars):
        return list(chars)


def test_build_requests_puts_one_hint_at_the_boundary():
    texts = [datasets.TextRequest("g", "Doc. Question: Q", 4)]
    (request,) = requests.build_requests(texts, _CharTokenizer())
    assert request.hints == (4,) and request.length == len("Doc. Question: Q")


# ------------------------------------------------------------------------------- the shared data


@needs_shared
def test_quality_loader_counts_match_the_manifest():
    texts = datasets.load_quality()
    counts = collections.Counter(t.group for t in texts)
    assert len(texts) == 813 and len(counts) == 50
    assert min(counts.values()) >= 8 and max(counts.values()) <= 20
    assert len({(t.group, t.text) for t in texts}) == len(texts)


@needs_shared
def test_quality_first_request_text_is_exact():
    first = datasets.load_quality()[0]
    with open(SHARED / datasets.QUALITY_FILE, encoding="utf-8") as handle:
        record = json.loads(handle.readline())
    question = record["questions"][0]
    assert first.group == "52845" and first.text.startswith(record["article"])
    assert first.text[first.boundary:] == (
        " Question: How much time has passed between Blake's night with Eldoria and his search for "
        "Sabrina York in his mind-world? Options: (A) 7 years (B) 10 hours (C) 12 years (D) 1 hour "
        "Answer: 10 hours")
    assert question["gold_label"] == 2


@needs_shared
def test_system_prompt_filter_skips_readmes_old_raw_and_lengths():
    prompts = datasets.load_system_prompt_files()
    assert len(prompts) == 198  # 223 files within 5k-50k characters, minus README* and /old/, /raw/
    for name, text in prompts:
        assert datasets.PROMPT_MIN_CHARS <= len(text) <= datasets.PROMPT_MAX_CHARS
        assert not name.split("/")[-1].lower().startswith("readme")
        assert "/old/" not in f"/{name}" and "/raw/" not in f"/{name}"
    assert [name for name, _ in prompts] == sorted(name for name, _ in prompts)


@needs_shared
def test_sharegpt_queries_are_longer_than_ten_characters():
    queries = datasets.load_sharegpt_queries()
    assert len(queries) == 2828 and all(len(q) > 10 for q in queries)


@needs_shared
def test_system_prompts_give_thirty_requests_per_prompt():
    texts = datasets.load_system_prompts()
    counts = collections.Counter(t.group for t in texts)
    assert len(counts) == 198 and set(counts.values()) == {30}
    first_query = datasets.load_sharegpt_queries()[0]
    assert texts[0].text == texts[0].text[:texts[0].boundary] + "\n\nUser: " + first_query


@needs_shared
def test_tokenised_quality_slice_shares_the_document_up_to_the_hint(tmp_path):
    trace = requests.load_requests("quality", groups=2, cache_dir=tmp_path)
    again = requests.load_requests("quality", groups=2, cache_dir=tmp_path)  # from the cache
    assert len(list(tmp_path.iterdir())) == 1 and trace == again
    by_group = collections.defaultdict(list)
    for request in trace:
        by_group[request.group].append(request)
    assert len(by_group) == 2
    for members in by_group.values():
        hint = members[0].hints[0]
        assert all(r.hints == (hint,) for r in members)
        assert all(np.array_equal(r.tokens[:hint], members[0].tokens[:hint]) for r in members)
        assert all(r.length > hint + 10 for r in members)


@needs_shared
def test_export_trace_round_trips_through_jsonl(tmp_path):
    path = tmp_path / "traces" / "quality.jsonl"
    count = requests.export_trace(path, "quality", groups=1, cache=False)
    loaded = load_trace(path)
    assert count == len(loaded) > 1 and all(isinstance(r, Request) and r.hints for r in loaded)
