"""The ``camretrieval`` command: fit-pca, learn-classes, index, search, eval, tables, demo, serve, explain."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.datasets import (
    DATASET_NAMES,
    RetrievalDataset,
    image_folder,
    load_dataset,
    with_distractors,
)
from camretrieval.evaluation.runner import (
    Variant,
    VariantResult,
    evaluate_variants,
    fit_variant_whitenings,
    markdown_table,
    result_record,
    table_1a_variants,
    table_1b_variants,
    table_2_variants,
)
from camretrieval.extraction.backbones import Backbone, WeightsNotFoundError, list_backbones, load_backbone
from camretrieval.extraction.describer import Describer, FileFailure
from camretrieval.extraction.fitting import fit_whitening, learn_classes
from camretrieval.extraction.images import find_images
from camretrieval.extraction.settings import (
    DEFAULT_BACKBONE,
    DEFAULT_CLASSES,
    DEFAULT_POOLING,
    DEFAULT_SIZE,
    PRECISIONS,
    ExtractionSettings,
)
from camretrieval.method.cell_major import DEFAULT_RERANK_CLASSES
from camretrieval.method.class_list import DEFAULT_LENGTH, DEFAULT_TOP, ClassList
from camretrieval.method.pooling import POOLINGS
from camretrieval.method.regions import Box, parse_box
from camretrieval.method.whitening import PCAWhitening
from camretrieval.search.index import Index
from camretrieval.search.refinement import SearchOptions
from camretrieval.storage.ann import ANN_KINDS
from camretrieval.storage.maps import require_maps
from camretrieval.storage.ray import DEFAULT_RAY_WORKERS
from camretrieval.storage.writer import DEFAULT_COMMIT_EVERY, remove_images, update_index

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


def _class_list(path: Path | None, backbone: str, learned: dict) -> list[int] | None:
    """The classes of --class-list FILE (checked against the backbone), or of the PCA file when it was learned with a
    list; both given, they must be the same list."""
    from_pca = learned.get("class_list")
    if path is None:
        return from_pca
    listed = list(ClassList.load(path, backbone).classes)
    if learned and from_pca != listed:
        raise CamRetrievalError(
            f"the PCA-whitening was learned {'with another class list' if from_pca else 'without a class list'}: "
            f"learn it with camretrieval fit-pca --class-list {path}"
        )
    return listed


def _settings(args: argparse.Namespace, whitening: PCAWhitening | None, n_classes: int | None = None) -> ExtractionSettings:
    """The extraction settings of a command's options: each option given, else as the PCA-whitening was learned, else
    the defaults; --class-list checked against the PCA's list."""
    learned = whitening.settings if whitening is not None else {}
    class_list = _class_list(getattr(args, "class_list", None), args.backbone or learned.get("backbone", DEFAULT_BACKBONE), learned)
    return ExtractionSettings.from_pca(
        whitening, backbone=args.backbone, weights=args.weights, feature_layer=args.feature_layer, size=args.size,
        pooling=args.pooling, n_classes=n_classes, class_list=class_list,
    )


def _add_benchmark_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASET_NAMES, help="a standard benchmark (with --data-root)")
    parser.add_argument(
        "--data-root", type=Path, help="folder holding <name>/gnd_<name>.pkl and <name>/jpg/ (revisitop, cirtorch)"
    )
    parser.add_argument("--images", type=Path, help="a folder of label sub-folders instead of --dataset")
    parser.add_argument("--distractors", type=Path, help="a folder of extra images added to the database")


def _load_benchmark(args: argparse.Namespace) -> RetrievalDataset:
    if (args.dataset is None) == (args.images is None):
        raise CamRetrievalError("give either --dataset NAME --data-root DIR or --images DIR")
    if args.dataset is not None:
        if args.data_root is None:
            raise CamRetrievalError(f"--dataset {args.dataset} needs --data-root DIR")
        dataset = load_dataset(args.dataset, args.data_root)
    else:
        dataset = image_folder(args.images)
    if args.distractors is not None:
        dataset = with_distractors(dataset, args.distractors)
    return dataset


def _report_failures(failures: list[FileFailure], total: int) -> None:
    if failures:
        print(f"skipped {len(failures)} of {total} files that could not be used (listed above)", file=sys.stderr)


def run_fit_pca(args: argparse.Namespace) -> int:
    paths = find_images(args.images_dir)
    if not paths:
        raise CamRetrievalError(f"no images under {args.images_dir}")
    settings = _settings(args, None)
    class_list = settings.class_list
    describer = Describer.from_settings(settings, None, args.device, args.precision)
    started = time.perf_counter()
    whitening, failures = fit_whitening(
        describer, paths, args.images_dir, args.dim, args.npca, args.batch_size, args.workers, not args.quiet
    )
    args.pca_file.parent.mkdir(parents=True, exist_ok=True)
    whitening.save(args.pca_file)
    _report_failures(failures, len(paths))
    print(
        f"learned {whitening.input_dim} -> {whitening.dim} PCA-whitening from {len(paths) - len(failures)} images "
        f"({args.backbone}, size {args.size}, pooling {args.pooling}"
        f"{f', class list of {len(class_list)}' if class_list else ''}) in {time.perf_counter() - started:.1f} s: {args.pca_file}"
    )
    return 0


def run_learn_classes(args: argparse.Namespace) -> int:
    paths = find_images(args.images_dir)
    if not paths:
        raise CamRetrievalError(f"no images under {args.images_dir}")
    settings = ExtractionSettings(args.backbone, args.feature_layer, size=args.size, weights=args.weights)
    describer = Describer.from_settings(settings, None, args.device, args.precision)
    listed, failures = learn_classes(
        describer, paths, args.images_dir, args.top, args.classes, args.batch_size, args.workers, not args.quiet
    )
    listed.save(args.output)
    _report_failures(failures, len(paths))
    print(f"learned {len(listed)} classes from the top {listed.top} of {listed.n_images} images ({args.backbone}, "
          f"size {args.size}): {args.output}")
    for rank, (index, count) in enumerate(zip(listed.classes[:10], listed.counts[:10]), start=1):
        name = f"  {listed.names[rank - 1]}" if listed.names else ""
        print(f"{rank:>4}. class {index:>4} in {count:>5} images{name}")
    return 0


def run_index(args: argparse.Namespace) -> int:
    whitening = PCAWhitening.load(args.pca)
    report = update_index(
        args.index_dir,
        args.images_dir,
        whitening,
        _settings(args, whitening, n_classes=args.classes),
        keep_maps=False if args.no_maps else None,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        progress=not args.quiet,
        commit_every=args.commit_every,
        ann=args.ann,
        engine=args.engine,
        ray_address=args.address,
        ray_workers=args.ray_workers,
        precision=args.precision,
        float16=args.float16,
    )
    _report_failures(report.failures, report.added + report.updated)
    if report.failed_before:
        print(f"{report.failed_before} files that failed before and have not changed were not tried again", file=sys.stderr)
    if report.missing:
        print(
            f"{len(report.missing)} indexed images are no longer in {args.images_dir} and are still searched: "
            f"camretrieval remove {args.index_dir} --missing drops them",
            file=sys.stderr,
        )
    if report.ann:
        print(f"approximate index: {report.ann['kind']}, recall@100 {report.ann['recall_at_100']:.3f} against exact search")
    rate = f" ({report.seconds / report.described:.3f} s per image)" if report.described else ""
    print(
        f"indexed {report.described} images ({report.added} new files, {report.updated} changed, "
        f"{len(report.failures)} unusable; {report.unchanged} unchanged) in {report.seconds:.1f} s{rate}: "
        f"{report.total} images in {args.index_dir}"
    )
    return 0


def run_remove(args: argparse.Namespace) -> int:
    if not args.paths and not args.missing:
        raise CamRetrievalError("name the images to remove, or --missing for those no longer on disk")
    removed, unknown = remove_images(args.index_dir, args.paths, args.missing)
    for path in unknown:
        print(f"not in the index: {path}", file=sys.stderr)
    print(f"removed {removed} images from {args.index_dir}")
    return 0 if not unknown else 1


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
    if args.qe_alpha is not None and not args.qe:
        raise CamRetrievalError("--qe-alpha goes with --qe K")
    if args.online_top and not args.online:
        raise CamRetrievalError("--online-top goes with --online")
    options = SearchOptions(
        online=args.online,
        online_classes=args.online_classes,
        online_top=args.online_top,
        rerank=args.rerank,
        rerank_classes=args.rerank_classes,
        qe=args.qe,
        qe_alpha=args.qe_alpha or 0.0,
    )
    index = Index.open(args.index_dir, device=args.device, exact=args.exact)
    if options.needs_maps:  # one clear error, not one per query
        require_maps(index.maps, "--online" if options.online else "--rerank")
    results, failed = [], 0
    for query, box in queries:
        try:
            hits = index.search([query], [box], args.top, options)[0]
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


def run_eval(args: argparse.Namespace) -> int:
    if args.pca is not None and args.pca_images is not None:
        raise CamRetrievalError("give --pca FILE or --pca-images DIR, not both")
    dataset = _load_benchmark(args)
    whitening = PCAWhitening.load(args.pca) if args.pca is not None else None
    settings = _settings(args, whitening, n_classes=args.classes)
    pooling, n_classes = settings.pooling, settings.n_classes
    name = f", class list of {n_classes}" if settings.class_list else f", N_c = {n_classes}"
    variant = Variant(f"{pooling}" + (name if pooling == "cam" else ""), pooling, n_classes,
                      whiten=whitening is not None or args.pca_images is not None)
    describer = Describer.from_settings(settings, None, args.device, args.precision)
    whitenings = {pooling: whitening} if whitening is not None else {}
    if args.pca_images is not None:
        whitenings = fit_variant_whitenings(
            describer, [variant], find_images(args.pca_images), args.pca_images,
            batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
        )
    [result] = evaluate_variants(
        describer, dataset, [variant], whitenings, args.batch_size, args.workers, not args.quiet,
        keep_similarity=args.report is not None,
    )
    record_settings = describer.settings.to_dict() | {
        "weights": describer.backbone.weights, "whitening": str(args.pca or args.pca_images or "none"),
        "dataset": dataset.name, "database_images": len(dataset.images), "queries": len(dataset.queries),
    }
    record = result_record(result, record_settings)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{dataset.name}: {len(dataset.images)} database images, {len(dataset.queries)} queries")
        title = f"{settings.backbone}, size {settings.size}, whitening {record_settings['whitening']}"
        print(markdown_table(title, [result]))
    if args.report is not None:
        from camretrieval.evaluation.report import write_eval_report

        page = write_eval_report(args.report, dataset, result, record, describer)
        print(f"report: {page}", file=sys.stderr)
    return 0


def run_tables(args: argparse.Namespace) -> int:
    dataset = _load_benchmark(args)
    progress = not args.quiet
    pca_paths = find_images(args.pca_images)
    sections = [
        f"Tables on {dataset.name} ({len(dataset.images)} images, {len(dataset.queries)} queries), PCA-whitening "
        f"({args.dim}-d) learned on {args.pca_images.name} ({len(pca_paths)} images), size {args.size}.\n"
    ]

    def run(backbone: Backbone, variants: list[Variant]) -> list:
        describer = Describer(backbone, args.size, device=args.device)
        whitenings = fit_variant_whitenings(
            describer, variants, pca_paths, args.pca_images, args.dim, batch_size=args.batch_size, workers=args.workers,
            progress=progress,
        )
        return evaluate_variants(describer, dataset, variants, whitenings, args.batch_size, args.workers, progress)

    main_backbone = load_backbone(args.backbone)
    results = run(main_backbone, table_1a_variants() + table_1b_variants() + table_2_variants())
    by_name = {r.variant.name: r for r in results}
    table_1a = [by_name[v.name] for v in table_1a_variants()]
    table_1b = [by_name[v.name] for v in table_1b_variants()]
    table_2 = [by_name[v.name] for v in table_2_variants()]
    sections.append(markdown_table(f"Table 1a ({args.backbone})", table_1a, paper_column=1 if "paris" in dataset.name else 0))
    comparison = []
    for name in args.compare_backbones:
        try:
            backbone = main_backbone if name == args.backbone else load_backbone(name)
        except WeightsNotFoundError as error:
            sections.append(f"\n{name}: skipped, no weights here ({error})")
            continue
        rows = [by_name["Raw"], by_name["64 CAMs (OfA)"]] if name == args.backbone else run(
            backbone, [Variant("Raw", "sum", whiten=False), Variant("64 CAMs (OfA)", "cam", 64)]
        )
        comparison += [VariantResult(Variant(f"{name}: {r.variant.name}"), r.metrics, r.seconds_per_image) for r in rows]
    if comparison:
        sections.append(markdown_table("Table 1a, networks (raw vs 64 CAMs)", comparison))
    sections.append(markdown_table(f"Table 1b ({args.backbone}): number of classes", table_1b))
    sections.append(markdown_table(f"Table 2 ({args.backbone}): OfA at {args.dim} dimensions beside the baselines", table_2))
    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from camretrieval.demo import run_demo as demo

    return demo(workdir=args.workdir, size=args.size, top=args.top)


def run_serve(args: argparse.Namespace) -> int:
    from camretrieval.web import serve

    serve(args.index_dir, args.host, args.port, args.device)
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from camretrieval.explain import explain_figure, open_image_argument

    image = open_image_argument(args.image)
    settings = ExtractionSettings(args.backbone, size=args.size, weights=args.weights)
    describer = Describer.from_settings(settings, device=args.device)
    box = parse_box(args.box) if args.box else None
    figure, classes = explain_figure(describer, image, args.classes, box, title=f"{image.name} ({args.backbone}, {args.size} px)")
    output = args.output or Path(f"{image.stem}.explain.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(output)
    for rank, c in enumerate(classes, start=1):
        print(f"{rank:>2}. {c.probability:6.3f}  {c.name}  (class {c.index})")
    print(f"wrote {output}")
    return 0


COMMANDS = {
    "fit-pca": run_fit_pca,
    "learn-classes": run_learn_classes,
    "index": run_index,
    "remove": run_remove,
    "search": run_search,
    "eval": run_eval,
    "tables": run_tables,
    "demo": run_demo,
    "serve": run_serve,
    "explain": run_explain,
}


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
