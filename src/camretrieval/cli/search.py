"""``camretrieval search``: query files (and their boxes) against an index, printed as a table or JSON, and
optionally written as an HTML page (:mod:`camretrieval.explain.results_page`).

Nothing heavy is imported until the arguments have been checked; then only what a search uses (the index, its
backbone, FAISS): no web server, no SciPy unless the refinement needs region proposals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from camretrieval.errors import CamRetrievalError

if TYPE_CHECKING:
    from camretrieval.search.index import Index
    from camretrieval.search.refinement import SearchOptions

Box = tuple[float, float, float, float]  # as camretrieval.method.regions.Box (not imported: it loads torch)


def read_queries_file(path: Path) -> list[tuple[str, Box | None]]:
    """One query a line: ``PATH`` or ``PATH x1 y1 x2 y2`` (the path may contain spaces); '#' starts a comment.
    ``-`` reads standard input; a pipe (``/dev/stdin``, a shell's ``<(...)``) is read like a file. Lines are file
    names, so bytes that are not UTF-8 are kept as the file system's own (``os.fsdecode``)."""
    if str(path) == "-":
        data = sys.stdin.buffer.read()
    else:
        if not path.exists():
            raise CamRetrievalError(f"queries file not found: {path}")
        if path.is_dir():
            raise CamRetrievalError(f"{path} is a folder: --queries takes a file of one query a line")
        data = path.read_bytes()
    queries: list[tuple[str, Box | None]] = []
    for number, line in enumerate(os.fsdecode(data).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=4)
        if len(parts) == 5 and _all_numbers(parts[1:]):
            queries.append((parts[0], tuple(float(part) for part in parts[1:])))  # type: ignore[misc]
        elif _all_numbers(parts[1:]) and len(parts) > 1:
            raise CamRetrievalError(f"{path}:{number}: a box needs four numbers x1 y1 x2 y2: {line!r}")
        else:
            queries.append((line, None))
    return queries


def _all_numbers(texts: list[str]) -> bool:
    try:
        [float(text) for text in texts]
    except ValueError:
        return False
    return True


def check_refinement_arguments(args: argparse.Namespace) -> None:
    """The refinement flags (cli.options._add_refinement_options) that do not go together, refused by name."""
    parts = (args.online, args.rerank, args.qe, args.online_top is not None, args.online_classes is not None,
             args.online_unwhitened, args.qe_alpha is not None, args.qe_gate is not None)
    if args.refine and any(parts):
        raise CamRetrievalError("--refine is a complete refinement: give it alone, or its parts (--online ...) instead")
    if args.qe_alpha is not None and not args.qe:
        raise CamRetrievalError("--qe-alpha goes with --qe K")
    if args.qe_gate is not None and not args.qe:
        raise CamRetrievalError("--qe-gate goes with --qe K")
    if args.online_top is not None and not args.online:
        raise CamRetrievalError("--online-top goes with --online")
    if args.online_classes is not None and not args.online:
        raise CamRetrievalError("--online-classes goes with --online")
    if args.online_unwhitened and not args.online:
        raise CamRetrievalError("--online-unwhitened goes with --online")
    if args.online_unwhitened and (args.rerank or args.qe):
        raise CamRetrievalError("--online-unwhitened ranks in the raw feature space: not with --rerank or --qe")


def refinement_options(args: argparse.Namespace) -> "SearchOptions":
    """The :class:`~camretrieval.search.refinement.SearchOptions` of the refinement flags (checked first)."""
    check_refinement_arguments(args)
    from camretrieval.search.refinement import SearchOptions  # here: it loads torch

    return SearchOptions.refine() if args.refine else SearchOptions(
        online=args.online,
        online_classes=args.online_classes,
        online_top=args.online_top,
        online_whitening=not args.online_unwhitened,
        rerank=args.rerank,
        rerank_classes=args.rerank_classes,
        qe=args.qe,
        qe_alpha=args.qe_alpha or 0.0,
        qe_gate=args.qe_gate,
    )


def _queries(args: argparse.Namespace) -> list[tuple[str, Box | None]]:
    """The queries of the command line, checked (before anything heavy is imported; the refinement flags are
    checked by :func:`refinement_options`)."""
    queries: list[tuple[str, Box | None]] = [(query, None) for query in args.queries]
    if args.box is not None:
        if len(queries) != 1:
            raise CamRetrievalError("--box goes with exactly one QUERY; use --queries FILE for several boxes")
        queries = [(queries[0][0], tuple(args.box))]  # type: ignore[list-item]
    if args.queries_file is not None:
        queries += read_queries_file(args.queries_file)
    if not queries:
        raise CamRetrievalError("no queries: give QUERY paths or --queries FILE")
    if args.html is not None and args.html.is_dir():
        raise CamRetrievalError(f"--html {args.html} is a folder: name the page's file, e.g. {args.html / 'results.html'}")
    return queries


def require_refinement_maps(index: "Index", options: "SearchOptions", args: argparse.Namespace) -> None:
    """One clear error, naming the flag, when ``options`` need maps that ``index`` was built without."""
    if options.needs_maps:
        from camretrieval.storage.maps import require_maps

        require_maps(index.maps, "--refine" if args.refine else "--online" if options.online else "--rerank")


def run_search(args: argparse.Namespace) -> int:
    queries = _queries(args)
    options = refinement_options(args)  # checked after the queries, before the index is opened
    from camretrieval.search.index import Index

    index = Index.open(args.index_dir, device=args.device, exact=args.exact)
    require_refinement_maps(index, options, args)  # one clear error, not one per query
    root = str(index.image_root) if index.image_root is not None else None
    results, answered, failed = [], [], 0
    for query, box in queries:
        try:
            hits = index.search([query], [box], args.top, options)[0]
        except CamRetrievalError as error:
            print(f"query {query}: {error}", file=sys.stderr)
            failed += 1
            continue
        results.append({"query": query, "root": root, "results": [{"path": h.path, "score": h.score} for h in hits]})
        answered.append((query, box, hits))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        if root is not None:
            print(f"{len(index)} images under {root}")
        for result in results:
            print(f"\n{result['query']}")
            print(f"  {'rank':>4}  {'score':>6}  path")
            for rank, hit in enumerate(result["results"], start=1):
                print(f"  {rank:>4}  {hit['score']:6.3f}  {hit['path']}")
    if args.html is not None:
        from camretrieval.explain.results_page import QueryResults, write_results_page

        page = write_results_page(
            args.html, index, [QueryResults(query, box, hits) for query, box, hits in answered], options,
            explain_top=args.explain_top, index_dir=args.index_dir,
        )
        print(f"page: {page}", file=sys.stderr)
    return 1 if failed else 0
