"""The prefill cost model t(n) = c0 + a n + b n^2 of one model, fitted from measured prefill times, and
the ideal speedup a prefix cache could reach under it.

A prefill of n tokens from an empty state costs a fixed c0 (dispatch, host checks, the logits head),
a linear a n (projections, MLPs, recurrent layers) and a quadratic b n^2 (attention: token i reads i
keys, sum_i i ~ n^2 / 2). A request of L tokens resumed from a cached state at r recomputes tokens
r+1..L, each still attending over its whole prefix, so it costs

    t_resume(L, r) = c0 + a (L - r) + b (L^2 - r^2)  =  t(L) - (a r + b r^2).

The cache saves a r + b r^2, never c0 (a hit still pays the fixed cost), and less than the token count
suggests for hybrids: at r = 0.9 L the attention term keeps (1 - 0.81) of its cost where the token
count keeps 0.1. The *cost-model ideal* speedup of a replay is

    sum_i t(L_i) / sum_i t_resume(L_i, r_i)

over its measured requests (r_i = 0 on a miss): what a cache with zero overhead would reach with those
resume points on this model. It uses the exact token counts (no rounding up to the model's chunk
grid), so it never credits the grid's padding to the cache. The *token ideal* sum L / sum (L - r) is
the paper's (77.4% saved -> 4.42x); it ignores c0 and attention.

`calibrate` times the same compiled program the Engine runs (tokens padded to a fixed width, lengths
given, a fixed number of padded checkpoint slots), so t(n) and the engine's measured times are
comparable. `fit_cost` is least squares with c0, a, b >= 0 (relative residuals by default, since
lengths span two orders of magnitude).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CostModel:
    """t(n) = c0 + a n + b n^2 seconds for a prefill of n tokens from an empty state.

    Attributes:
      c0: fixed seconds per call.  a: seconds per token.  b: seconds per token^2 (all >= 0).
    """

    c0: float
    a: float
    b: float

    def __post_init__(self) -> None:
        for name in ("c0", "a", "b"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not np.isfinite(value):
                raise ValueError(f"CostModel.{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"CostModel.{name} must be >= 0 (no cost term is negative), got {value}")

    def full(self, length: Any) -> Any:
        """t(L) for int or int[R] lengths (float or float64[R])."""
        return self.resume(length, 0)

    def resume(self, length: Any, resume: Any) -> Any:
        """t_resume(L, r) = c0 + a (L - r) + b (L^2 - r^2), for ints or int[R] arrays (0 <= r < L)."""
        length = np.asarray(length, np.float64)
        resume = np.asarray(resume, np.float64)
        if np.any(resume < 0) or np.any(resume >= np.maximum(length, 1)):
            raise ValueError("resume positions must satisfy 0 <= r < L (the last token is always computed)")
        value = self.c0 + self.a * (length - resume) + self.b * (length ** 2 - resume ** 2)
        return float(value) if value.ndim == 0 else value

    def ideal_speedup(self, lengths: Sequence[int], resumes: Sequence[int]) -> float:
        """sum t(L) / sum t_resume(L, r) over requests (lengths, resumes: int[R], R >= 1)."""
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        resumes = np.asarray(resumes, np.int64).reshape(-1)
        if lengths.size == 0 or lengths.shape != resumes.shape:
            raise ValueError(f"lengths and resumes must be non-empty and of equal size, got "
                             f"{lengths.size} and {resumes.size}")
        return float(np.sum(self.full(lengths)) / np.sum(self.resume(lengths, resumes)))

    def as_dict(self) -> dict[str, float]:
        return {"c0": float(self.c0), "a": float(self.a), "b": float(self.b)}


def token_ideal(lengths: Sequence[int], resumes: Sequence[int]) -> float:
    """The paper's ideal: sum L / sum (L - r)."""
    lengths = np.asarray(lengths, np.int64)
    resumes = np.asarray(resumes, np.int64)
    return float(lengths.sum() / (lengths - resumes).sum())


def step_ideal(lengths: Sequence[int], resumes: Sequence[int], step: int) -> float:
    """The speedup bound of a model that prefills in steps of `step` tokens: sum ceil(L / S) / sum
    ceil((L - r) / S) over requests (lengths, resumes: int[R], 0 <= r < L).

    A call of n tokens runs ceil(n / S) steps whatever n is inside the last one (exactness on the
    model's step grid: a short suffix may not run a narrower program). If every step cost the same
    and nothing else cost anything -- no dispatch, no host work, no fixed cost -- a policy would
    reach this speedup; a fixed cost per call only lowers it. It is the ceiling the step grid
    leaves whatever the engine's overheads, up to the attention term: a step from depth d costs
    a S + b (2 d S + S^2), so deeper steps cost a little more (on qwen3.5-0.8b-group, S = 1024,
    ~5% more at d = 3.6k), and a shallow resume that skips a deep step can gain that much beyond it.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be a positive int (tokens per prefill step), got {step!r}")
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    resumes = np.asarray(resumes, np.int64).reshape(-1)
    if lengths.size == 0 or lengths.shape != resumes.shape:
        raise ValueError(f"lengths and resumes must be non-empty and of equal size, got "
                         f"{lengths.size} and {resumes.size}")
    if np.any(resumes < 0) or np.any(resumes >= lengths):
        raise ValueError("resume positions must satisfy 0 <= r < L (the last token is always computed)")
    steps = lambda n: -(-n // int(step))                      # noqa: E731 -- ceil for ints >= 1
    return float(steps(lengths).sum() / steps(lengths - resumes).sum())


def fit_cost(lengths: Sequence[int], times: Sequence[float], *, relative: bool = True) -> CostModel:
    """Least-squares fit of t(n) = c0 + a n + b n^2 with c0, a, b >= 0.

    b >= 0 is physics (attention never gets cheaper with length); c0, a >= 0 keep a noisy fit from
    trading a negative slope against the curvature, which would make resumes look costlier than
    they are. Solved exactly by active sets: the unconstrained least squares on every subset of the
    three terms, keeping the best solution whose coefficients are all >= 0 (the constrained optimum
    is the unconstrained optimum on its own support, so it is among them).

    Args:
      lengths: int[R] token counts (R >= 3 distinct values, all >= 1).
      times: float[R] seconds (> 0), e.g. medians of repeated calls.
      relative: minimise relative residuals (t_fit - t) / t instead of absolute ones (lengths span
        two orders of magnitude; absolute residuals would ignore the short ones).

    Returns:
      The fitted `CostModel`.
    """
    n = np.asarray(lengths, np.float64).reshape(-1)
    t = np.asarray(times, np.float64).reshape(-1)
    if n.shape != t.shape:
        raise ValueError(f"lengths and times must have equal sizes, got {n.size} and {t.size}")
    if np.unique(n).size < 3:
        raise ValueError(f"lengths must hold at least 3 distinct values to fit c0, a, b, got {n.tolist()}")
    if np.any(n < 1) or not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError("lengths must be >= 1 and times finite and > 0")
    weights = 1.0 / t if relative else np.ones_like(t)
    scale = n.max()
    columns = np.stack([np.ones_like(n), n / scale, (n / scale) ** 2], axis=1) * weights[:, None]
    target = t * weights
    best, best_residual = np.zeros(3), float(np.sum(target ** 2))
    for support in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
        solution, *_ = np.linalg.lstsq(columns[:, support], target, rcond=None)
        if np.any(solution < 0):
            continue
        coef = np.zeros(3)
        coef[list(support)] = solution
        residual = float(np.sum((columns @ coef - target) ** 2))
        if residual < best_residual:
            best, best_residual = coef, residual
    return CostModel(c0=float(best[0]), a=float(best[1] / scale), b=float(best[2] / scale ** 2))


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured prefill times of one model and the fitted cost model.

    Attributes:
      lengths: the token counts timed.  medians: warm median seconds per length.
      samples: every timed call, per length.  cost: `fit_cost(lengths, medians)`.
      width: the padded token width of every call.  checkpoint_slots: padded checkpoint slots per call.
    """

    lengths: tuple[int, ...]
    medians: tuple[float, ...]
    samples: tuple[tuple[float, ...], ...]
    cost: CostModel
    width: int
    checkpoint_slots: int

    def as_dict(self) -> dict[str, Any]:
        return {"lengths": list(self.lengths), "medians_s": list(self.medians),
                "samples_s": [list(s) for s in self.samples], "cost": self.cost.as_dict(),
                "width": self.width, "checkpoint_slots": self.checkpoint_slots,
                "max_relative_residual": max_relative_residual(self)}


def max_relative_residual(calibration: Calibration) -> float:
    """max |t(n) - median(n)| / median(n) over the calibrated lengths (how well the model fits)."""
    fitted = calibration.cost.full(np.asarray(calibration.lengths))
    medians = np.asarray(calibration.medians)
    return float(np.max(np.abs(fitted - medians) / medians))


def default_lengths(max_length: int, chunk_size: int, count: int = 6) -> list[int]:
    """`count` lengths on the chunk grid spread from one chunk to max_length (the fit's ladder)."""
    chunks = max_length // chunk_size
    if chunks < 3:
        raise ValueError(f"max_length {max_length} holds fewer than 3 chunks of {chunk_size}")
    picks = np.unique(np.round(np.linspace(1, chunks, count)).astype(np.int64))
    return [int(c) * chunk_size for c in picks]


def time_calls(setup: Callable[[], Any], call: Callable[[Any], Any], repeats: int, warmup: int = 1
               ) -> list[float]:
    """Wall seconds of `call(setup())` (which must block until its result is ready), `setup` untimed."""
    for _ in range(warmup):
        call(setup())
    times = []
    for _ in range(repeats):
        prepared = setup()
        start = time.perf_counter()
        call(prepared)
        times.append(time.perf_counter() - start)
    return times


def calibrate(model: Any, params: Any, lengths: Sequence[int], *, repeats: int = 5, warmup: int = 1,
              width: int | None = None, checkpoint_slots: int = 8, seed: int = 0) -> Calibration:
    """Time `model.prefill` from an empty state at each length and fit the cost model.

    Every call uses the Engine's shapes: tokens int32[1, width] (default ``model.max_length``) of
    which the first n are real (``lengths=[n]``), checkpoints int32[1, checkpoint_slots] all padding,
    so one compiled program serves every length, the same one an Engine with
    ``min_checkpoint_slots=checkpoint_slots`` runs (with the params in the Engine's layout,
    `engine.serving_params`). The fresh state is built and synchronised outside the timed region;
    the timed region ends when the logits are ready.

    Args:
      model, params: a `RecurrentLM` and its parameters.
      lengths: token counts to time (>= 3 distinct, each in 1..width).
      repeats: timed calls per length (the median is fitted).  warmup: untimed calls per length.
      width: the padded token width.  checkpoint_slots: padded checkpoint slots per call.
      seed: for the random token ids.

    Returns:
      A `Calibration`.
    """
    import jax

    from sparse_prefix.engine import serving_params

    params = serving_params(model, params)
    width = int(model.max_length) if width is None else int(width)
    lengths = [int(n) for n in lengths]
    if any(not 1 <= n <= width for n in lengths):
        raise ValueError(f"lengths must lie in 1..{width} (the padded width), got {lengths}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.vocab_size, size=(1, width), dtype=np.int32)
    checkpoints = np.zeros((1, checkpoint_slots), np.int32)

    def setup():
        return jax.block_until_ready(model.init_state(1))

    medians, samples = [], []
    for n in lengths:
        size = np.asarray([n], np.int32)

        def call(state, size=size):
            logits, _, _ = model.prefill(params, tokens, state, checkpoints, size)
            jax.block_until_ready(logits)

        times = time_calls(setup, call, repeats, warmup)
        samples.append(tuple(times))
        medians.append(statistics.median(times))
    return Calibration(lengths=tuple(lengths), medians=tuple(medians), samples=tuple(samples),
                       cost=fit_cost(lengths, medians), width=width, checkpoint_slots=checkpoint_slots)
