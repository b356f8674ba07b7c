"""Requests, JSONL trace files (round trip, malformed lines), the replay protocol, tokenizers, paths."""

import json
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_prefix import paths
from sparse_prefix.traces import Request, load_trace, protocol_order, save_trace, split_warm

SHARED = paths.repo_root().parent / "shared"
needs_shared = pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="../shared is absent")


def _trace(n_groups=6, per_group=9, length=40):
    rng = np.random.default_rng(0)
    return [
        Request(f"g{g}", rng.integers(0, 100, size=length), hints=(5, length), meta={"k": k})
        for g in range(n_groups)
        for k in range(per_group)
    ]


def _write_lines(tmp_path, lines):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- Request ------------------------------------------------------------------------------------


def test_request_tokens_are_read_only_int32_and_hints_sorted_unique():
    request = Request("a", [3, 1, 2], hints=[3, 1, 3])
    assert request.tokens.dtype == np.int32 and not request.tokens.flags.writeable
    assert request.hints == (1, 3)
    with pytest.raises(ValueError):
        request.tokens[0] = 5


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"tokens": []}, ValueError),
        ({"tokens": [1, -2]}, ValueError),
        ({"tokens": [1.5, 2.0]}, TypeError),
        ({"hints": (0,)}, ValueError),
        ({"hints": (4,)}, ValueError),
        ({"hints": (1.0,)}, TypeError),
        ({"group": 3}, TypeError),
    ],
)
def test_request_rejects_bad_fields(kwargs, error):
    fields = {"group": "a", "tokens": [1, 2, 3]} | kwargs
    with pytest.raises(error):
        Request(**fields)


def test_pickled_request_stays_equal_and_read_only():
    import pickle

    request = Request("a", [3, 1, 2], hints=[2], text="abc", meta={"k": 1})
    copy = pickle.loads(pickle.dumps(request))
    assert copy == request and not copy.tokens.flags.writeable


def test_truncated_drops_hints_beyond_the_cut():
    request = Request("a", np.arange(10), hints=(2, 5, 9))
    cut = request.truncated(5)
    assert cut.length == 5 and cut.hints == (2, 5)
    assert request.truncated(10) is request


# --- trace files --------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    requests = _trace(n_groups=3, per_group=2)
    path = tmp_path / "sub" / "t.jsonl"
    assert save_trace(path, requests) == 6
    assert load_trace(path) == requests


@pytest.mark.parametrize("suffix", [".jsonl.xz", ".jsonl.gz"])
def test_compressed_traces_round_trip_and_xz_shrinks_repeated_prefixes(tmp_path, suffix):
    document = np.random.default_rng(0).integers(0, 150_000, size=20_000)
    requests = [Request("doc", np.concatenate([document, [i, i + 1]])) for i in range(5)]
    path = tmp_path / f"t{suffix}"
    assert save_trace(path, requests) == 5
    assert load_trace(path) == requests
    if suffix == ".jsonl.xz":
        plain = tmp_path / "t.jsonl"
        save_trace(plain, requests)
        assert path.stat().st_size < plain.stat().st_size / 3


def test_load_skips_blank_lines(tmp_path):
    path = _write_lines(tmp_path, ['{"group": "a", "tokens": [1, 2]}', "", "  ", '{"group": "b", "tokens": [3]}'])
    assert [r.group for r in load_trace(path)] == ["a", "b"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"group": "a", "tokens": [1, 2]', "not valid JSON"),
        ('[1, 2]', "JSON object"),
        ('{"tokens": [1, 2]}', "missing 'group'"),
        ('{"group": 7, "tokens": [1]}', "'group' must be"),
        ('{"group": "a", "tokens": [1], "text": "hi"}', "got both"),
        ('{"group": "a"}', "got neither"),
        ('{"group": "a", "tokens": [1, "2"]}', "integers only"),
        ('{"group": "a", "tokens": [1, 2.5]}', "integers only"),
        ('{"group": "a", "tokens": [1, true]}', "integers only"),
        ('{"group": "a", "tokens": [1, -4]}', "found -4"),
        ('{"group": "a", "tokens": []}', "empty"),
        ('{"group": "a", "tokens": [1, 2], "hints": [3]}', "position 3 is outside 1..2"),
        ('{"group": "a", "tokens": [1, 2], "hints": [0]}', "position 0"),
        ('{"group": "a", "tokens": [1, 2], "hints": "1"}', "'hints' must be a list"),
        ('{"group": "a", "tokens": [1, 2], "hint": [1]}', "unknown keys ['hint']"),
        ('{"group": "a", "text": "hello"}', "needs a tokenizer"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, bad_line, message):
    path = _write_lines(tmp_path, ['{"group": "a", "tokens": [1, 2]}', bad_line])
    with pytest.raises(ValueError) as info:
        load_trace(path)
    assert f"{path}: line 2: " in str(info.value)
    assert message in str(info.value)


def test_empty_and_missing_files_are_errors(tmp_path):
    with pytest.raises(ValueError, match="no requests"):
        load_trace(_write_lines(tmp_path, [""]))
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "absent.jsonl")


# --- replay protocol ----------------------------------------------------------------------------


def test_protocol_keeps_order_within_groups_and_all_requests():
    requests = _trace()
    ordered = protocol_order(requests, seed=3)
    assert sorted(id(r) for r in ordered) == sorted(id(r) for r in requests)
    by_group = defaultdict(list)
    for request in ordered:
        by_group[request.group].append(request.meta["k"])
    assert all(ks == sorted(ks) for ks in by_group.values())


def test_protocol_is_deterministic_per_seed_and_seeds_differ():
    requests = _trace()
    first = [id(r) for r in protocol_order(requests, seed=1)]
    assert first == [id(r) for r in protocol_order(requests, seed=1)]
    assert first != [id(r) for r in protocol_order(requests, seed=2)]


def test_protocol_limit_and_truncation():
    requests = _trace(length=40)
    ordered = protocol_order(requests, seed=0, limit=10, max_tokens=20)
    assert len(ordered) == 10
    assert all(r.length == 20 and r.hints == (5,) for r in ordered)


def test_protocol_interleaves_groups():
    groups = [r.group for r in protocol_order(_trace(n_groups=10, per_group=20), seed=0)]
    switches = sum(a != b for a, b in zip(groups, groups[1:]))
    assert switches > 50


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 400), st.sampled_from([0.6, 0.5, 0.0]))
def test_split_warm_sizes(n, fraction):
    items = list(range(n))
    if round(n * fraction) >= n:
        with pytest.raises(ValueError):
            split_warm(items, fraction)
        return
    warm, measured = split_warm(items, fraction)
    assert warm + measured == items and len(warm) == round(n * fraction)


def test_split_of_1000_is_600_400():
    warm, measured = split_warm(list(range(1000)))
    assert (len(warm), len(measured)) == (600, 400)


@pytest.mark.parametrize("kwargs", [{"seed": 1.5}, {"seed": 0, "limit": 0}, {"seed": 0, "max_tokens": -1}])
def test_protocol_rejects_bad_arguments(kwargs):
    with pytest.raises((TypeError, ValueError)):
        protocol_order(_trace(), **kwargs)


# --- paths and tokenizers -------------------------------------------------------------------------


def test_shared_dir_prefers_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_VAR, str(tmp_path))
    assert paths.shared_dir() == tmp_path.resolve()
    other = tmp_path / "other"
    other.mkdir()
    assert paths.shared_dir(other) == other.resolve()
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        paths.shared_dir(tmp_path / "missing")


@needs_shared
@pytest.mark.parametrize("name, ids", [("qwen", [9707, 1879]), ("gpt2", [15496, 995])])
def test_tiktoken_hello_world(name, ids):
    from sparse_prefix.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(name, data_dir=SHARED)
    encoded = tokenizer.encode("Hello world")
    assert encoded.dtype == np.int32 and encoded.tolist() == ids
    assert tokenizer.decode(encoded) == "Hello world"
    assert tokenizer.vocab_size > max(ids)


@needs_shared
def test_text_lines_tokenise_and_hint_chars_map_to_token_boundaries(tmp_path):
    from sparse_prefix.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("gpt2", data_dir=SHARED)
    text = "Hello world. Question: why?"
    boundary = text.index(" Question")
    path = _write_lines(tmp_path, [json.dumps({"group": "a", "text": text, "hint_chars": [boundary]})])
    (request,) = load_trace(path, tokenizer="gpt2", data_dir=SHARED)
    assert request.tokens.tolist() == tokenizer.encode(text).tolist()
    assert tokenizer.decode(request.tokens[: request.hints[0]]) == text[:boundary]


def test_unknown_tokenizer_name_is_a_value_error():
    from sparse_prefix.tokenizers import load_tokenizer

    with pytest.raises(ValueError, match="not one of qwen, gpt2"):
        load_tokenizer("no-such-tokenizer")


def test_hugging_face_tokenizer_json(tmp_path):
    hf = pytest.importorskip("tokenizers")
    from sparse_prefix.tokenizers import load_tokenizer

    model = hf.models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")
    built = hf.Tokenizer(model)
    built.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    built.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.encode("hello world zzz").tolist() == [1, 2, 0]
    assert tokenizer.positions_for_chars("hello world", [5, 6, 11]) == [1, 1, 2]
