"""The ``camretrieval`` command: fit-pca, index, search, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .backbones import list_backbones, load_backbone
from .descriptor import (
    DEFAULT_BACKBONE,
    DEFAULT_CLASSES,
    DEFAULT_POOLING,
    DEFAULT_SIZE,
    POOLINGS,
    Describer,
    FileFailure,
    fit_whitening,
)
from .errors import CamRetrievalError
from .images import find_images
from .index import Index
from .regions import Box, parse_box
from .whitening import PCAWhitening

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def _add_extraction_options(parser: argparse.ArgumentParser, defaults_from_pca: bool) -> None:
    default_note = " (default: as in the PCA file)" if defaults_from_pca else ""
    parser.add_argument(
        "--backbone",
        choices=list_backbones(),
        default=None if defaults_from_pca else DEFAULT_BACKBONE,
        help=f"ImageNet classifier{default_note or f' (default: {DEFAULT_BACKBONE})'}",
    )
    parser.add_argument("--weights", help="local weight file (state dict) for backbones without packaged weights")
    parser.add_argument(
        "--feature-layer", help=f"layer whose maps are pooled (default: the backbone's own){default_note}"
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None if defaults_from_pca else DEFAULT_SIZE,
        help=f"shorter image side in pixels, aspect kept{default_note or f' (default: {DEFAULT_SIZE})'}",
    )
    parser.add_argument(
        "--pooling",
        choices=list(POOLINGS),
        default=None if defaults_from_pca else DEFAULT_POOLING,
        help="how the maps are pooled: cam (the paper's class weighting) or a baseline: "
        + "; ".join(f"{name}: {text}" for name, text in POOLINGS.items() if name != "cam")
        + (default_note or f" (default: {DEFAULT_POOLING})"),
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images decoded per DataLoader batch (default: 16)")
    parser.add_argument(
        "--workers", type=int, default=DEFAULT_WORKERS, help=f"decoding processes (default: {DEFAULT_WORKERS})"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camretrieval",
        description="Visual instance search with class-weighted convolutional features (BMVC 2017).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = commands.add_parser(
        "fit-pca",
        help="learn PCA-whitening on a folder of images (a different collection from the one you index)",
        description="Learn PCA-whitening on the top-N_pca class vectors of every image of a folder.",
    )
    fit.add_argument("images_dir", type=Path)
    fit.add_argument("pca_file", type=Path, help="output file (.npz)")
    _add_extraction_options(fit, defaults_from_pca=False)
    fit.add_argument("--dim", type=int, default=512, help="output dimensions (default: 512, or K when K <= 512)")
    fit.add_argument("--npca", type=int, default=1, help="class vectors per image used for fitting (default: 1)")

    index = commands.add_parser(
        "index", help="describe every image of a folder and store an index", description="Build an index of a folder."
    )
    index.add_argument("images_dir", type=Path)
    index.add_argument("index_dir", type=Path)
    index.add_argument("--pca", type=Path, required=True, help="PCA-whitening file from camretrieval fit-pca")
    _add_extraction_options(index, defaults_from_pca=True)
    index.add_argument(
        "--classes", type=int, default=DEFAULT_CLASSES, help=f"N_c, classes aggregated per image (default: {DEFAULT_CLASSES})"
    )

    search = commands.add_parser(
        "search",
        help="search an index with query images",
        description="Search an index with query images, each optionally with a box around the object.",
    )
    search.add_argument("index_dir", type=Path)
    search.add_argument("queries", nargs="*", metavar="QUERY", help="query image files")
    search.add_argument("--box", help="x1,y1,x2,y2 in the query's original pixels (with a single QUERY)")
    search.add_argument(
        "--queries", dest="queries_file", type=Path, help="file with one query a line: PATH or PATH x1 y1 x2 y2"
    )
    search.add_argument("--top", type=int, default=10, help="results per query (default: 10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of a table")
    search.add_argument("--device", default="cpu")

    demo = commands.add_parser(
        "demo",
        help="index real sample photos and their edited copies, search them, and score the results",
        description="A self-contained run on scikit-image's sample photos: nothing to download or provide.",
    )
    demo.add_argument("--workdir", type=Path, help="keep the demo's images, PCA and index here (default: a temp folder)")
    demo.add_argument("--size", type=int, default=DEFAULT_SIZE)
    demo.add_argument("--top", type=int, default=5)
    return parser


def _report_failures(failures: list[FileFailure], total: int) -> None:
    if failures:
        print(f"skipped {len(failures)} of {total} files that could not be used (listed above)", file=sys.stderr)


def run_fit_pca(args: argparse.Namespace) -> int:
    paths = find_images(args.images_dir)
    if not paths:
        raise CamRetrievalError(f"no images under {args.images_dir}")
    backbone = load_backbone(args.backbone, weights=args.weights, feature_layer=args.feature_layer)
    describer = Describer(backbone, size=args.size, device=args.device, pooling=args.pooling)
    started = time.perf_counter()
    whitening, failures = fit_whitening(
        describer, paths, args.images_dir, args.dim, args.npca, args.batch_size, args.workers, not args.quiet
    )
    args.pca_file.parent.mkdir(parents=True, exist_ok=True)
    whitening.save(args.pca_file)
    _report_failures(failures, len(paths))
    print(
        f"learned {whitening.input_dim} -> {whitening.dim} PCA-whitening from {len(paths) - len(failures)} images "
        f"({args.backbone}, size {args.size}, pooling {args.pooling}) in {time.perf_counter() - started:.1f} s: {args.pca_file}"
    )
    return 0


def run_index(args: argparse.Namespace) -> int:
    whitening = PCAWhitening.load(args.pca)
    learned = whitening.settings
    started = time.perf_counter()
    index, failures = Index.build(
        args.images_dir,
        whitening,
        backbone=args.backbone or learned.get("backbone", DEFAULT_BACKBONE),
        weights=args.weights,
        feature_layer=args.feature_layer or learned.get("feature_layer"),
        size=args.size or learned.get("size", DEFAULT_SIZE),
        n_classes=args.classes,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=not args.quiet,
        pooling=args.pooling or learned.get("pooling", DEFAULT_POOLING),
    )
    index.save(args.index_dir)
    elapsed = time.perf_counter() - started
    _report_failures(failures, len(index) + len(failures))
    print(
        f"indexed {len(index)} images in {elapsed:.1f} s ({elapsed / max(len(index), 1):.3f} s per image): "
        f"{args.index_dir}"
    )
    return 0


def read_queries_file(path: Path) -> list[tuple[str, Box | None]]:
    """One query a line: ``PATH`` or ``PATH x1 y1 x2 y2`` (the path may contain spaces); '#' starts a comment."""
    if not path.is_file():
        raise CamRetrievalError(f"queries file not found: {path}")
    queries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=4)
        if len(parts) == 5 and _all_numbers(parts[1:]):
            queries.append((parts[0], parse_box(" ".join(parts[1:]))))
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


def run_search(args: argparse.Namespace) -> int:
    queries: list[tuple[str, Box | None]] = [(query, None) for query in args.queries]
    if args.box is not None:
        if len(queries) != 1:
            raise CamRetrievalError("--box goes with exactly one QUERY; use --queries FILE for several boxes")
        queries = [(queries[0][0], parse_box(args.box))]
    if args.queries_file is not None:
        queries += read_queries_file(args.queries_file)
    if not queries:
        raise CamRetrievalError("no queries: give QUERY paths or --queries FILE")
    if args.top < 1:
        raise CamRetrievalError("--top must be at least 1")
    index = Index.open(args.index_dir, device=args.device)
    results, failed = [], 0
    for query, box in queries:
        try:
            hits = index.search([query], [box], args.top)[0]
        except CamRetrievalError as error:
            print(f"query {query}: {error}", file=sys.stderr)
            failed += 1
            continue
        results.append({"query": query, "results": [{"path": h.path, "score": h.score} for h in hits]})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(f"\n{result['query']}")
            print(f"  {'rank':>4}  {'score':>6}  path")
            for rank, hit in enumerate(result["results"], start=1):
                print(f"  {rank:>4}  {hit['score']:6.3f}  {hit['path']}")
    return 1 if failed else 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    return demo(workdir=args.workdir, size=args.size, top=args.top)


COMMANDS = {"fit-pca": run_fit_pca, "index": run_index, "search": run_search, "demo": run_demo}


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


if __name__ == "__main__":
    sys.exit(main())
