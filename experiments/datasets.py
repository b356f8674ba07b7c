"""Real data sets of the paper as request texts: QuALITY and System Prompts (+ ShareGPT queries).

Everything here is text; tokenisation, hints in tokens and caching live in `requests.py`.

A `TextRequest` is one request before tokenisation: its group (a document, a system prompt), its full
text, and ``boundary`` -- the character offset where the shared part ends (QuALITY: where
" Question: " starts; System Prompts: where "\\n\\nUser: " starts). The boundary becomes the request's
``+hints`` position once tokenised.

Request texts follow DESIGN.md's replay protocol:
  * QuALITY: ``article + " Question: " + q + " Options: (A) o1 (B) o2 (C) o3 (D) o4 Answer: " + gold``
    where ``gold`` is the TEXT of the gold option (``options[gold_label - 1]``): the paper appends the
    answer to the prompt, and the option text is what a model would generate after "Answer: ". The
    choice only changes the last few tokens of each request, never the shared prefix.
    Grouped by ``article_id``; identical request texts are deduplicated (an article is stored once per
    question set, and the hub copy repeats it once per question); groups with < 2 requests dropped.
  * System Prompts: a prompt file of 5,000-50,000 characters (not README*, no ``/old/`` or ``/raw/``
    directory; the match is literal, so ``OpenAI/Old/`` is kept, as the paper's string filter would)
    + ``"\\n\\nUser: "`` + a query. Prompt files are taken in sorted path order; queries are ShareGPT
    first turns longer than 10 characters in file order, dealt round-robin: one cycling iterator over
    the query list hands 30 consecutive queries to each prompt in turn (prompt p gets queries
    30p .. 30p+29, modulo the number of queries).

Data path: `data_dir` argument, else env ``SPARSE_PREFIX_SHARED``, else ``<repo>/../shared``.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sparse_prefix.paths import shared_dir

QUALITY_FILE = "data/quality/quality_dev_partial.jsonl"
SYSTEM_PROMPTS_DIR = "data/system_prompts"
SHAREGPT_FILE = "data/queries/sharegpt_first_turn.jsonl"
QUALITY_HUB_NAME = "tasksource/QuALITY"

OPTION_LETTERS = "ABCD"
QUESTION_MARKER = " Question: "
USER_MARKER = "\n\nUser: "
PROMPT_MIN_CHARS = 5_000
PROMPT_MAX_CHARS = 50_000
QUERY_MIN_CHARS = 10
QUERIES_PER_PROMPT = 30


@dataclass(frozen=True)
class TextRequest:
    """One request before tokenisation.

    Attributes:
      group: the sharing group (QuALITY article id; System Prompts prompt file path relative to the
        prompts folder).
      text: the full request text.
      boundary: character offset in `text` where the group's shared part ends (0 < boundary <= len).
    """

    group: str
    text: str
    boundary: int

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise ValueError(f"group must be a non-empty string, got {self.group!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"text must be a string, got {type(self.text).__name__}")
        if not 0 < self.boundary <= len(self.text):
            raise ValueError(f"boundary must lie in 1..len(text)={len(self.text)}, got {self.boundary}")


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The shared folder: `data_dir`, else env SPARSE_PREFIX_SHARED, else <repo>/../shared."""
    return shared_dir(data_dir)


def _require_file(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found at {path}; pass --data-dir or set SPARSE_PREFIX_SHARED")
    return path


# ----------------------------------------------------------------------------------------- QuALITY


def quality_request_text(article: str, question: str, options: Sequence[str], gold_label: int
                         ) -> tuple[str, int]:
    """The QuALITY request string and its document/question boundary (a character offset).

    Args:
      article: the document text.
      question: the question text.
      options: the four answer options.
      gold_label: 1-based index of the gold option.

    Returns:
      (text, boundary) with text[:boundary] == article.
    """
    if len(options) != len(OPTION_LETTERS):
        raise ValueError(f"options must have {len(OPTION_LETTERS)} entries, got {len(options)}")
    if not isinstance(gold_label, int) or not 1 <= gold_label <= len(options):
        raise ValueError(f"gold_label must be an int in 1..{len(options)}, got {gold_label!r}")
    if not article:
        raise ValueError("article must be non-empty")
    listed = " ".join(f"({letter}) {option}" for letter, option in zip(OPTION_LETTERS, options))
    text = f"{article}{QUESTION_MARKER}{question} Options: {listed} Answer: {options[gold_label - 1]}"
    return text, len(article)


def quality_from_records(records: Iterable[dict[str, Any]]) -> list[TextRequest]:
    """QuALITY requests from question-set records (the original schema) or flat per-question rows.

    A record either has ``questions`` (a list of {question, options, gold_label}) or is itself one
    question (``question``, ``options``, ``gold_label``; the hub's flattened layout). Requests keep
    first-seen order; identical (group, text) pairs are kept once; groups with fewer than 2 requests
    are dropped.

    Args:
      records: dicts with at least ``article_id`` and ``article``.

    Returns:
      The requests, grouped by article id in first-seen order of the groups.
    """
    by_group: dict[str, list[TextRequest]] = {}
    seen: set[tuple[str, str]] = set()
    for index, record in enumerate(records):
        for key in ("article_id", "article"):
            if key not in record:
                raise ValueError(f"QuALITY record {index} lacks the field {key!r}")
        group = str(record["article_id"])
        questions = record["questions"] if "questions" in record else [record]
        for question in questions:
            text, boundary = quality_request_text(record["article"], question["question"],
                                                  question["options"], int(question["gold_label"]))
            if (group, text) in seen:
                continue
            seen.add((group, text))
            by_group.setdefault(group, []).append(TextRequest(group, text, boundary))
    return [request for members in by_group.values() if len(members) >= 2 for request in members]


def load_quality(data_dir: str | os.PathLike | None = None) -> list[TextRequest]:
    """QuALITY requests from the shared partial dev file (813 questions over 50 articles)."""
    path = _require_file(resolve_data_dir(data_dir) / QUALITY_FILE, "QuALITY file")
    with open(path, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return quality_from_records(records)


def load_quality_hub(split: str = "validation") -> list[TextRequest]:
    """QuALITY requests from the Hugging Face hub copy `tasksource/QuALITY` (needs `datasets`, online).

    Args:
      split: "validation" (the dev set, as the shared file) or "train".
    """
    try:
        import datasets  # optional dependency, only for online users
    except ImportError as error:
        raise ImportError("loading QuALITY from the hub needs the `datasets` package: "
                          "pip install datasets (or use the shared offline file)") from error
    if split not in ("validation", "train"):
        raise ValueError(f"split must be 'validation' or 'train', got {split!r}")
    return quality_from_records(datasets.load_dataset(QUALITY_HUB_NAME, split=split))


# ----------------------------------------------------------------------------------- System Prompts


def _is_prompt_file(relative: pathlib.PurePosixPath, text: str) -> bool:
    if relative.name.lower().startswith("readme"):
        return False
    if "/old/" in f"/{relative.as_posix()}" or "/raw/" in f"/{relative.as_posix()}":
        return False
    return PROMPT_MIN_CHARS <= len(text) <= PROMPT_MAX_CHARS


def load_system_prompt_files(data_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The system prompt files that pass DESIGN's filter, as (relative path, text), sorted by path."""
    root = resolve_data_dir(data_dir) / SYSTEM_PROMPTS_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"system prompts folder not found at {root}; pass --data-dir or set "
                                "SPARSE_PREFIX_SHARED")
    prompts = []
    for path in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if not path.is_file():
            continue
        relative = pathlib.PurePosixPath(path.relative_to(root).as_posix())
        text = path.read_text(encoding="utf-8")
        if _is_prompt_file(relative, text):
            prompts.append((relative.as_posix(), text))
    return prompts


def load_sharegpt_queries(data_dir: str | os.PathLike | None = None,
                          min_chars: int = QUERY_MIN_CHARS) -> list[str]:
    """ShareGPT first user turns longer than `min_chars` characters, in file order."""
    path = _require_file(resolve_data_dir(data_dir) / SHAREGPT_FILE, "ShareGPT queries file")
    with open(path, encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle if line.strip()]
    return [text for text in texts if len(text) > min_chars]


def system_prompt_requests(prompts: Sequence[tuple[str, str]], queries: Sequence[str],
                           queries_per_prompt: int = QUERIES_PER_PROMPT) -> list[TextRequest]:
    """Requests `prompt + "\\n\\nUser: " + query`, queries dealt round-robin in file order.

    Args:
      prompts: (group name, prompt text) in the order to serve them.
      queries: the query pool; prompt p gets queries[(p * n + j) % len(queries)] for j < n.
      queries_per_prompt: n.

    Returns:
      len(prompts) * n requests, prompt by prompt.
    """
    if not isinstance(queries_per_prompt, int) or queries_per_prompt < 1:
        raise ValueError(f"queries_per_prompt must be a positive int, got {queries_per_prompt!r}")
    if prompts and not queries:
        raise ValueError("queries must be non-empty when there are prompts")
    requests = []
    cursor = 0
    for group, prompt in prompts:
        for _ in range(queries_per_prompt):
            query = queries[cursor % len(queries)]
            cursor += 1
            requests.append(TextRequest(group, f"{prompt}{USER_MARKER}{query}", len(prompt)))
    return requests


def load_system_prompts(data_dir: str | os.PathLike | None = None,
                        queries_per_prompt: int = QUERIES_PER_PROMPT) -> list[TextRequest]:
    """System Prompts requests from the shared folders (198 prompt files x 30 queries)."""
    return system_prompt_requests(load_system_prompt_files(data_dir), load_sharegpt_queries(data_dir),
                                  queries_per_prompt)


DATASETS = {"quality": load_quality, "system-prompts": load_system_prompts}


def load_texts(dataset: str, data_dir: str | os.PathLike | None = None) -> list[TextRequest]:
    """Text requests of a named data set ("quality" or "system-prompts")."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
    return DATASETS[dataset](data_dir)


def source_files(dataset: str, data_dir: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """The data files a data set is built from (for cache keys), sorted."""
    root = resolve_data_dir(data_dir)
    if dataset == "quality":
        return [root / QUALITY_FILE]
    if dataset == "system-prompts":
        prompts = sorted(p for p in (root / SYSTEM_PROMPTS_DIR).rglob("*") if p.is_file())
        return prompts + [root / SHAREGPT_FILE]
    raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
