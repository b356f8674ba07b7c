"""Reading the versioned state dicts of the host-side objects (`state_dict()` / `load_state_dict()`).

`PrefixIndex`, `Planner`, `OverlapHistogram` and `LengthBucketedHistogram` export their state as a plain
dict: JSON-able values (None, bool, int, float, str, lists, dicts with string keys) and NumPy arrays,
headed by ``"type"`` (the class name) and ``"version"`` (an int, bumped when the layout changes).
`StateReader` reads such a dict field by field and raises ValueError naming the field (its full path,
e.g. ``PrefixIndex state: field 'entries[3].checkpoints' ...``) on anything missing or malformed, so
every loader validates the same way. Host side only (NumPy, no jax).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import numpy as np


def header(kind: str, version: int) -> dict[str, Any]:
    """The two fields every state dict starts with."""
    return {"type": kind, "version": version}


class StateReader:
    """Typed, validating access to the fields of one (possibly nested) state dict.

    Args:
      state: the dict (a Mapping).
      owner: the class whose state it is (named in every error).
      path: this dict's position inside the top-level one (e.g. ``"histogram."``).

    Raises:
      TypeError: `state` is not a Mapping.
    """

    def __init__(self, state: Any, owner: str, path: str = ""):
        if not isinstance(state, Mapping):
            raise TypeError(f"{owner} state{' field ' + repr(path.rstrip('.')) if path else ''} must be a "
                            f"dict, got {type(state).__name__}")
        self.state, self.owner, self.path = state, owner, path

    def error(self, key: str, problem: str) -> ValueError:
        """A ValueError naming field `key` of this dict."""
        return ValueError(f"{self.owner} state: field {self.path + key!r} {problem}")

    def raw(self, key: str) -> Any:
        """The value of `key` as stored (ValueError if missing)."""
        if key not in self.state:
            raise self.error(key, "is missing")
        return self.state[key]

    def check_header(self, kind: str, version: int) -> None:
        """Require ``type == kind`` and ``version == version``."""
        if self.raw("type") != kind:
            raise self.error("type", f"is {self.state['type']!r}, expected {kind!r}")
        if self.raw("version") != version:
            raise self.error("version", f"is {self.state['version']!r}; this library reads version {version}")

    def int(self, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
        """An integer field (not a bool) in [minimum, maximum]."""
        return self._bounded(key, self.raw(key), minimum, maximum)

    def _bounded(self, key: str, value: Any, minimum: int | None, maximum: int | None) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise self.error(key, f"must be an integer, got {value!r}")
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.error(key, f"must lie in {minimum}..{'' if maximum is None else maximum}, got {value}")
        return int(value)

    def optional_int(self, key: str, minimum: int | None = None) -> int | None:
        """An integer field or None."""
        return None if self.raw(key) is None else self.int(key, minimum)

    def float(self, key: str) -> float:
        """A finite real field (int or float, not a bool)."""
        value = self.raw(key)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise self.error(key, f"must be a finite number, got {value!r}")
        return float(value)

    def str(self, key: str) -> str:
        """A string field."""
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {value!r}")
        return value

    def list(self, key: str) -> list:
        """A list (or tuple) field, as a list."""
        value = self.raw(key)
        if not isinstance(value, (list, tuple)):
            raise self.error(key, f"must be a list, got {type(value).__name__}")
        return list(value)

    def child(self, key: str) -> "StateReader":
        """A reader of the nested dict `key`."""
        return StateReader(self.raw(key), self.owner, f"{self.path}{key}.")

    def item(self, key: str, index: int) -> "StateReader":
        """A reader of the dict at position `index` of the list field `key`."""
        return StateReader(self.list(key)[index], self.owner, f"{self.path}{key}[{index}].")

    def array(self, key: str, kind: str, ndim: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A NumPy array field of dtype kind in `kind` (e.g. ``"iu"``, ``"f"``), `ndim` axes, `shape`.

        Returns a copy (the caller may keep it)."""
        value = self.raw(key)
        if not isinstance(value, np.ndarray):
            raise self.error(key, f"must be a NumPy array, got {type(value).__name__}")
        if value.dtype.kind not in kind or value.ndim != ndim:
            raise self.error(key, f"must be a {ndim}-D array of dtype kind {kind!r}, got {value.dtype} "
                                  f"of shape {value.shape}")
        if shape is not None and value.shape != tuple(shape):
            raise self.error(key, f"must have shape {tuple(shape)}, got {value.shape}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise self.error(key, "holds non-finite values")
        return value.copy()

    def same(self, key: str, expected: Any) -> None:
        """Require a configuration field to equal this object's value (loading never reconfigures)."""
        value = self.raw(key)
        if type(value) is bool or type(expected) is bool:
            equal = value is expected
        else:
            equal = value == expected
        if not equal:
            raise self.error(key, f"is {value!r}, this {self.owner} has {expected!r}")
