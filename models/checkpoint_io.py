"""Save and restore model parameters with orbax, plus the config as JSON (public, any model family).

Layout of a checkpoint directory::

    <directory>/params/      orbax StandardCheckpointer tree (every leaf, its dtype kept)
    <directory>/model.json   {"family": ..., "config": {...}, "format": 1}

`save_params` / `restore_params` work for any params pytree; `save_model` / `load_model` also record
and rebuild the model object for families registered with `register_family` (mamba2 registers itself;
its model objects carry `family` and a `config` with `to_dict()`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax

FORMAT = 1
_FAMILIES: dict[str, Callable[[dict], Any]] = {}


def register_family(name: str, from_config: Callable[[dict], Any]) -> None:
    """Make `load_model` able to rebuild models of `name` from their config dict."""
    _FAMILIES[name] = from_config


def save_params(directory: str, params: Any) -> None:
    """Write `params` (any pytree of arrays) under `directory`/params; the directory must not exist."""
    path = os.path.join(os.path.abspath(directory), "params")
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists")
    import orbax.checkpoint as ocp   # lazy: model code (and the GPU machine) must not need orbax

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()


def restore_params(directory: str, like: Any) -> Any:
    """Read the params saved under `directory`, shaped like `like` (arrays or ShapeDtypeStructs).

    Raises:
      FileNotFoundError: no checkpoint there. ValueError: the saved tree does not match `like`.
    """
    path = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no saved params at {path}")
    abstract = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), like)
    import orbax.checkpoint as ocp   # lazy, as in save_params

    try:
        return ocp.StandardCheckpointer().restore(path, abstract)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"params at {path} do not match the expected tree: {err}") from err


def save_model(directory: str, model: Any, params: Any) -> None:
    """Save `params` and `model`'s family + config, so that `load_model(directory)` rebuilds both."""
    family = getattr(model, "family", None)
    if family is None or not hasattr(model, "config"):
        raise TypeError(f"{type(model).__name__} has no `family` / `config` to save")
    save_params(directory, params)
    with open(os.path.join(directory, "model.json"), "w") as handle:
        json.dump({"format": FORMAT, "family": family, "config": model.config.to_dict()}, handle,
                  indent=1)


def read_model_config(directory: str) -> dict:
    """The {"family", "config", "format"} record of a saved model."""
    with open(os.path.join(directory, "model.json")) as handle:
        record = json.load(handle)
    if record.get("format") != FORMAT:
        raise ValueError(f"unsupported checkpoint format {record.get('format')!r} (expected {FORMAT})")
    return record


def load_model(directory: str) -> tuple[Any, Any]:
    """(model, params) saved by `save_model`."""
    record = read_model_config(directory)
    if record["family"] not in _FAMILIES:
        raise ValueError(f"unknown model family {record['family']!r}; registered: {sorted(_FAMILIES)}")
    model = _FAMILIES[record["family"]](record["config"])
    like = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    return model, restore_params(directory, like)
