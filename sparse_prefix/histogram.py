"""Online overlap-depth histograms: exponential decay, bins, and per-length buckets (host side, NumPy).

The Planner's `dp` and `ldp` policies solve the placement DP on the distribution of overlap depths seen
so far. These histograms hold that distribution:

* `OverlapHistogram`: one decayed histogram of depths 0..max_depth. Every observation first multiplies
  all mass by ``decay`` and then adds 1 at bin ``floor(depth / bin_size)``. ``bin_size=1`` is
  token-level. `pmf` spreads nothing: each bin's mass sits at the bin's lower edge (depth
  ``bin * bin_size``), the paper's convention, so a checkpoint at the lower edge of a bin is credited
  with saving all but the within-bin remainder.
* `LengthBucketedHistogram`: for `ldp`, one histogram per half-octave of request length
  (bucket ``floor(2 * log2(length))``, clipped to a fixed range so the stack has a static shape for one
  batched solve). All buckets share one decay clock: an observation in any bucket decays every bucket,
  so the mass of a bucket is its recency-weighted number of observations ("effective observations")
  and the buckets' masses always sum to the pooled histogram's mass.

Decay is applied lazily (a running scale factor, renormalised before it underflows), so an observation
costs O(1) rather than O(bins).

Both export their state (public, versioned): `state_dict()` -> ``{"type", "version", the configuration,
"count", "scale", "raw"}`` with ``raw`` the float64 counts before the lazy scale (so a loaded histogram
continues bitwise like the original); `load_state_dict(state)` validates it against the object's own
configuration (ValueError naming the field) and `from_state_dict(state)` builds a new one.

Shape legend: N = max_depth (tokens), nb = number of bins = N // bin_size + 1, nk = length buckets.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from sparse_prefix.state_dicts import StateReader, header

STATE_VERSION = 1

# Renormalise the lazy scale before 1/scale can overflow float64 (decay**k reaches this after
# k ~ 1e4 observations at decay 0.99; the renormalisation is one O(bins) pass).
_MIN_SCALE = 1e-150


def check_int(name: str, value, *, minimum: int) -> int:
    """Returns ``value`` as int, or raises TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_decay(decay) -> float:
    """Returns ``decay`` as a float in (0, 1], or raises TypeError/ValueError naming it."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a real number in (0, 1], got {decay!r}")
    decay = float(decay)
    if not (0.0 < decay <= 1.0):  # also rejects NaN
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    return decay


def check_depth(name: str, value) -> int:
    """Validates a token depth/length given by a caller: a non-negative integer (not bool, not NaN).

    Args:
      name: the argument name used in error messages.
      value: an int or NumPy integer (an integral float such as 3.0 is rejected: depths are counts).

    Returns:
      ``value`` as a Python int.
    """
    return check_int(name, value, minimum=0)


class _DecayedCounts:
    """Decayed counts of shape ``shape`` with a lazy global scale: mass = raw * scale."""

    def __init__(self, shape: tuple[int, ...], decay: float):
        self._raw = np.zeros(shape, dtype=np.float64)
        self._scale = 1.0
        self._decay = decay
        self.count = 0

    def add(self, index) -> None:
        self._scale *= self._decay
        if self._scale < _MIN_SCALE:
            self._raw *= self._scale
            self._scale = 1.0
        self._raw[index] += 1.0 / self._scale
        self.count += 1

    def mass(self) -> np.ndarray:
        return self._raw * self._scale

    def state(self) -> dict:
        """count, scale and a copy of the raw counts (mass = raw * scale)."""
        return {"count": self.count, "scale": self._scale, "raw": self._raw.copy()}

    def load(self, reader: StateReader) -> None:
        """Replace the counts by the validated fields ``count``, ``scale``, ``raw`` of `reader`."""
        count = reader.int("count", minimum=0)
        scale = reader.float("scale")
        if not 0.0 < scale <= 1.0:
            raise reader.error("scale", f"must lie in (0, 1], got {scale}")
        raw = reader.array("raw", "f", self._raw.ndim, self._raw.shape).astype(np.float64)
        if np.any(raw < 0):
            raise reader.error("raw", "holds negative counts")
        if count == 0 and np.any(raw):
            raise reader.error("raw", "holds mass but count is 0")
        self._raw, self._scale, self.count = raw, scale, count


class OverlapHistogram:
    """A decayed histogram of overlap depths 0..max_depth.

    Args:
      max_depth: N, the deepest overlap tracked (deeper observations are clipped to N).
      bin_size: tokens per bin (1 = token-level). The last bin may be partial.
      decay: gamma in (0, 1]; each observation multiplies the existing mass by gamma first.
    """

    def __init__(self, max_depth: int, *, bin_size: int = 64, decay: float = 0.99):
        self.max_depth = check_int("max_depth", max_depth, minimum=1)
        self.bin_size = check_int("bin_size", bin_size, minimum=1)
        if self.bin_size > self.max_depth:
            raise ValueError(f"bin_size ({bin_size}) must be <= max_depth ({max_depth})")
        self.decay = check_decay(decay)
        self.num_bins = self.max_depth // self.bin_size + 1
        self._counts = _DecayedCounts((self.num_bins,), self.decay)

    def bin_of(self, depth: int) -> int:
        """The bin of a (validated, non-negative) depth, after clipping it to max_depth."""
        return min(depth, self.max_depth) // self.bin_size

    def observe(self, depth: int) -> None:
        """Decays all mass by gamma, then adds 1 at bin floor(min(depth, N) / bin_size).

        Args:
          depth: a non-negative integer overlap depth in tokens.
        """
        self._counts.add(self.bin_of(check_depth("depth", depth)))

    @property
    def count(self) -> int:
        """Number of observations so far (undecayed)."""
        return self._counts.count

    @property
    def total(self) -> float:
        """Total decayed mass: the effective number of observations."""
        return float(self._counts.mass().sum())

    def binned(self) -> np.ndarray:
        """float64[nb]: decayed mass per bin (not normalised)."""
        return self._counts.mass()

    def pmf(self) -> np.ndarray:
        """float64[N + 1]: token-level weights, each bin's mass at its lower edge (not normalised).

        All zeros before the first observation (the placement solver rejects that; callers check
        `count` first).
        """
        return binned_to_token_pmf(self.binned(), self.bin_size, self.max_depth)

    def state_dict(self) -> dict:
        """The histogram as plain data: type, version, max_depth, bin_size, decay, count, scale, raw
        float64[nb] (see the module docstring)."""
        return {**header(type(self).__name__, STATE_VERSION), "max_depth": self.max_depth,
                "bin_size": self.bin_size, "decay": self.decay, **self._counts.state()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the counts by `state` (from `state_dict` of a histogram configured like this one).

        Raises:
          ValueError: a missing or malformed field, or a configuration that differs (naming the field).
        """
        reader = _config_reader(state, self, ("max_depth", "bin_size", "decay"))
        self._counts.load(reader)

    @classmethod
    def from_state_dict(cls, state: dict) -> "OverlapHistogram":
        """A new histogram configured and filled from `state`."""
        reader = StateReader(state, cls.__name__)
        reader.check_header(cls.__name__, STATE_VERSION)
        hist = cls(reader.int("max_depth"), bin_size=reader.int("bin_size"), decay=reader.float("decay"))
        hist.load_state_dict(state)
        return hist


def _config_reader(state: dict, hist, fields: tuple[str, ...]) -> StateReader:
    """A reader of `state` whose header and configuration `fields` match histogram `hist`."""
    reader = StateReader(state, type(hist).__name__)
    reader.check_header(type(hist).__name__, STATE_VERSION)
    for field in fields:
        reader.same(field, getattr(hist, field))
    return reader


def binned_to_token_pmf(binned: np.ndarray, bin_size: int, max_depth: int) -> np.ndarray:
    """Places the mass of bins [..., nb] at their lower edges of a token-level array [..., N + 1].

    Args:
      binned: float64[..., nb] with nb = max_depth // bin_size + 1.
      bin_size: tokens per bin.
      max_depth: N.

    Returns:
      float64[..., N + 1], zero except at multiples of bin_size.
    """
    binned = np.asarray(binned, dtype=np.float64)
    out = np.zeros(binned.shape[:-1] + (max_depth + 1,), dtype=np.float64)
    out[..., ::bin_size] = binned
    return out


class LengthBucketedHistogram:
    """Per-half-octave-of-request-length overlap histograms sharing one decay clock (for `ldp`).

    A request of length L falls in bucket ``floor(2 * log2(L))`` clipped to
    [bucket(min_length), bucket(max_depth)]; row i of `pmfs` is bucket ``first_bucket + i``.

    Args:
      max_depth: N, the longest request length (and so the deepest overlap) tracked.
      bin_size: tokens per bin, as in `OverlapHistogram`.
      decay: gamma in (0, 1]; each observation (in any bucket) decays every bucket.
      min_length: lengths below this share the first bucket (default 64: short requests are cheap).
    """

    def __init__(self, max_depth: int, *, bin_size: int = 64, decay: float = 0.99,
                 min_length: int = 64):
        self.max_depth = check_int("max_depth", max_depth, minimum=1)
        self.bin_size = check_int("bin_size", bin_size, minimum=1)
        if self.bin_size > self.max_depth:
            raise ValueError(f"bin_size ({bin_size}) must be <= max_depth ({max_depth})")
        self.decay = check_decay(decay)
        self.min_length = check_int("min_length", min_length, minimum=1)
        if self.min_length > self.max_depth:
            raise ValueError(f"min_length ({min_length}) must be <= max_depth ({max_depth})")
        self.first_bucket = half_octave(self.min_length)
        self.num_buckets = half_octave(self.max_depth) - self.first_bucket + 1
        self.num_bins = self.max_depth // self.bin_size + 1
        self._counts = _DecayedCounts((self.num_buckets, self.num_bins), self.decay)

    def bucket_of(self, length: int) -> int:
        """Row index (0..nk-1) of the bucket of a request of ``length`` >= 1 tokens."""
        length = check_int("length", length, minimum=1)
        clipped = min(max(length, self.min_length), self.max_depth)
        return half_octave(clipped) - self.first_bucket

    def bucket_lengths(self, row: int) -> tuple[int, int]:
        """The inclusive range of (clipped) request lengths that map to bucket row ``row``."""
        row = check_int("row", row, minimum=0)
        if row >= self.num_buckets:
            raise ValueError(f"row must be < {self.num_buckets}, got {row}")
        lo = self.min_length if row == 0 else _first_length(row + self.first_bucket)
        hi = (self.max_depth if row == self.num_buckets - 1
              else _first_length(row + self.first_bucket + 1) - 1)
        return lo, hi

    def observe(self, depth: int, length: int) -> None:
        """Decays every bucket by gamma, then adds 1 at (bucket(length), bin of min(depth, N)).

        Args:
          depth: non-negative integer overlap depth.
          length: the request's length in tokens (>= 1); depth > length is a caller error.
        """
        depth = check_depth("depth", depth)
        row = self.bucket_of(length)
        if depth > length:
            raise ValueError(f"depth ({depth}) must be <= length ({length})")
        self._counts.add((row, min(depth, self.max_depth) // self.bin_size))

    @property
    def count(self) -> int:
        """Number of observations so far (undecayed), all buckets together."""
        return self._counts.count

    def masses(self) -> np.ndarray:
        """float64[nk]: decayed mass (effective observations) per bucket."""
        return self._counts.mass().sum(axis=1)

    def binned(self) -> np.ndarray:
        """float64[nk, nb]: decayed mass per bucket and bin."""
        return self._counts.mass()

    def pmfs(self) -> np.ndarray:
        """float64[nk, N + 1]: token-level weights per bucket (bin mass at lower edges)."""
        return binned_to_token_pmf(self.binned(), self.bin_size, self.max_depth)

    def state_dict(self) -> dict:
        """The histograms as plain data: type, version, max_depth, bin_size, decay, min_length, count,
        scale, raw float64[nk, nb] (see the module docstring)."""
        return {**header(type(self).__name__, STATE_VERSION), "max_depth": self.max_depth,
                "bin_size": self.bin_size, "decay": self.decay, "min_length": self.min_length,
                **self._counts.state()}

    def load_state_dict(self, state: dict) -> None:
        """Replace the counts by `state` (from `state_dict` of histograms configured like these).

        Raises:
          ValueError: a missing or malformed field, or a configuration that differs (naming the field).
        """
        reader = _config_reader(state, self, ("max_depth", "bin_size", "decay", "min_length"))
        self._counts.load(reader)

    @classmethod
    def from_state_dict(cls, state: dict) -> "LengthBucketedHistogram":
        """New histograms configured and filled from `state`."""
        reader = StateReader(state, cls.__name__)
        reader.check_header(cls.__name__, STATE_VERSION)
        hist = cls(reader.int("max_depth"), bin_size=reader.int("bin_size"), decay=reader.float("decay"),
                   min_length=reader.int("min_length"))
        hist.load_state_dict(state)
        return hist


def half_octave(length: int) -> int:
    """floor(2 * log2(length)) for an integer length >= 1, computed exactly (no float rounding).

    2*log2(L) >= k  <=>  L^2 >= 2^k, so the answer is bit_length(L^2) - 1.
    """
    return (int(length) ** 2).bit_length() - 1


def _first_length(bucket: int) -> int:
    """The smallest length L with half_octave(L) == bucket: ceil(sqrt(2^bucket))."""
    root = math.isqrt(2 ** bucket)
    return root if root * root == 2 ** bucket else root + 1
