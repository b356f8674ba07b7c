"""The ``sparse-prefix`` console script.

Each sub-command lives in a module named in `_COMMAND_MODULES` that exposes ``register(subparsers)``:
it adds its sub-parser and sets ``func=`` (``func(args) -> int`` exit code) as a default. Modules keep
heavy imports (jax, matplotlib) inside ``func`` so that ``--help`` stays fast. Adding a command is a
one-line edit of the tuple.

Bad input (a ValueError, TypeError, FileNotFoundError or ImportError raised while running a command)
prints one line ``sparse-prefix <command>: error: ...`` on stderr and exits with status 2; set
``SPARSE_PREFIX_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

_COMMAND_MODULES = (
    "sparse_prefix.cli_simulate",
    "sparse_prefix.cli_place",
    "sparse_prefix.experiments.cli_reproduce",
    "sparse_prefix.cli_generate",
)

_BAD_INPUT = (ValueError, TypeError, FileNotFoundError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="sparse-prefix",
        description="Sparse, optimally placed recurrent-state prefix caching: simulate and place checkpoints.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad input or usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _BAD_INPUT as error:
        if os.environ.get("SPARSE_PREFIX_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"sparse-prefix {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparse-prefix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
