"""The ``camretrieval`` command's arguments: one sub-parser per command, every option with its help and default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from camretrieval.evaluation.datasets import (
    DATASET_NAMES,
)
from camretrieval.extraction.backbones import list_backbones
from camretrieval.extraction.settings import (
    DEFAULT_BACKBONE,
    DEFAULT_CLASSES,
    DEFAULT_POOLING,
    DEFAULT_SIZE,
    PRECISIONS,
)
from camretrieval.method.cell_major import DEFAULT_RERANK_CLASSES
from camretrieval.method.class_list import DEFAULT_LENGTH, DEFAULT_TOP
from camretrieval.method.pooling import POOLINGS
from camretrieval.storage.ann import ANN_KINDS
from camretrieval.storage.ray import DEFAULT_RAY_WORKERS
from camretrieval.storage.writer import DEFAULT_COMMIT_EVERY

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
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="the backbone's forward pass: float32, or autocast to bfloat16 / float16 (on a GPU: faster; the CAM "
        "arithmetic stays float32) (default: float32)",
    )
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
    _add_class_list_option(fit, "every image aggregated over that fixed list of classes (the PCA is learned on the "
                           "vectors of its first N_pca classes, and applies to that list only)")

    learn = commands.add_parser(
        "learn-classes",
        help="learn a fixed list of classes from example images of the collection's theme (paper section 4.3)",
        description="Count each example image's top-N classes (by the classifier's score) and keep the L most "
        "frequent: a class list for --class-list, which aggregates every image over exactly those classes.",
    )
    learn.add_argument("images_dir", type=Path, help="example images of the collection's theme (not the collection)")
    learn.add_argument("--output", type=Path, required=True, help="class-list file to write (.json)")
    learn.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"N, top classes counted per image (default: {DEFAULT_TOP})")
    learn.add_argument("--classes", type=int, default=DEFAULT_LENGTH, help=f"L, classes kept (default: {DEFAULT_LENGTH})")
    _add_extraction_options(learn, defaults_from_pca=False)

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
    _add_class_list_option(index, "the list the PCA file was learned with (the default, when it was: a PCA learned "
                           "with a class list applies to that list only); N_c is its length")
    index.add_argument(
        "--no-maps",
        action="store_true",
        help="do not store the images' feature maps (float16, about 0.7 MB per 448 x 597 image with "
        "efficientnet_lite0): smaller index, but no search --online or --rerank",
    )
    index.add_argument(
        "--commit-every",
        type=int,
        default=DEFAULT_COMMIT_EVERY,
        help="images described per commit: an interrupted run loses at most this many, and the next run goes on "
        f"from there (default: {DEFAULT_COMMIT_EVERY})",
    )

    index.add_argument(
        "--ann",
        choices=[*ANN_KINDS, "none"],
        default=None,
        help="also keep an approximate FAISS index for large collections (hnsw: a graph, fast and accurate; ivfpq: "
        "compressed, for millions of images), rebuilt after every change, its recall@100 against exact search "
        "printed; none: drop it (default: keep what the index has; a new index searches exactly)",
    )

    index.add_argument(
        "--float16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="search with the descriptors in float16: half the memory of the search index, no measurable mAP cost "
        "(docs/dynamic.md); --no-float16 goes back to float32 (default: keep what the index has; a new index: float32)",
    )
    index.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where images are described: this process (local, the default) or Ray workers (ray: pip install "
        "'camretrieval[ray]'; the workers must see the images and the index folder at the same paths)",
    )
    index.add_argument("--address", default=None, help="--engine ray: the Ray cluster to use (default: start a local one)")
    index.add_argument(
        "--ray-workers", type=int, default=DEFAULT_RAY_WORKERS, help=f"--engine ray: Ray workers (default: {DEFAULT_RAY_WORKERS})"
    )

    remove = commands.add_parser(
        "remove",
        help="remove images from an index",
        description="Remove images from an index (their descriptors and maps are no longer searched). An image "
        "still in the indexed folder comes back at the next camretrieval index of that folder.",
    )
    remove.add_argument("index_dir", type=Path)
    remove.add_argument("paths", nargs="*", help="images to remove: paths relative to the indexed folder, or absolute")
    remove.add_argument("--missing", action="store_true", help="also remove every indexed image no longer on disk")

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
    search.add_argument("--exact", action="store_true", help="exact search even if the index has an approximate one (--ann)")
    refine = search.add_argument_group("query-time refinement (METHOD.md sections 3 and 5; --online and --rerank need an index with maps)")
    refine.add_argument("--online", action="store_true", help="online aggregation: every database image aggregated with the query's classes")
    refine.add_argument("--online-classes", type=int, metavar="N", help="N_c of online aggregation (default: the index's)")
    refine.add_argument("--online-top", type=int, default=0, metavar="R", help="with --online: re-aggregate only the top R of the plain search (default: 0, all)")
    refine.add_argument("--rerank", type=int, default=0, metavar="R", help="re-rank the top R with CAM regions (default: 0, off)")
    refine.add_argument(
        "--rerank-classes", type=int, default=DEFAULT_RERANK_CLASSES, metavar="N",
        help=f"N_re, query classes describing the regions (default: {DEFAULT_RERANK_CLASSES})",
    )
    refine.add_argument("--qe", type=int, default=0, metavar="K", help="query expansion with the top K results (default: 0, off)")
    refine.add_argument("--qe-alpha", type=float, metavar="A", help="alpha-QE: weight the K results by similarity^A (default: average QE)")

    evaluation = commands.add_parser(
        "eval",
        help="score a configuration on a benchmark (mAP, revisited Easy/Medium/Hard, N-S) with its own protocol",
        description="Evaluate on a standard benchmark (--dataset NAME --data-root DIR) or on a folder of label "
        "sub-folders (--images DIR, every image a query against the others; boxes from boxes.json when present).",
    )
    _add_benchmark_options(evaluation)
    evaluation.add_argument("--pca", type=Path, help="PCA-whitening file (default: none, the raw descriptor)")
    evaluation.add_argument(
        "--pca-images", type=Path, help="learn the PCA-whitening on this folder first, instead of --pca"
    )
    _add_extraction_options(evaluation, defaults_from_pca=True)
    evaluation.add_argument(
        "--classes", type=int, default=DEFAULT_CLASSES, help=f"N_c for --pooling cam (default: {DEFAULT_CLASSES})"
    )
    _add_class_list_option(evaluation, "every image (and query) aggregated over that fixed list of classes (default: "
                           "the --pca file's list, if it was learned with one); N_c is its length")
    evaluation.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluation.add_argument(
        "--report", type=Path, metavar="DIR",
        help="also write an HTML report there: metrics, per-query AP, precision-recall curve, example queries",
    )

    tables = commands.add_parser(
        "tables",
        help="regenerate the paper's Tables 1a, 1b and 2 on a benchmark, PCA learned on another collection",
        description="All rows of the paper's tables from one extraction per backbone, as Markdown.",
    )
    _add_benchmark_options(tables)
    tables.add_argument("--pca-images", type=Path, required=True, help="folder the PCA-whitening is learned on")
    tables.add_argument("--size", type=int, default=DEFAULT_SIZE)
    tables.add_argument("--dim", type=int, default=512, help="PCA-whitening dimensions (default: 512)")
    tables.add_argument("--backbone", choices=list_backbones(), default=DEFAULT_BACKBONE)
    tables.add_argument(
        "--compare-backbones", nargs="*", default=list_backbones(),
        help="backbones for Table 1a's network comparison (those without weights here are skipped and said so)",
    )
    tables.add_argument("--output", type=Path, help="also write the tables to this Markdown file")
    tables.add_argument("--batch-size", type=int, default=16)
    tables.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    tables.add_argument("--device", default="cpu")
    tables.add_argument("--quiet", action="store_true")

    demo = commands.add_parser(
        "demo",
        help="index real sample photos and their edited copies, search them, and score the results",
        description="A self-contained run on scikit-image's sample photos: nothing to download or provide.",
    )
    demo.add_argument("--workdir", type=Path, help="keep the demo's images, PCA and index here (default: a temp folder)")
    demo.add_argument("--size", type=int, default=DEFAULT_SIZE)
    demo.add_argument("--top", type=int, default=5)

    serve = commands.add_parser(
        "serve",
        help="a web page (and JSON API) to search an index and see why each result matched",
        description="Serve a search page and its JSON API (docs/web.md) over an index; the model is loaded once.",
    )
    serve.add_argument("index_dir", type=Path)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    serve.add_argument("--device", default="cpu")

    explain = commands.add_parser(
        "explain",
        help="draw an image's top classes' CAMs (with their ImageNet names) and its CAM region proposals",
        description="Write a picture of an image's top classes' CAMs and its CAM region proposals.",
    )
    explain.add_argument("image", type=Path)
    explain.add_argument("--output", type=Path, help="PNG file to write (default: IMAGE_NAME.explain.png here)")
    explain.add_argument("--classes", type=int, default=5, help="top classes shown, each with its CAM (default: 5)")
    explain.add_argument("--box", help="x1,y1,x2,y2: explain this region's classes (as a box query)")
    explain.add_argument("--backbone", choices=list_backbones(), default=DEFAULT_BACKBONE)
    explain.add_argument("--weights", help="local weight file for backbones without packaged weights")
    explain.add_argument("--size", type=int, default=DEFAULT_SIZE, help=f"shorter side seen by the network (default: {DEFAULT_SIZE})")
    explain.add_argument("--device", default="cpu")
    return parser


def _add_class_list_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--class-list", type=Path, metavar="FILE", help=f"class list from camretrieval learn-classes: {what}")


def _add_benchmark_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASET_NAMES, help="a standard benchmark (with --data-root)")
    parser.add_argument(
        "--data-root", type=Path, help="folder holding <name>/gnd_<name>.pkl and <name>/jpg/ (revisitop, cirtorch)"
    )
    parser.add_argument("--images", type=Path, help="a folder of label sub-folders instead of --dataset")
    parser.add_argument("--distractors", type=Path, help="a folder of extra images added to the database")
