"""Built-in synthetic workload families (token ids, no data needed), deterministic by seed.

Every builder is ``builder(seed, scale=1.0) -> list[Request]`` in "file order" (order within a group is
the order a real client would send them); `sparse_prefix.traces.protocol_order` interleaves groups.
`scale` multiplies the number of groups (documents, prompts, conversations, trees).

The overlap structure is exact by construction: shared parts use body ids in ``1..BRANCH_LOW-1`` and
every point where requests diverge starts each branch with a distinct id from ``BRANCH_LOW..VOCAB-1``,
so the longest common prefix of two requests of a group is exactly the designed shared part.

Families:
  documents       ~50 long documents (4k-8k tokens), 10-20 questions of 20-60 tokens each (QuALITY-like).
  system-prompts  ~15 shared prompts (1k-12k tokens, log-uniform), 30 user queries of 10-300 tokens each.
  chat            ~60 conversations of 3-12 turns; each request = the previous one + its answer + a user turn.
  agent-tree      ~20 tool-use trees: a root prompt, each node = its parent + one tool call and result.
  uniform         adversarial: each request copies a uniformly random-depth prefix of its group's base
                  sequence, then diverges (overlap depths spread over the whole request).
Hints mark the shared/own boundaries (documents, prompts) and the message boundaries (chat, agent-tree).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from sparse_prefix.traces import Request

VOCAB = 32000
BRANCH_LOW = 30000

Builder = Callable[..., list[Request]]


def _rng(seed: int, scale: float) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: expected an integer, got {seed!r}")
    if not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")
    return np.random.default_rng(seed)


def _count(base: int, scale: float, minimum: int = 2) -> int:
    return max(minimum, int(round(base * scale)))


def _body(rng: np.random.Generator, length: int) -> np.ndarray:
    """`length` shared-body ids (never a branch starter)."""
    return rng.integers(1, BRANCH_LOW, size=length, dtype=np.int32)


def _branches(rng: np.random.Generator, lengths) -> list[np.ndarray]:
    """Token runs that start where requests diverge: pairwise distinct first ids (branch starters)."""
    starters = rng.choice(np.arange(BRANCH_LOW, VOCAB, dtype=np.int32), size=len(lengths), replace=False)
    return [np.concatenate([[starter], _body(rng, int(n) - 1)]).astype(np.int32) for starter, n in zip(starters, lengths)]


def _log_uniform(rng: np.random.Generator, low: int, high: int, size=None) -> np.ndarray:
    return np.exp(rng.uniform(np.log(low), np.log(high), size=size)).astype(np.int64)


def documents(seed: int, scale: float = 1.0) -> list[Request]:
    """Many questions per long document (QuALITY-like).

    ~50 documents of 4000-8000 tokens; each gets 10-20 questions of 20-60 tokens. Request = document +
    question; group ``doc-<i>``; hint at the document/question boundary. Two questions of one document
    share exactly the document.
    """
    rng = _rng(seed, scale)
    requests = []
    for doc in range(_count(50, scale)):
        document = _body(rng, int(rng.integers(4000, 8001)))
        n_questions = int(rng.integers(10, 21))
        for k, question in enumerate(_branches(rng, rng.integers(20, 61, size=n_questions))):
            requests.append(Request(f"doc-{doc}", np.concatenate([document, question]), hints=(document.size,),
                                    meta={"question": k}))
    return requests


def system_prompts(seed: int, scale: float = 1.0) -> list[Request]:
    """Shared system prompts with short user queries.

    ~15 prompts of 1000-12000 tokens (log-uniform); 30 queries each of 10-300 tokens (log-uniform).
    Request = prompt + query; group ``prompt-<i>``; hint at the prompt/query boundary.
    """
    rng = _rng(seed, scale)
    requests = []
    for index in range(_count(15, scale)):
        prompt = _body(rng, int(_log_uniform(rng, 1000, 12001)))
        for query in _branches(rng, _log_uniform(rng, 10, 301, size=30)):
            requests.append(Request(f"prompt-{index}", np.concatenate([prompt, query]), hints=(prompt.size,)))
    return requests


def chat(seed: int, scale: float = 1.0) -> list[Request]:
    """Multi-turn conversations: each request extends the previous one by its answer and a user turn.

    ~60 conversations; a system message of 100-500 tokens, then 3-12 turns with user messages of 20-300
    and answers of 50-600 tokens. Request k = system + (user, answer) x (k-1) + user_k; group ``chat-<i>``;
    hints at every message boundary and at the request's end (where the next turn resumes).
    """
    rng = _rng(seed, scale)
    requests = []
    for conversation in range(_count(60, scale)):
        history = _body(rng, int(rng.integers(100, 501)))
        boundaries = [history.size]
        for turn in range(int(rng.integers(3, 13))):
            if turn:
                history = np.concatenate([history, _body(rng, int(rng.integers(50, 601)))])
                boundaries.append(history.size)
            history = np.concatenate([history, _body(rng, int(rng.integers(20, 301)))])
            boundaries.append(history.size)
            requests.append(Request(f"chat-{conversation}", history, hints=tuple(boundaries), meta={"turn": turn}))
    return requests


def agent_tree(seed: int, scale: float = 1.0) -> list[Request]:
    """Branching tool-use trajectories.

    ~20 trees; a root prompt of 1000-4000 tokens; every node extends its parent by one step (a tool call
    and its result, 70-1200 tokens) and has 0-3 children (the root 2-3; depth <= 8, <= 40 nodes per
    tree). Siblings
    share exactly their parent's tokens. Requests in breadth-first order (a parent before its
    children); group ``tree-<i>``; hints at every ancestor boundary and at the node's end.
    """
    rng = _rng(seed, scale)
    requests = []
    for tree in range(_count(20, scale)):
        root = _body(rng, int(rng.integers(1000, 4001)))
        frontier = [(root, (root.size,), 0)]
        nodes = 0
        while frontier and nodes < 40:
            tokens, hints, depth = frontier.pop(0)
            requests.append(Request(f"tree-{tree}", tokens, hints=hints, meta={"depth": depth}))
            nodes += 1
            if depth == 0:
                n_children = int(rng.integers(2, 4))
            else:
                n_children = int(rng.choice(4, p=[0.2, 0.35, 0.3, 0.15])) if depth < 8 else 0
            for step in _branches(rng, rng.integers(70, 1201, size=n_children)):
                child = np.concatenate([tokens, step])
                frontier.append((child, hints + (child.size,), depth + 1))
    return requests


def uniform(seed: int, scale: float = 1.0) -> list[Request]:
    """Adversarial overlap: depths uniform over the request.

    ~20 groups, each a base sequence of 4000-8000 tokens and 30 requests. A request has a length
    uniform in 1000..len(base) and copies a prefix of the base of depth uniform in 0..length, then
    diverges; two requests of a group share exactly min(depth_i, depth_j) tokens. No hints;
    ``meta["depth"]`` records the copied depth.
    """
    rng = _rng(seed, scale)
    requests = []
    for group in range(_count(20, scale)):
        base = _body(rng, int(rng.integers(4000, 8001)))
        lengths = rng.integers(1000, base.size + 1, size=30)
        depths = [int(rng.integers(0, n + 1)) for n in lengths]
        tails = _branches(rng, [max(n - d, 1) for n, d in zip(lengths, depths)])
        for length, depth, tail in zip(lengths, depths, tails):
            tokens = base[:depth] if depth == length else np.concatenate([base[:depth], tail])
            requests.append(Request(f"uniform-{group}", tokens, meta={"depth": depth}))
    return requests


WORKLOADS: dict[str, Builder] = {
    "documents": documents,
    "system-prompts": system_prompts,
    "chat": chat,
    "agent-tree": agent_tree,
    "uniform": uniform,
}

# Cache capacity (entries) the paper used per family; the others follow the nearest analogue.
DEFAULT_CAPACITY: dict[str, int] = {
    "documents": 20,
    "system-prompts": 50,
    "chat": 20,
    "agent-tree": 20,
    "uniform": 20,
}


def build_workload(name: str, seed: int = 0, scale: float = 1.0) -> list[Request]:
    """The requests of the built-in family `name` (see `WORKLOADS`).

    Raises:
      ValueError: unknown `name` (the message lists the families) or a bad `scale`.
    """
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown family {name!r}; choose one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name](seed, scale)
