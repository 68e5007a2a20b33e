"""What each ``camretrieval`` command does with its parsed arguments (``run_<command>``, named in :data:`COMMANDS`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.datasets import (
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
from camretrieval.extraction.backbones import Backbone, WeightsNotFoundError, load_backbone
from camretrieval.extraction.describer import Describer, FileFailure
from camretrieval.extraction.fitting import fit_whitening, learn_classes
from camretrieval.extraction.images import find_images
from camretrieval.extraction.settings import (
    DEFAULT_BACKBONE,
    ExtractionSettings,
)
from camretrieval.method.class_list import ClassList
from camretrieval.method.regions import Box, parse_box
from camretrieval.method.whitening import PCAWhitening
from camretrieval.search.index import Index
from camretrieval.search.refinement import SearchOptions
from camretrieval.storage.maps import require_maps
from camretrieval.storage.writer import remove_images, update_index


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
        f"learned {whitening.input_dim} -> {whitening.dim_} PCA-whitening from {len(paths) - len(failures)} images "
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
