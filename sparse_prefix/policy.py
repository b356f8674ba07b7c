"""Checkpoint policy specs (public): the grammar the Planner, the simulator and the CLI share.

    none | block:B | balanced:k | log | sqrt | end | dp:M | ldp:M     then any of  +fork  +hints  +end  +fill

(``+fill`` only after dp:M / ldp:M: budget the DP leaves idle is spent on the largest uncovered gaps.)
`parse_policy` parses a spec string strictly into a `PolicySpec`; `snap_positions` snaps positions down
to a grid. See `sparse_prefix.planner` for what each policy places.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np

_BUDGETED = ("block", "balanced", "dp", "ldp")
_PLAIN = ("none", "log", "sqrt", "end")
MODIFIERS = ("fork", "hints", "end", "fill")
_FILLABLE = ("dp", "ldp")
_NUMBER = r"(?:0|[1-9][0-9]*)"
_SPEC_RE = re.compile(
    rf"(?P<kind>{'|'.join(_BUDGETED + _PLAIN)})(?::(?P<param>{_NUMBER}))?(?P<mods>(?:\+[a-z]+)*)")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """A parsed policy spec.

    Attributes:
      kind: one of none, block, balanced, log, sqrt, end, dp, ldp.
      param: B for block (>= 1), k / M for balanced, dp, ldp (>= 0); None for the others.
      fork, hints, end: the modifiers that add positions on top of the base policy.
      fill: dp / ldp only: top the solved positions up to the budget M by splitting the largest
        uncovered gaps (see `sparse_prefix.planner.fill_gaps`); adds nothing beyond M.
    """

    kind: str
    param: int | None = None
    fork: bool = False
    hints: bool = False
    end: bool = False
    fill: bool = False

    def __str__(self) -> str:
        base = self.kind if self.param is None else f"{self.kind}:{self.param}"
        return base + "".join(f"+{m}" for m in MODIFIERS if getattr(self, m))

    @property
    def family(self) -> str:
        """The spec without its number (one line per family in a Pareto plot), e.g. ``dp+fork``."""
        return self.kind + "".join(f"+{m}" for m in MODIFIERS if getattr(self, m))

    @property
    def uses_histogram(self) -> bool:
        return self.kind in ("dp", "ldp")

    @property
    def budget(self) -> int | None:
        """Positions the base policy places when fixed (none 0, end 1, balanced/dp/ldp their count);
        None when it depends on the length (block, log, sqrt). +fork, +hints, +end add on top."""
        if self.kind in ("balanced", "dp", "ldp"):
            return self.param
        return {"none": 0, "end": 1}.get(self.kind)


def parse_policy(spec: str) -> PolicySpec:
    """Parses a policy spec string strictly (lower case, no spaces, no leading zeros, no repeats).

    Args:
      spec: e.g. ``"dp:8"``, ``"block:1024+fork"``, ``"ldp:4+hints+end"``.

    Returns:
      The `PolicySpec`.

    Raises:
      TypeError: ``spec`` is not a string.
      ValueError: the spec is malformed; the message names it and says why.
    """
    if not isinstance(spec, str):
        raise TypeError(f"policy spec must be a string, got {spec!r} ({type(spec).__name__})")
    match = _SPEC_RE.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"malformed policy spec {spec!r}: expected one of none, block:B, balanced:k, log, sqrt, "
            "end, dp:M, ldp:M, optionally followed by +fork, +hints, +end, +fill")
    kind, param = match["kind"], match["param"]
    if kind in _BUDGETED and param is None:
        raise ValueError(f"malformed policy spec {spec!r}: {kind} needs a number, e.g. {kind}:8")
    if kind in _PLAIN and param is not None:
        raise ValueError(f"malformed policy spec {spec!r}: {kind} takes no number")
    value = None if param is None else int(param)
    if kind == "block" and value == 0:
        raise ValueError(f"malformed policy spec {spec!r}: the block size must be >= 1")
    mods = match["mods"].split("+")[1:]
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"malformed policy spec {spec!r}: unknown modifier +{mod} "
                             f"(known: {', '.join('+' + m for m in MODIFIERS)})")
    if len(set(mods)) != len(mods):
        raise ValueError(f"malformed policy spec {spec!r}: a modifier is repeated")
    if "fill" in mods and kind not in _FILLABLE:
        raise ValueError(f"malformed policy spec {spec!r}: +fill needs dp:M or ldp:M (it tops up "
                         f"the DP's idle budget), not {kind}")
    return PolicySpec(kind, value, *(m in mods for m in MODIFIERS))


def snap_positions(positions: Iterable[int] | np.ndarray, grid: int) -> np.ndarray:
    """int64[k]: positions snapped down to multiples of ``grid``, zeros dropped, sorted, unique."""
    array = np.asarray(positions, dtype=np.int64).reshape(-1)
    if array.size <= 64:             # a request's few positions: plain ints cost fewer calls than unique
        return np.array(sorted({v // grid * grid for v in array.tolist() if v >= grid}), np.int64)
    snapped = np.unique((array // grid) * grid)
    return snapped[snapped > 0]
