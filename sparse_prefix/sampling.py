"""Sampling for `Engine.generate` (host side, NumPy): the `Sampling` choice and one draw per step."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Decoding choice: temperature 0 is greedy; top_k keeps the k most likely tokens; seed for the RNG;
    banned token ids are never produced (e.g. an "unknown" id)."""

    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    banned: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"sampling temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"sampling top_k must be None or an int >= 1, got {self.top_k!r}")


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from f64[V] logits: argmax at temperature 0, else softmax sampling (top-k)."""
    if sampling.banned:
        logits = logits.copy()
        logits[list(sampling.banned)] = -np.inf
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.size:
        cutoff = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(scaled.size, p=probs / probs.sum()))
