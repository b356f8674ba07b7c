"""Snapshots of a whole cache on disk, for a warm restart (arrays with orbax, metadata as JSON).

Layout of a snapshot root folder::

    root/LATEST                       {"snapshot": "snapshot-<id>", "manifest_sha256": "..."}
    root/snapshot-<id>/arrays/        an orbax PyTree checkpoint of named NumPy arrays
    root/snapshot-<id>/meta.json      {"format", "fingerprint", "metadata"}
    root/snapshot-<id>/MANIFEST.json  {relative path: sha256} of every file above

A save writes a fresh temporary folder, checksums it, renames it to ``snapshot-<id>`` and only then
replaces ``LATEST`` atomically (``os.replace``), so an interrupted save leaves the previous snapshot as
the one that loads. A load reads ``LATEST``, verifies the manifest's own hash and every file's hash,
then compares the fingerprint (model config, parameter hash, chunk size, library version, layout); any
difference raises `SnapshotError` before anything is handed back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np

FORMAT = 2
LATEST = "LATEST"


class SnapshotError(ValueError):
    """A snapshot is missing, interrupted, corrupted or belongs to another model or layout."""


def library_version() -> str:
    """The installed sparse-prefix version ("unknown" when run from an uninstalled tree)."""
    try:
        from importlib.metadata import version
        return version("sparse-prefix")
    except Exception:  # noqa: BLE001 -- any metadata failure means "not installed"
        return "unknown"


def params_digest(params: Any) -> str:
    """sha256 over a parameter pytree: its structure, every leaf's shape, dtype and bytes."""
    digest = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(params)
    digest.update(str(treedef).encode())
    for leaf in leaves:
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def model_description(model: Any) -> str:
    """A stable text describing a model's configuration (its config dataclass when it has one)."""
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        fields = dataclasses.asdict(config)
        return f"{type(model).__name__}:" + json.dumps(fields, sort_keys=True, default=str)
    return f"{type(model).__name__}:chunk={model.chunk_size},vocab={model.vocab_size},len={model.max_length}"


def fingerprint(model: Any, params: Any, **layout: Any) -> dict[str, Any]:
    """What a snapshot must match to be loaded: model, weights, chunk size, library version, layout."""
    return {"model": model_description(model), "params_sha256": params_digest(params),
            "chunk_size": int(model.chunk_size), "library_version": library_version(),
            "layout": {key: layout[key] for key in sorted(layout)}}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hashes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): _sha256_file(path)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != "MANIFEST.json"}


def _write_json(path: Path, payload: Any) -> None:
    with open(path, "w") as handle:
        json.dump(payload, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp
    ocp.PyTreeCheckpointer().save(path, {name: np.asarray(a) for name, a in arrays.items()})


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp
    restored = ocp.PyTreeCheckpointer().restore(path)
    return {name: np.asarray(a) for name, a in restored.items()}


def save_snapshot(root: str | os.PathLike, arrays: dict[str, np.ndarray], metadata: dict[str, Any],
                  fingerprint: dict[str, Any]) -> Path:
    """Write a complete snapshot under `root` and make it the one `load_snapshot` returns.

    Args:
      root: the snapshot folder (created if missing).
      arrays: name -> NumPy array (names are plain identifiers).
      metadata: JSON-serialisable host state.
      fingerprint: from `fingerprint(...)`.

    Returns:
      The new snapshot's folder. Older snapshots and leftovers of interrupted saves are removed after
      ``LATEST`` points at the new one.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"snapshot-{uuid.uuid4().hex}"
    staging = root / f".tmp-{name}"
    stored = {key: np.asarray(a) for key, a in arrays.items() if np.size(a)}
    empty = {key: [list(np.shape(a)), np.asarray(a).dtype.name] for key, a in arrays.items() if not np.size(a)}
    try:
        staging.mkdir()
        if stored:                      # orbax refuses zero-size arrays: those go in meta.json
            _save_arrays(staging / "arrays", stored)
        _write_json(staging / "meta.json", {"format": FORMAT, "fingerprint": fingerprint,
                                            "metadata": metadata, "arrays": sorted(stored),
                                            "empty_arrays": empty})
        _write_json(staging / "MANIFEST.json", _file_hashes(staging))
        final = root / name
        os.rename(staging, final)
        pointer = root / f".{LATEST}.{name}"
        _write_json(pointer, {"snapshot": name, "manifest_sha256": _sha256_file(final / "MANIFEST.json")})
        os.replace(pointer, root / LATEST)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for stale in root.iterdir():
        if stale.name != name and (stale.name.startswith("snapshot-") or stale.name.startswith(".tmp-")):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_snapshot(root: str | os.PathLike, fingerprint: dict[str, Any]
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify the latest complete snapshot under `root`.

    Returns:
      (arrays, metadata) exactly as saved.

    Raises:
      SnapshotError: no snapshot, a checksum mismatch (interrupted or corrupted), an unknown format or a
        fingerprint that differs from `fingerprint` (the message names the differing fields).
    """
    root = Path(root)
    pointer_path = root / LATEST
    if not pointer_path.is_file():
        raise SnapshotError(f"no snapshot in {root} (no {LATEST} file)")
    try:
        pointer = json.loads(pointer_path.read_text())
        folder = root / pointer["snapshot"]
        manifest_path = folder / "MANIFEST.json"
        if not manifest_path.is_file() or _sha256_file(manifest_path) != pointer["manifest_sha256"]:
            raise SnapshotError(f"snapshot {folder} is incomplete or its manifest is corrupted")
        manifest = json.loads(manifest_path.read_text())
        actual = _file_hashes(folder)
        if actual != manifest:
            changed = sorted(set(actual.items()) ^ set(manifest.items()))
            raise SnapshotError(f"snapshot {folder} failed its checksums "
                                f"({len(changed)} differing file entries, e.g. {changed[0][0]})")
        meta = json.loads((folder / "meta.json").read_text())
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SnapshotError(f"snapshot in {root} is unreadable: {error}") from error
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"snapshot format {meta.get('format')} is not {FORMAT}")
    saved = meta.get("fingerprint", {})
    differing = sorted(key for key in set(saved) | set(fingerprint) if saved.get(key) != fingerprint.get(key))
    if differing:
        raise SnapshotError(f"snapshot in {root} belongs to another model or cache layout "
                            f"(differs in {', '.join(differing)})")
    try:
        arrays = _load_arrays(folder / "arrays") if meta["arrays"] else {}
        if sorted(arrays) != meta["arrays"]:
            raise SnapshotError(f"snapshot {folder} holds arrays {sorted(arrays)}, expected {meta['arrays']}")
        for key, (shape, dtype) in meta["empty_arrays"].items():
            arrays[key] = np.zeros(shape, jax.numpy.dtype(dtype))
    except SnapshotError:
        raise
    except Exception as error:  # noqa: BLE001 -- orbax/tensorstore raise many types on bad data
        raise SnapshotError(f"snapshot arrays in {folder} are unreadable: {error}") from error
    return arrays, meta["metadata"]


# ----------------------------------------------------------------------------- engine snapshots
#
# The index and the planner export their state through their public, versioned `state_dict()`; the
# snapshot stores its arrays with orbax and the rest as JSON (`split_arrays` / `join_arrays`). What only
# the engine knows -- an entry's payload is its list of KV pages -- is cross-checked here.


def split_arrays(tree: Any, prefix: str) -> tuple[Any, dict[str, np.ndarray]]:
    """Move the NumPy arrays out of a state dict: each becomes ``{"__array__": name}`` (name = `prefix`
    and its path, joined by ``__``). Returns (the JSON-able tree, name -> array)."""
    arrays: dict[str, np.ndarray] = {}

    def walk(node: Any, name: str) -> Any:
        if isinstance(node, np.ndarray):
            arrays[name] = node
            return {"__array__": name}
        if isinstance(node, dict):
            return {key: walk(value, f"{name}__{key}") for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(value, f"{name}__{i}") for i, value in enumerate(node)]
        return node

    return walk(tree, prefix), arrays


def join_arrays(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Inverse of `split_arrays`: put the arrays back (ValueError naming a missing one)."""
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            if tree["__array__"] not in arrays:
                raise ValueError(f"the snapshot lacks array {tree['__array__']!r}")
            return arrays[tree["__array__"]]
        return {key: join_arrays(value, arrays) for key, value in tree.items()}
    if isinstance(tree, list):
        return [join_arrays(value, arrays) for value in tree]
    return tree


def _check_pages(index_state: dict[str, Any], *, has_kv: bool, num_pages: int, chunk_size: int,
                 page_refcount: np.ndarray) -> None:
    """Each entry's payload lists its KV pages (in range, one per chunk up to its deepest checkpoint)
    and the pages' refcounts count exactly those references; raises SnapshotError otherwise."""
    references = np.zeros((num_pages,), np.int64)
    for entry in index_state["entries"]:
        payload = entry["payload"]
        deepest = max((position for position, _ in entry["checkpoints"]), default=0)
        if payload is None or any(not 0 <= page < num_pages for page in payload) or \
                (has_kv and len(payload) != deepest // chunk_size):
            raise SnapshotError(f"snapshot entry {entry['entry_id']}'s KV pages are out of range or "
                                f"do not cover its checkpoints")
        np.add.at(references, np.asarray(payload, np.int64), 1)
    if not np.array_equal(references, np.asarray(page_refcount)):
        raise SnapshotError("snapshot page refcounts are inconsistent with its entries")


def engine_fingerprint(engine: Any) -> dict[str, Any]:
    """The fingerprint an engine's snapshots carry (model, weights, chunk size, version, layout)."""
    layout = engine.layout
    return fingerprint(engine.model, engine.params, num_slots=layout.num_slots,
                       num_pages=layout.num_pages, policy=str(engine.policy), eviction=engine.eviction,
                       capacity_entries=engine.index.capacity_entries)


def save_engine(engine: Any, root: str | os.PathLike) -> Path:
    """Snapshot an engine's whole cache (slabs, KV pages, index, planner, counters) under `root`."""
    print_ = engine_fingerprint(engine)
    with engine._lock:
        store_arrays, page_refcount = engine.store.export()
        index_state, index_arrays = split_arrays(engine.index.state_dict(), "index")
        planner_state, planner_arrays = split_arrays(engine.planner.state_dict(), "planner")
        counters = dict(engine._counters)
    arrays = {**{f"store_{name}": a for name, a in store_arrays.items()},
              "page_refcount": page_refcount, **index_arrays, **planner_arrays}
    metadata = {"index": index_state, "planner": planner_state, "counters": counters}
    return save_snapshot(root, arrays, metadata, print_)


def load_engine(engine: Any, root: str | os.PathLike) -> None:
    """Replace an idle engine's cache by the snapshot under `root`, all or nothing.

    Raises:
      SnapshotError: the snapshot is missing, interrupted, corrupted, foreign or inconsistent; the
        engine's cache is then EMPTY (and working), never half-loaded.
      RuntimeError: requests are in flight (nothing changes).
    """
    with engine._lock:
        engine._require_idle("load")
        try:
            arrays, meta = load_snapshot(root, engine_fingerprint(engine))
            engine._reset_host()
            index_state = join_arrays(meta["index"], arrays)
            engine.index.load_state_dict(index_state)
            _check_pages(index_state, has_kv=engine.store.has_kv, num_pages=engine.layout.num_pages,
                         chunk_size=engine.chunk_size, page_refcount=arrays["page_refcount"])
            engine.planner.load_state_dict(join_arrays(meta["planner"], arrays))
            store_arrays = {name[len("store_"):]: a for name, a in arrays.items() if name.startswith("store_")}
            engine.store.load(store_arrays, arrays["page_refcount"])
            engine._counters.update({k: int(v) for k, v in meta["counters"].items() if k in engine._counters})
        except Exception as error:
            engine._reset_host()
            engine.store.reset()
            if isinstance(error, SnapshotError):
                raise
            raise SnapshotError(f"snapshot in {root} could not be loaded: {error}") from error
