"""The paper's published points (Shirokikh & Nikolenko, arXiv 2605.05219), as data.

Transcribed from ../shared/ANCHORS.md (its real-timing tables): per data set, the policies the
paper reports with mean checkpoints per request, tokens saved (%) and the measured time speedup on
one Qwen3.5-0.8B layer group, plus the run's summary (measured requests, mean length, hit rate).
These are published numbers to draw beside ours, never inputs to a computation of ours.
"""

from __future__ import annotations

from typing import NamedTuple


class PaperPoint(NamedTuple):
    """One published row.

    Attributes:
      policy: our policy spec for the same placement (e.g. "dp:3", "block:2048", "balanced:1").
      checkpoints_per_request: the paper's mean checkpoints per request.
      tokens_saved_pct: the paper's tokens saved, in percent.
      time_speedup: the paper's measured prefill speedup (x).
    """

    policy: str
    checkpoints_per_request: float
    tokens_saved_pct: float
    time_speedup: float


class PaperRun(NamedTuple):
    """The published run of one data set.

    Attributes:
      dataset: "quality" or "system-prompts".
      measured_requests: requests in the measured 40% of the trace.
      mean_length: mean request length in tokens (Qwen3.5 tokenizer).
      no_cache_seconds: the total prefill time of the measured requests without a cache.
      hit_rate_pct: the share of measured requests with a non-zero overlap, in percent.
      points: the published rows.
    """

    dataset: str
    measured_requests: int
    mean_length: float
    no_cache_seconds: float
    hit_rate_pct: float
    points: tuple[PaperPoint, ...]


QUALITY = PaperRun(
    dataset="quality", measured_requests=400, mean_length=6480.0, no_cache_seconds=83.55,
    hit_rate_pct=40.0,
    points=(
        PaperPoint("dp:1", 0.78, 27.8, 1.36),
        PaperPoint("balanced:1", 1.00, 19.8, 1.20),
        PaperPoint("block:4096", 0.91, 22.8, 1.25),
        PaperPoint("dp:3", 2.37, 34.6, 1.49),
        PaperPoint("block:2048", 2.68, 33.4, 1.46),
        PaperPoint("dp:8", 5.32, 37.8, 1.56),
        PaperPoint("block:1024", 5.76, 35.8, 1.51),
        PaperPoint("dp:20", 12.65, 38.9, 1.59),
        PaperPoint("block:512", 12.18, 38.0, 1.57),
        PaperPoint("block:64", 100.8, 39.3, 1.61),
    ),
)

SYSTEM_PROMPTS = PaperRun(
    dataset="system-prompts", measured_requests=400, mean_length=4043.0, no_cache_seconds=50.45,
    hit_rate_pct=85.0,
    points=(
        PaperPoint("dp:2", 1.06, 50.0, 1.78),
        PaperPoint("block:3072", 0.80, 48.1, 1.80),
        PaperPoint("block:2048", 1.46, 60.2, 2.25),
        PaperPoint("dp:5", 2.59, 67.1, 2.60),
        PaperPoint("block:1024", 3.50, 72.2, 3.07),
        PaperPoint("dp:12", 5.66, 77.4, 3.62),
        PaperPoint("block:512", 7.43, 76.8, 3.58),
        PaperPoint("dp:30", 14.6, 80.8, 4.08),
        PaperPoint("block:256", 15.3, 79.4, 3.91),
    ),
)

PAPER_RUNS = {run.dataset: run for run in (QUALITY, SYSTEM_PROMPTS)}

# The paper's policy grid (its Pareto sweeps), as our policy specs.
PAPER_DP_BUDGETS = (1, 2, 3, 5, 8, 12, 20, 30)
PAPER_BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 3072, 4096)
PAPER_BALANCED_COUNTS = (1, 2, 3, 5, 12, 20, 30)


def paper_run(dataset: str) -> PaperRun:
    """The published run of `dataset` ("quality" or "system-prompts")."""
    if dataset not in PAPER_RUNS:
        raise ValueError(f"dataset must be one of {sorted(PAPER_RUNS)}, got {dataset!r}")
    return PAPER_RUNS[dataset]


def paper_policies() -> list[str]:
    """Every policy of the paper's sweeps: dp M, block B, balanced k, log, sqrt."""
    return ([f"dp:{m}" for m in PAPER_DP_BUDGETS] + [f"block:{b}" for b in PAPER_BLOCK_SIZES]
            + [f"balanced:{k}" for k in PAPER_BALANCED_COUNTS] + ["log", "sqrt"])
