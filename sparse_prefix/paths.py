"""Where the shared data lives: ``--data-dir``, else ``$SPARSE_PREFIX_SHARED``, else ``<repo>/../shared``.

The shared folder (tokenizers, QuALITY, system prompts, queries) is read in place, never copied into
the repository. ``<repo>`` is the folder that holds the ``sparse_prefix`` package.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SPARSE_PREFIX_SHARED"


def repo_root() -> Path:
    """The repository folder: the parent of the ``sparse_prefix`` package directory."""
    return Path(__file__).resolve().parent.parent


def shared_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the shared data folder.

    Args:
      data_dir: an explicit folder (the CLI's ``--data-dir``); wins over the environment.

    Returns:
      The folder as an absolute path.

    Raises:
      FileNotFoundError: the resolved folder does not exist (the message says where it looked and how
        to point elsewhere).
    """
    if data_dir is not None:
        path, source = Path(data_dir), "--data-dir"
    elif os.environ.get(ENV_VAR):
        path, source = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        path, source = repo_root().parent / "shared", "the default <repo>/../shared"
    path = path.expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data folder {path} (from {source}) does not exist; pass --data-dir DIR or set "
            f"{ENV_VAR}=DIR"
        )
    return path


def shared_file(*parts: str, data_dir: str | os.PathLike | None = None) -> Path:
    """A file inside the shared folder, e.g. ``shared_file("tokenizers", "qwen.tiktoken")``.

    Raises:
      FileNotFoundError: the folder or the file is missing (naming the full path).
    """
    path = shared_dir(data_dir).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist in the shared data folder")
    return path
