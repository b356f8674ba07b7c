"""Offline tokenizers: tiktoken BPE files from the shared folder, or a Hugging Face ``tokenizer.json``.

``load_tokenizer("qwen")`` (the Qwen BPE, the paper's tokenizer family) and ``load_tokenizer("gpt2")``
read ``<shared>/tokenizers/<name>.tiktoken``; any path to a ``tokenizer.json`` (or a folder holding
one) loads through the optional ``tokenizers`` package. Every tokenizer offers the same small
surface: ``name``, ``vocab_size``, ``encode(text) -> int32[T]``, ``decode(ids)`` and
``positions_for_chars(text, chars)`` (character offsets -> token positions, for trace hints).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from sparse_prefix.paths import shared_file

# Pattern strings and special tokens as documented in ../shared/tokenizers/README.md.
_TIKTOKEN_SPECS = {
    "qwen": (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
        {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    ),
    "gpt2": (
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        {"<|endoftext|>": 50256},
    ),
}
TIKTOKEN_NAMES = tuple(_TIKTOKEN_SPECS)


@runtime_checkable
class Tokenizer(Protocol):
    """What the trace reader and the CLI need from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def positions_for_chars(self, text: str, chars: Sequence[int]) -> list[int]: ...


def _count_tokens_ending_by(token_ends: np.ndarray, boundaries: np.ndarray) -> list[int]:
    """For each boundary b, the number of tokens whose end offset is <= b (ends non-decreasing)."""
    return [int(n) for n in np.searchsorted(token_ends, boundaries, side="right")]


def _check_char_offsets(text: str, chars: Sequence[int]) -> np.ndarray:
    offsets = np.asarray(list(chars), dtype=np.int64)
    if offsets.size and (offsets.min() < 0 or offsets.max() > len(text)):
        raise ValueError(f"chars: offsets must lie in 0..{len(text)} (the text length), got {list(chars)}")
    return offsets


class TiktokenTokenizer:
    """A tiktoken `Encoding` with NumPy output. Special tokens in the text are encoded as plain text."""

    def __init__(self, name: str, encoding) -> None:
        self.name = name
        self.encoding = encoding
        self.vocab_size = int(encoding.n_vocab)

    def encode(self, text: str) -> np.ndarray:
        """Token ids int32[T] of `text` (no special-token parsing)."""
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of token ids (invalid UTF-8 at a cut is replaced)."""
        return self.encoding.decode([int(i) for i in ids])

    def positions_for_chars(self, text: str, chars: Sequence[int]) -> list[int]:
        """Token positions of character boundaries: for each offset c, how many tokens of
        ``encode(text)`` end at or before character c (a token straddling c is not counted)."""
        offsets = _check_char_offsets(text, chars)
        ids = self.encoding.encode_ordinary(text)
        token_bytes = [len(self.encoding.decode_single_token_bytes(i)) for i in ids]
        token_ends = np.cumsum(np.asarray(token_bytes, dtype=np.int64))
        byte_offsets = np.asarray([len(text[:c].encode("utf-8")) for c in offsets], dtype=np.int64)
        return _count_tokens_ending_by(token_ends, byte_offsets)

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.name!r}, vocab_size={self.vocab_size})"


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` loaded from a ``tokenizer.json`` file."""

    def __init__(self, name: str, tokenizer) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        """Token ids int32[T] of `text`, without added special tokens (BOS/EOS)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of token ids."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def positions_for_chars(self, text: str, chars: Sequence[int]) -> list[int]:
        """Token positions of character boundaries (see `TiktokenTokenizer.positions_for_chars`)."""
        offsets = _check_char_offsets(text, chars)
        spans = self.tokenizer.encode(text, add_special_tokens=False).offsets
        token_ends = np.asarray([end for _, end in spans], dtype=np.int64)
        if token_ends.size:
            token_ends = np.maximum.accumulate(token_ends)
        return _count_tokens_ending_by(token_ends, offsets)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


@functools.lru_cache(maxsize=8)
def _load_tiktoken(name: str, path: str) -> TiktokenTokenizer:
    import tiktoken
    import tiktoken.load

    pat_str, special_tokens = _TIKTOKEN_SPECS[name]
    ranks = tiktoken.load.load_tiktoken_bpe(path)
    encoding = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens)
    return TiktokenTokenizer(name, encoding)


@functools.lru_cache(maxsize=8)
def _load_hf(path: str) -> HFTokenizer:
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            f"loading {path} needs the Hugging Face `tokenizers` package: pip install tokenizers"
        ) from err
    return HFTokenizer(Path(path).parent.name or path, tokenizers.Tokenizer.from_file(path))


def load_tokenizer(name: str = "qwen", data_dir: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer offline (cached per process).

    Args:
      name: ``"qwen"`` or ``"gpt2"`` (tiktoken files in ``<shared>/tokenizers``), or a path to a Hugging
        Face ``tokenizer.json`` or to a folder that holds one.
      data_dir: the shared folder (see `sparse_prefix.paths.shared_dir`); used for qwen / gpt2 only.

    Returns:
      A `Tokenizer`.

    Raises:
      ValueError: `name` is neither a known tiktoken name nor an existing tokenizer.json path.
      FileNotFoundError: the shared folder or the BPE file is missing.
      ImportError: a tokenizer.json was given but the ``tokenizers`` package is not installed.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"tokenizer: expected a name or a path, got {name!r}")
    if name in _TIKTOKEN_SPECS:
        return _load_tiktoken(name, str(shared_file("tokenizers", f"{name}.tiktoken", data_dir=data_dir)))
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file() and path.suffix == ".json":
        return _load_hf(str(path.resolve()))
    raise ValueError(
        f"tokenizer: {name!r} is not one of {', '.join(TIKTOKEN_NAMES)} nor an existing tokenizer.json "
        "file (or a folder holding one)"
    )
