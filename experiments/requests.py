"""Tokenised request traces of the real data sets, cached on disk, and their JSONL export.

`build_requests` turns `TextRequest`s into `sparse_prefix.traces.Request`s: the tokens of the whole
request text (tokenised as one string, as a server would) and one hint, the token position of the
group's shared-part boundary (QuALITY: document/question; System Prompts: prompt/user), counted as
the tokens that END at or before that character (a token straddling it is not counted, so the hint
is a prefix every request of the group shares token for token).

The default tokenizer is the Qwen BPE in ``<shared>/tokenizers/qwen.tiktoken`` (151,643 ranks, the
Qwen2/2.5/3 vocabulary). The paper tokenised with Qwen3.5's tokenizer, a larger vocabulary of the
same family that is not available offline; ours is the closest offline file, so our token counts
differ from the paper's by a few percent.

Tokenising System Prompts (~6k requests, ~24M tokens) takes tens of seconds, so traces are cached
under the user's cache folder (``$SPARSE_PREFIX_CACHE``, else ``$XDG_CACHE_HOME/sparse-prefix``,
else ``~/.cache/sparse-prefix``), never in the repo, keyed by a SHA-256 of the request texts, the
tokenizer file and this module's format version.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np

from sparse_prefix.experiments.datasets import TextRequest, load_quality_hub, load_texts
from sparse_prefix.traces import Request, save_trace

CACHE_FORMAT = 1
CACHE_ENV = "SPARSE_PREFIX_CACHE"


def default_cache_dir() -> pathlib.Path:
    """$SPARSE_PREFIX_CACHE, else $XDG_CACHE_HOME/sparse-prefix, else ~/.cache/sparse-prefix."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "sparse-prefix"


def tokenizer_file(tokenizer: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The file a tokenizer spec loads from (shared tiktoken file, or a tokenizer.json path)."""
    from sparse_prefix.paths import shared_file
    from sparse_prefix.tokenizers import TIKTOKEN_NAMES

    if not isinstance(tokenizer, str) or not tokenizer:
        raise ValueError(f"tokenizer must be a name or a path, got {tokenizer!r}")
    if tokenizer in TIKTOKEN_NAMES:
        return shared_file("tokenizers", f"{tokenizer}.tiktoken", data_dir=data_dir)
    path = pathlib.Path(tokenizer).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer {tokenizer!r} is neither a known name nor an existing tokenizer.json")
    return path


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trace_key(texts: Sequence[TextRequest], tokenizer_path: str | os.PathLike) -> str:
    """The cache key of a tokenised trace: SHA-256 of format, tokenizer file and every request."""
    digest = hashlib.sha256(f"sparse-prefix-trace-v{CACHE_FORMAT}\0".encode())
    digest.update(_sha256_file(pathlib.Path(tokenizer_path)).encode())
    for request in texts:
        for part in (request.group, str(request.boundary), request.text):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()


def build_requests(texts: Sequence[TextRequest], tokenizer) -> list[Request]:
    """Tokenise text requests; each gets one hint at its shared-part boundary (if it is >= 1 token).

    Args:
      texts: the text requests.
      tokenizer: a `sparse_prefix.tokenizers.Tokenizer` (encode, positions_for_chars).

    Returns:
      Requests in the same order, ``tokens`` int32[L], ``hints`` (boundary,) or ().
    """
    requests = []
    for text in texts:
        if not isinstance(text, TextRequest):
            raise TypeError(f"texts: expected TextRequest items, got {type(text).__name__}")
        tokens = tokenizer.encode(text.text)
        if tokens.size == 0:
            raise ValueError(f"a request of group {text.group!r} encodes to no tokens")
        (boundary,) = tokenizer.positions_for_chars(text.text, [text.boundary])
        requests.append(Request(text.group, tokens, (boundary,) if boundary >= 1 else ()))
    return requests


def _save_npz(path: pathlib.Path, requests: Sequence[Request]) -> None:
    lengths = np.asarray([r.length for r in requests], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    hints = np.asarray([r.hints[0] if r.hints else 0 for r in requests], dtype=np.int64)
    if any(len(r.hints) > 1 for r in requests):
        raise ValueError("the trace cache stores at most one hint per request")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp.npz", delete=False) as handle:
        np.savez(handle, tokens=np.concatenate([r.tokens for r in requests]), offsets=offsets,
                 hints=hints, groups=np.asarray([r.group for r in requests]))
    os.replace(handle.name, path)


def _load_npz(path: pathlib.Path) -> list[Request]:
    with np.load(path, allow_pickle=False) as data:
        tokens, offsets, hints, groups = data["tokens"], data["offsets"], data["hints"], data["groups"]
    return [Request(str(groups[i]), tokens[offsets[i]:offsets[i + 1]], (int(hints[i]),) if hints[i] else ())
            for i in range(len(groups))]


def load_texts_for(dataset: str, data_dir: str | os.PathLike | None = None, *, hub: bool = False
                   ) -> list[TextRequest]:
    """Text requests of `dataset`; ``hub=True`` reads QuALITY from the Hugging Face hub instead."""
    if hub:
        if dataset != "quality":
            raise ValueError(f"hub=True is only available for dataset 'quality', got {dataset!r}")
        return load_quality_hub()
    return load_texts(dataset, data_dir)


def load_requests(dataset: str, *, data_dir: str | os.PathLike | None = None, tokenizer: str = "qwen",
                  hub: bool = False, cache: bool = True, cache_dir: str | os.PathLike | None = None,
                  groups: int | None = None) -> list[Request]:
    """The tokenised trace of a real data set (file order), from the cache when possible.

    Args:
      dataset: "quality" or "system-prompts".
      data_dir: the shared folder (see `sparse_prefix.paths.shared_dir`).
      tokenizer: "qwen" (default), "gpt2", or a path to a Hugging Face tokenizer.json.
      hub: read QuALITY from the hub (`datasets` package, online) instead of the shared file.
      cache: read / write the on-disk cache.
      cache_dir: the cache folder (default `default_cache_dir()`).
      groups: keep only the first `groups` groups (a small slice for tests and quick runs).

    Returns:
      The requests.
    """
    from sparse_prefix.tokenizers import load_tokenizer

    texts = load_texts_for(dataset, data_dir, hub=hub)
    if groups is not None:
        texts = first_groups(texts, groups)
    if not cache:
        return build_requests(texts, load_tokenizer(tokenizer, data_dir=data_dir))
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{dataset}-{trace_key(texts, tokenizer_file(tokenizer, data_dir))[:32]}.npz"
    if path.is_file():
        return _load_npz(path)
    requests = build_requests(texts, load_tokenizer(tokenizer, data_dir=data_dir))
    _save_npz(path, requests)
    return requests


def first_groups(texts: Sequence[TextRequest], groups: int) -> list[TextRequest]:
    """The requests of the first `groups` groups (in first-appearance order)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    kept: dict[str, None] = {}
    for text in texts:
        if text.group not in kept and len(kept) < groups:
            kept[text.group] = None
    return [text for text in texts if text.group in kept]


def export_trace(path: str | os.PathLike, dataset: str, **kwargs) -> int:
    """Write a data set's pre-tokenised trace as JSONL (``tokens`` + ``hints`` lines) for machines
    without ../shared (e.g. the GPU machine; use an ignored folder such as ``traces/``).

    Args:
      path: the JSONL file to write.
      dataset: "quality" or "system-prompts".
      **kwargs: passed to `load_requests`.

    Returns:
      The number of requests written.
    """
    return save_trace(path, load_requests(dataset, **kwargs))
