"""The ``camretrieval`` command: fit-pca, learn-classes, index, info, remove, search, eval, tables, demo, serve,
explain.

:mod:`~camretrieval.cli.options` declares the arguments, :mod:`~camretrieval.cli.commands` runs each command
(``search`` in :mod:`~camretrieval.cli.search`, ``info`` in :mod:`~camretrieval.cli.info`), and :func:`main` is the one
boundary where a failure becomes a one-line message and a non-zero exit status: 2 for an expected one
(:class:`~camretrieval.errors.CamRetrievalError`, or the operating system refusing a file), 3 for a bug, whose
traceback ``CAMRETRIEVAL_DEBUG=1`` shows. Importing this package loads no torch, FAISS or model: each command imports what it uses when
it runs, after checking its arguments, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import os
import sys

from camretrieval.cli.commands import COMMANDS, read_queries_file
from camretrieval.cli.options import build_parser
from camretrieval.errors import CamRetrievalError

__all__ = ["build_parser", "main", "read_queries_file"]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help (0) or an argument error (2, said on stderr): an exit status like the others
        return exit.code if isinstance(exit.code, int) else 2
    # File names are bytes: one that is not UTF-8 is printed as the bytes the file system has, never an error.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    debug = os.environ.get("CAMRETRIEVAL_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command](args)
    except CamRetrievalError as error:
        if debug:
            raise
        print(f"camretrieval {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output was piped into a reader that stopped (| head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 1
    except OSError as error:  # a folder given as an output file, no permission, a full disk, ...
        if debug:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"camretrieval {args.command}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"camretrieval {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug: one line, and the way to see more
        if debug:
            raise
        print(
            f"camretrieval {args.command}: unexpected error ({type(error).__name__}: {error}); this is a bug: rerun "
            "with CAMRETRIEVAL_DEBUG=1 for the traceback and report it",
            file=sys.stderr,
        )
        return 3
