"""The ``camretrieval`` command's arguments: one sub-parser per command, every option with its help and default.

This module imports nothing heavy (only :mod:`camretrieval.constants`): ``camretrieval --help``, every
``camretrieval COMMAND --help`` and every argument error answer without loading torch or a model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from camretrieval.constants import (
    ANN_KINDS,
    BACKBONE_NAMES,
    DATASET_NAMES,
    DEFAULT_BACKBONE,
    DEFAULT_CLASSES,
    DEFAULT_COMMIT_EVERY,
    DEFAULT_LENGTH,
    DEFAULT_NPCA,
    DEFAULT_ONLINE_TOP,
    DEFAULT_POOLING,
    DEFAULT_QE_GATE,
    DEFAULT_RAY_WORKERS,
    DEFAULT_RERANK_CLASSES,
    DEFAULT_SIZE,
    DEFAULT_TOP,
    DEFAULT_WHITENING_DIM,
    MIN_COLLECTION_WHITENING,
    POOLINGS,
    PRECISIONS,
    REFINE_ONLINE_CLASSES,
    box_numbers,
)

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
DEFAULT_EXPLAIN_TOP = 3  # search --html: results per query shown with why they matched


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help: the help's own words when it says "default", else "(default: off)" for a
    flag and "(default: VALUE)" for the rest (tests/test_cli_help.py checks that each option shows one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


def count(minimum: int, maximum: int | None = None):
    """An argparse type: an integer of at least ``minimum`` (and at most ``maximum``), checked while parsing, before
    anything is loaded."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}" if maximum is None else f"integer {minimum}..{maximum}"
    return parse


def non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def recall_target(text: str) -> float:
    """An argparse type: a recall in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a recall between 0 and 1, e.g. 0.95; got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a recall in (0, 1] (a fraction of the true top 100), e.g. 0.95; got {text}")
    return value


recall_target.__name__ = "recall"


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0."""
    value = non_negative_number(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


positive_seconds.__name__ = "seconds"


def box_text(text: str) -> tuple[float, float, float, float]:
    """An argparse type for ``"x1,y1,x2,y2"``: four numbers (:func:`camretrieval.constants.box_numbers`). Whether
    the box fits its image is checked when the image is read."""
    try:
        return box_numbers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


box_text.__name__ = "box"


def scales_text(text: str) -> tuple[float, ...]:
    """An argparse type for ``"1,0.707,0.5"``: numbers in (0, 1], 1 among them (checked again by the settings)."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give factors of --size separated by commas, e.g. 1,0.707,0.5") from None
    if not values or 1.0 not in values or not all(0 < value <= 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: the scales must lie in (0, 1] and include 1, e.g. 1,0.707,0.5")
    return values


scales_text.__name__ = "scales"


def _add_extraction_options(parser: argparse.ArgumentParser, defaults_from: str | None) -> None:
    """--backbone, --weights, --feature-layer, --size, --pooling, and how to run: --batch-size, --workers, --device,
    --precision, --quiet. ``defaults_from``: None (fixed defaults), "pca" (as the --pca file was learned) or "index"
    (as the index was built, else as the --pca file was learned)."""
    if defaults_from is None:
        def default(value: object) -> str:
            return f"(default: {value})"
    elif defaults_from == "pca":
        def default(value: object) -> str:
            return f"(default: as the --pca file was learned, else {value})"
    else:
        def default(value: object) -> str:
            return f"(default: as the existing index was built, else as the --pca file was learned, else {value})"
    fixed = defaults_from is None
    parser.add_argument(
        "--backbone",
        choices=BACKBONE_NAMES,
        default=DEFAULT_BACKBONE if fixed else None,
        help=f"ImageNet classifier (docs/backbones.md) {default(DEFAULT_BACKBONE)}",
    )
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="local weight file (state dict) for backbones without packaged weights "
        + ("(default: the packaged weights, or torchvision's checkpoint in the torch hub cache)" if fixed
           else default("the packaged weights")),
    )
    own_layer = "the backbone's own layer (docs/backbones.md)"
    parser.add_argument("--feature-layer", metavar="NAME", help=f"layer whose maps are pooled {default(own_layer)}")
    parser.add_argument(
        "--size",
        type=count(1),
        default=DEFAULT_SIZE if fixed else None,
        metavar="PX",
        help=f"shorter image side in pixels, aspect kept (docs/method.md) {default(DEFAULT_SIZE)}",
    )
    parser.add_argument(
        "--pooling",
        choices=list(POOLINGS),
        default=DEFAULT_POOLING if fixed else None,
        help="how the maps are pooled: cam (the paper's class weighting) or a baseline: "
        + "; ".join(f"{name}: {text}" for name, text in POOLINGS.items() if name != "cam")
        + f" {default(DEFAULT_POOLING)}",
    )
    parser.add_argument(
        "--scales",
        type=scales_text,
        metavar="S,S,...",
        help="multi-scale descriptors: each image also described at these factors of --size, the vectors of every "
        "scale averaged (as cirtorch does), e.g. 1,0.707,0.5; each in (0, 1], 1 included; the stored maps are "
        "the first scale's (docs/method.md) " + default("1: single-scale"),
    )
    _add_run_options(parser)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="the backbone's forward pass: float32, or autocast to bfloat16 / float16 (on a GPU: faster; the CAM "
        "arithmetic stays float32)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=count(1), default=None, metavar="N",
        help="images per forward pass (default: the fastest on this machine, measured once per backbone, size and "
        "device, and cached)",
    )
    parser.add_argument("--workers", type=count(0), default=DEFAULT_WORKERS, metavar="N", help="decoding processes")
    _add_device_option(parser)


def _add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda or cuda:1")


def _add_whitening_size_options(parser: argparse.ArgumentParser, when: str | None) -> None:
    """--dim and --npca, as fit-pca has them; ``when``: the case they apply to (None: always), with their defaults
    None so that a command can tell whether they were given."""
    note = f"{when}: " if when else ""
    defaults = {"dim": DEFAULT_WHITENING_DIM, "npca": DEFAULT_NPCA} if when is None else {"dim": None, "npca": None}
    parser.add_argument(
        "--dim", type=count(1), default=defaults["dim"], metavar="D",
        help=f"{note}PCA-whitening output dimensions (default: {DEFAULT_WHITENING_DIM}; at most the vectors' K, and "
        "fewer when the training images support fewer)",
    )
    parser.add_argument(
        "--npca", type=count(1), default=defaults["npca"], metavar="N",
        help=f"{note}class vectors per image the PCA-whitening is learned on, N_pca (default: {DEFAULT_NPCA})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="camretrieval",
        description="Visual instance search with class-weighted convolutional features (BMVC 2017). "
        "How it works: docs/method.md; every command: camretrieval COMMAND --help.",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)

    fit = command(
        "fit-pca",
        "learn PCA-whitening on a folder of images (a different collection from the one you index)",
        "Learn PCA-whitening on the top-N_pca class vectors of every image of a folder (docs/method.md).",
    )
    fit.add_argument("images_dir", type=Path, help="folder of images to learn from (searched recursively)")
    fit.add_argument("pca_file", type=Path, help="output file (.npz)")
    _add_extraction_options(fit, defaults_from=None)
    _add_whitening_size_options(fit, when=None)
    _add_class_list_option(fit, "every image aggregated over that fixed list of classes (the PCA is learned on the "
                           "vectors of its first N_pca classes, and applies to that list only) (default: none)")

    learn = command(
        "learn-classes",
        "learn a fixed list of classes from example images of the collection's theme (paper section 4.3)",
        "Count each example image's top-N classes (by the classifier's score) and keep the L most frequent: a class "
        "list for --class-list, which aggregates every image over exactly those classes (docs/refinement.md).",
    )
    learn.add_argument("images_dir", type=Path, help="example images of the collection's theme (not the collection)")
    learn.add_argument("--output", type=Path, required=True, metavar="FILE", help="class-list file to write (.json) (required)")
    learn.add_argument("--top", type=count(1), default=DEFAULT_TOP, metavar="N", help="N, top classes counted per image")
    learn.add_argument("--classes", type=count(1), default=DEFAULT_LENGTH, metavar="L", help="L, classes kept")
    _add_extraction_options(learn, defaults_from=None)

    index = command(
        "index",
        "describe every image of a folder into an index (again: only new and changed images)",
        "Build or update the index of a folder: only images new or changed since the last run are described. "
        "Without --pca, a new index learns its PCA-whitening on (a sample of) the collection itself; an existing "
        "index keeps its whitening and, for every option not given, its settings.",
    )
    index.add_argument("images_dir", type=Path, help="folder of images (searched recursively)")
    index.add_argument("index_dir", type=Path, help="index folder (created if needed)")
    index.add_argument(
        "--pca", type=Path, metavar="FILE",
        help="PCA-whitening file from camretrieval fit-pca, learned on another collection (as the paper does) "
        "(default: the existing index's whitening, else as --whiten says)",
    )
    index.add_argument(
        "--whiten", choices=["auto", "collection", "none"], default="auto",
        help="without --pca, for a new index: learn the whitening on the collection itself, sized by --dim and "
        f"--npca (collection), only when it has at least {MIN_COLLECTION_WHITENING} images (auto: on fewer it "
        "measured worse than none, docs/method.md), or index unwhitened descriptors (none)",
    )
    _add_whitening_size_options(index, when="without --pca, for a new index")
    _add_extraction_options(index, defaults_from="index")
    index.add_argument(
        "--classes", type=count(1), default=None, metavar="N_C",
        help=f"N_c, classes aggregated per image (default: the existing index's, else {DEFAULT_CLASSES})",
    )
    _add_class_list_option(index, "the list the PCA file was learned with (the default, when it was: a PCA learned "
                           "with a class list applies to that list only; else the existing index's list, else none); "
                           "N_c is its length")
    index.add_argument(
        "--no-maps",
        action="store_true",
        help="do not store the images' feature maps (compressed, about 37 kB per 448 x 597 image with "
        "efficientnet_lite0): smaller index, but no search --online or --rerank (default: store them for --pooling "
        "cam, as the existing index does)",
    )
    index.add_argument(
        "--verify", action="store_true",
        help="first decode every stored block of maps, not only check the files' headers "
        "and lengths: the images of a shard damaged inside are described again (default: off)",
    )
    index.add_argument(
        "--commit-every",
        type=count(1),
        default=DEFAULT_COMMIT_EVERY,
        metavar="N",
        help="images described per commit: an interrupted run loses at most this many, and the next run goes on "
        "from there",
    )
    index.add_argument(
        "--ann",
        choices=[*ANN_KINDS, "none"],
        default=None,
        help="also keep an approximate FAISS index for large collections (ivf: inverted lists of compressed codes, "
        "candidates re-scored exactly, for up to millions of images; hnsw: a graph, fast, slow to build; ivfpq: "
        "compressed only, 1/14 of the memory, recall@100 under 0.9), rebuilt after every change, its recall@100 "
        "against exact search printed; none: drop it (default: keep what the index has; a new index searches "
        "exactly). docs/search_scale.md compares them",
    )
    index.add_argument(
        "--recall",
        type=recall_target,
        default=None,
        metavar="R",
        help="the recall@100 against exact search the approximate index must keep: its search effort (lists "
        "visited, candidates re-scored, efSearch) is set to the cheapest that reaches R on held-out images of the "
        "collection (default: keep what the index has; a new ivf index: 0.95; hnsw and ivfpq: their fixed effort)",
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
        help="where images are described: this process (local) or Ray workers (ray: pip install "
        "'camretrieval[ray]'; the workers must see the images and the index folder at the same paths)",
    )
    index.add_argument(
        "--address", default=None, help="--engine ray: the Ray cluster to use (default: start a local one)"
    )
    index.add_argument(
        "--ray-workers", type=count(1), default=DEFAULT_RAY_WORKERS, metavar="N", help="--engine ray: Ray workers"
    )
    index.add_argument(
        "--watch",
        action="store_true",
        help="keep running after the update and follow the folder: images that appear, change, are renamed or "
        "disappear are added, described again or removed, in batches of commits, searchable all along; Ctrl-C or "
        "SIGTERM stops it cleanly (docs/dynamic.md)",
    )
    index.add_argument(
        "--poll", type=positive_seconds, default=None, metavar="SECONDS",
        help="--watch: list the folder every SECONDS instead of waiting for file-system events (for network file "
        "systems; the default: events, and polling every 2 s where they cannot start)",
    )

    info = command(
        "info",
        "what an index holds and how it was made: images, folder, settings, whitening, maps, size",
        "Describe an index: its images (and files that could not be read), the indexed folder, the extraction "
        "settings, where its whitening comes from, whether it stores maps, its approximate index and recall, its size "
        "on disk and when it last changed. Reads the catalog only (no model is loaded).",
    )
    info.add_argument("index_dir", type=Path, help="index folder")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    remove = command(
        "remove",
        "remove images from an index",
        "Remove images from an index (their descriptors and maps are no longer searched). An image still in the "
        "indexed folder comes back at the next camretrieval index of that folder.",
    )
    remove.add_argument("index_dir", type=Path, help="index folder")
    remove.add_argument(
        "paths", nargs="*", metavar="PATH",
        help="images to remove: paths as the index lists them (relative to the indexed folder), paths relative to "
        "the current folder, or absolute paths, under the indexed folder (default: none)",
    )
    remove.add_argument("--missing", action="store_true", help="also remove every indexed image no longer on disk")

    search = command(
        "search",
        "search an index with query images",
        "Search an index with query images, each optionally with a box around the object.",
    )
    search.add_argument("index_dir", type=Path, help="index folder")
    search.add_argument("queries", nargs="*", metavar="QUERY", help="query image files (default: none; see --queries)")
    search.add_argument(
        "--box", type=box_text, metavar="X1,Y1,X2,Y2",
        help="a box around the object, in the query's original pixels (with a single QUERY) (default: the whole image)",
    )
    search.add_argument(
        "--queries", dest="queries_file", type=Path, metavar="FILE",
        help="file with one query a line: PATH or PATH x1 y1 x2 y2 (default: none)",
    )
    search.add_argument("--top", type=count(1), default=10, metavar="K", help="results per query")
    search.add_argument(
        "--json", action="store_true",
        help='print JSON instead of a table: [{"query", "root", "results": [{"path", "score"}]}] (README.md)',
    )
    search.add_argument(
        "--html", type=Path, metavar="FILE",
        help="also write a self-contained page of the results there: each query with its box, the ranked thumbnails "
        "with their scores (each links to its image file), the refinement used, and why the first --explain-top "
        "results matched (default: none)",
    )
    search.add_argument(
        "--explain-top", type=count(0), default=DEFAULT_EXPLAIN_TOP, metavar="N",
        help="with --html: show why the first N results of each query matched (CAM heatmaps and the matched region; "
        "a few forward passes each: 0.15 s at --size 256 on 2 CPU cores); 0: none",
    )
    _add_device_option(search)
    search.add_argument(
        "--exact", action="store_true", help="exact search even if the index has an approximate one (index --ann)"
    )
    _add_refinement_options(search)

    evaluation = command(
        "eval",
        "score a configuration on a benchmark (mAP, revisited Easy/Medium/Hard, N-S) with its own protocol",
        "Evaluate on a standard benchmark (--dataset NAME --data-root DIR) or on a folder of label sub-folders "
        "(--images DIR, every image a query against the others; boxes from boxes.json when present).",
    )
    _add_benchmark_options(evaluation)
    evaluation.add_argument("--pca", type=Path, metavar="FILE", help="PCA-whitening file (default: none, the raw descriptor)")
    evaluation.add_argument(
        "--pca-images", type=Path, metavar="DIR",
        help="learn the PCA-whitening on this folder first, instead of --pca (default: none)",
    )
    _add_whitening_size_options(evaluation, when="with --pca-images")
    _add_extraction_options(evaluation, defaults_from="pca")
    evaluation.add_argument(
        "--classes", type=count(1), default=DEFAULT_CLASSES, metavar="N_C", help="N_c for --pooling cam"
    )
    _add_class_list_option(evaluation, "every image (and query) aggregated over that fixed list of classes (default: "
                           "the --pca file's list, if it was learned with one); N_c is its length")
    evaluation.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluation.add_argument(
        "--report", type=Path, metavar="DIR",
        help="also write an HTML report there: metrics, per-query AP, precision-recall curve, example queries "
        "(default: none)",
    )
    _add_refinement_options(evaluation)
    evaluation.add_argument(
        "--index", type=Path, metavar="DIR",
        help="with a refinement: the index of the database images it is evaluated on, kept there (built when missing, "
        "grown or reused when it holds the same settings; default: a temporary folder)",
    )

    tables = command(
        "tables",
        "regenerate the paper's Tables 1a, 1b and 2 on a benchmark, PCA learned on another collection",
        "All rows of the paper's tables from one extraction per backbone, as Markdown (docs/evaluation.md).",
    )
    _add_benchmark_options(tables)
    tables.add_argument(
        "--pca-images", type=Path, required=True, metavar="DIR", help="folder the PCA-whitening is learned on (required)"
    )
    _add_whitening_size_options(tables, when=None)
    tables.add_argument("--size", type=count(1), default=DEFAULT_SIZE, metavar="PX", help="shorter image side in pixels")
    tables.add_argument(
        "--scales", type=scales_text, default=(1.0,), metavar="S,S,...",
        help="every row multi-scale: each image also described at these factors of --size, e.g. 1,0.707,0.5 "
        "(docs/method.md; default: 1, single-scale)",
    )
    tables.add_argument("--backbone", choices=BACKBONE_NAMES, default=DEFAULT_BACKBONE, help="ImageNet classifier")
    tables.add_argument(
        "--compare-backbones", nargs="*", choices=BACKBONE_NAMES, default=list(BACKBONE_NAMES), metavar="NAME",
        help="backbones for Table 1a's network comparison; those without weights here are skipped and said so "
        "(default: all of them)",
    )
    tables.add_argument("--output", type=Path, metavar="FILE", help="also write the tables to this Markdown file (default: none)")
    _add_run_options(tables)
    tables.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = command(
        "demo",
        "index real sample photos and their edited copies, search them, and score the results",
        "A self-contained run on scikit-image's sample photos: nothing to download or provide.",
    )
    demo.add_argument("--workdir", type=Path, metavar="DIR", help="keep the demo's images, PCA and index here (default: a temporary folder)")
    demo.add_argument("--size", type=count(1), default=DEFAULT_SIZE, metavar="PX", help="shorter image side in pixels")
    demo.add_argument("--top", type=count(1), default=5, metavar="K", help="results shown per query")

    serve = command(
        "serve",
        "a web page (and JSON API) to search an index and see why each result matched",
        "Serve a search page and its JSON API (docs/web.md) over an index; the model is loaded once.",
    )
    serve.add_argument("index_dir", type=Path, help="index folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=count(0, 65535), default=8000, help="port to listen on")
    _add_device_option(serve)

    explain = command(
        "explain",
        "draw an image's top classes' CAMs (with their ImageNet names) and its CAM region proposals",
        "Write a picture of an image's top classes' CAMs and its CAM region proposals, and print its top classes "
        "with their probabilities. With --index, the image is seen as that index sees it (its backbone, size, "
        "weights).",
    )
    explain.add_argument("image", type=Path, help="image file")
    explain.add_argument(
        "--index", type=Path, metavar="DIR",
        help="describe the image as this index does: with its backbone, size and weights (default: none: as "
        "--backbone, --size and --weights say)",
    )
    explain.add_argument("--output", type=Path, metavar="FILE", help="PNG file to write (default: IMAGE_NAME.explain.png here)")
    explain.add_argument("--classes", type=count(1), default=5, metavar="N", help="top classes shown, each with its CAM")
    explain.add_argument(
        "--box", type=box_text, metavar="X1,Y1,X2,Y2",
        help="explain this region's classes (as a box query) (default: the whole image)",
    )
    explain.add_argument(
        "--backbone", choices=BACKBONE_NAMES, help=f"ImageNet classifier (default: the --index's, else {DEFAULT_BACKBONE})"
    )
    explain.add_argument(
        "--weights", metavar="FILE",
        help="local weight file for backbones without packaged weights (default: the --index's, else the packaged "
        "weights)",
    )
    explain.add_argument(
        "--size", type=count(1), metavar="PX",
        help=f"shorter side seen by the network (default: the --index's, else {DEFAULT_SIZE})",
    )
    _add_device_option(explain)
    return parser


def _add_refinement_options(parser: argparse.ArgumentParser) -> None:
    """Query-time refinement: ``search`` and ``eval`` take the same flags (cli.search.refinement_options)."""
    refine = parser.add_argument_group(
        "query-time refinement (the paper's sections 3 and 5: docs/method.md, docs/refinement.md; --online and "
        "--rerank need an index with maps)"
    )
    refine.add_argument(
        "--refine", action="store_true",
        help=f"the measured best refinement for box queries (docs/refinement.md): online aggregation with the query's "
        f"top {REFINE_ONLINE_CLASSES} classes, unwhitened, over the top {DEFAULT_ONLINE_TOP} of the plain search; the "
        "flags below are its parts, for experts",
    )
    refine.add_argument(
        "--online", action="store_true",
        help="online aggregation: every database image aggregated with the query's classes",
    )
    refine.add_argument(
        "--online-classes", type=count(1), metavar="N", help="N_c of online aggregation (default: the index's)"
    )
    refine.add_argument(
        "--online-top", type=count(0), metavar="R",
        help=f"with --online: re-aggregate only the top R of the plain search, which bounds a query's cost on a large "
        f"index (default: {DEFAULT_ONLINE_TOP}; 0: every image)",
    )
    refine.add_argument(
        "--online-unwhitened", action="store_true",
        help="with --online: aggregate without the PCA-whitening (the raw class vectors); not with --rerank or --qe",
    )
    refine.add_argument(
        "--rerank", type=count(0), default=0, metavar="R", help="re-rank the top R with CAM regions (default: 0, off)"
    )
    refine.add_argument(
        "--rerank-classes", type=count(1), default=DEFAULT_RERANK_CLASSES, metavar="N",
        help="N_re, query classes describing the regions",
    )
    refine.add_argument(
        "--qe", type=count(0), default=0, metavar="K", help="query expansion with the top K results (default: 0, off)"
    )
    refine.add_argument(
        "--qe-alpha", type=non_negative_number, metavar="A",
        help="alpha-QE: weight the K results by similarity^A (default: average QE)",
    )
    refine.add_argument(
        "--qe-gate", type=count(0), metavar="k",
        help="with --qe: expand only with those of the K results that are k-reciprocal neighbours of the query, so "
        f"that QE helps where the first results are right and stays out where they are not (docs/refinement.md; "
        f"default: {DEFAULT_QE_GATE}; 0: every one of the K, the paper's QE)",
    )


def _add_class_list_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--class-list", type=Path, metavar="FILE", help=f"class list from camretrieval learn-classes: {what}")


def _add_benchmark_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset", choices=DATASET_NAMES, help="a standard benchmark, with --data-root (default: none, see --images)"
    )
    parser.add_argument(
        "--data-root", type=Path, metavar="DIR",
        help="folder holding <name>/gnd_<name>.pkl and <name>/jpg/ (revisitop, cirtorch) (default: none)",
    )
    parser.add_argument(
        "--images", type=Path, metavar="DIR", help="a folder of label sub-folders instead of --dataset (default: none)"
    )
    parser.add_argument(
        "--distractors", type=Path, metavar="DIR", help="a folder of extra images added to the database (default: none)"
    )
