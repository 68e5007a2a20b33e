"""The ``camretrieval`` command: fit-pca, learn-classes, index, remove, search, eval, tables, demo, serve, explain.

:mod:`~camretrieval.cli.options` declares the arguments, :mod:`~camretrieval.cli.commands` runs each command, and
:func:`main` is the one boundary where an expected failure (:class:`~camretrieval.errors.CamRetrievalError`) becomes a
one-line message and a non-zero exit status.
"""

from __future__ import annotations

import sys

from camretrieval.cli.commands import COMMANDS, read_queries_file
from camretrieval.cli.options import build_parser
from camretrieval.errors import CamRetrievalError

__all__ = ["build_parser", "main", "read_queries_file"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except CamRetrievalError as error:
        print(f"camretrieval {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"camretrieval {args.command}: interrupted", file=sys.stderr)
        return 130
