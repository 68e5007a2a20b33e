"""What each ``camretrieval`` command does with its parsed arguments (``run_<command>``, named in :data:`COMMANDS`).

Each ``run_<command>`` checks its arguments first and imports what it needs inside, so that a command pays only for
what it uses and an argument error answers at once: this module itself imports nothing heavy. ``search`` is in
:mod:`camretrieval.cli.search`, ``info`` in :mod:`camretrieval.cli.info`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from camretrieval.cli.info import run_info, scales_note
from camretrieval.cli.search import read_queries_file, refinement_options, require_refinement_maps, run_search
from camretrieval.constants import DEFAULT_BACKBONE, DEFAULT_NPCA, DEFAULT_WHITENING_DIM, MIN_COLLECTION_WHITENING
from camretrieval.errors import CamRetrievalError

if TYPE_CHECKING:  # annotations only
    from camretrieval.evaluation.datasets import RetrievalDataset
    from camretrieval.evaluation.runner import Variant, VariantResult
    from camretrieval.extraction.describer import Describer, FileFailure
    from camretrieval.extraction.settings import ExtractionSettings
    from camretrieval.method.whitening import PCAWhitening
    from camretrieval.search.refinement import SearchOptions

__all__ = ["COMMANDS", "read_queries_file"]


def _class_list(path: Path | None, backbone: str, learned: dict) -> list[int] | None:
    """The classes of --class-list FILE (checked against the backbone), or of the PCA file when it was learned with a
    list; both given, they must be the same list."""
    from camretrieval.method.class_list import ClassList

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
    from camretrieval.extraction.settings import ExtractionSettings

    learned = whitening.settings if whitening is not None else {}
    class_list = _class_list(getattr(args, "class_list", None), args.backbone or learned.get("backbone", DEFAULT_BACKBONE), learned)
    return ExtractionSettings.from_pca(
        whitening, backbone=args.backbone, weights=args.weights, feature_layer=args.feature_layer, size=args.size,
        pooling=args.pooling, n_classes=n_classes, class_list=class_list, scales=getattr(args, "scales", None),
    )


def _load_benchmark(args: argparse.Namespace) -> RetrievalDataset:
    from camretrieval.evaluation.datasets import image_folder, load_dataset, with_distractors

    if args.dataset is not None:
        dataset = load_dataset(args.dataset, args.data_root)
    else:
        dataset = image_folder(args.images)
    if args.distractors is not None:
        dataset = with_distractors(dataset, args.distractors)
    return dataset


def _check_benchmark_arguments(args: argparse.Namespace) -> None:
    if (args.dataset is None) == (args.images is None):
        raise CamRetrievalError("give either --dataset NAME --data-root DIR or --images DIR")
    if args.dataset is not None and args.data_root is None:
        raise CamRetrievalError(f"--dataset {args.dataset} needs --data-root DIR")


def _report_failures(failures: list[FileFailure], total: int) -> None:
    if failures:
        print(f"skipped {len(failures)} of {total} files that could not be used (listed above)", file=sys.stderr)


def _check_output_file(path: Path | None) -> None:
    """An output file the command can write, checked before any image is described."""
    if path is not None and path.is_dir():
        raise CamRetrievalError(f"{path} is a folder: give the path of a file to write")


def run_fit_pca(args: argparse.Namespace) -> int:
    from camretrieval.extraction.describer import Describer
    from camretrieval.extraction.fitting import fit_whitening
    from camretrieval.extraction.images import find_images

    _check_output_file(args.pca_file)
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
    from camretrieval.extraction.describer import Describer
    from camretrieval.extraction.fitting import learn_classes
    from camretrieval.extraction.images import find_images
    from camretrieval.extraction.settings import ExtractionSettings

    _check_output_file(args.output)
    paths = find_images(args.images_dir)
    if not paths:
        raise CamRetrievalError(f"no images under {args.images_dir}")
    settings = ExtractionSettings(args.backbone, args.feature_layer, size=args.size, weights=args.weights, scales=args.scales or (1.0,))
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


def _existing_index_meta(index_dir: Path) -> dict:
    """The catalog's meta data of the index in ``index_dir`` when it holds one with images described ({} for a new
    index)."""
    from camretrieval.storage.catalog import IndexStore

    if not IndexStore.exists(index_dir):
        return {}
    store = IndexStore.open(index_dir)
    try:
        meta = store.meta()
    finally:
        store.close()
    return meta if "settings" in meta else {}


def _index_settings(args: argparse.Namespace, whitening: PCAWhitening | None, recorded: dict) -> ExtractionSettings:
    """``index``'s settings: each option given, else as the existing index was built (``recorded``, its
    ``ExtractionSettings.to_dict()``), else as the --pca file was learned, else the defaults."""
    from camretrieval.extraction.settings import ExtractionSettings

    if not recorded:
        return _settings(args, whitening, n_classes=args.classes)
    learned = whitening.settings if whitening is not None else {}
    backbone = args.backbone or recorded["backbone"]
    class_list = _class_list(args.class_list, backbone, learned) if args.class_list is not None else None
    return ExtractionSettings.from_dict(
        {key: value for key, value in recorded.items() if key != "cam_layer"},  # the backbone's own, filled in again
        backbone=args.backbone, weights=args.weights, feature_layer=args.feature_layer, size=args.size,
        pooling=args.pooling, n_classes=args.classes, class_list=class_list, scales=args.scales,
    )


# The option that sets each recorded setting.
_SETTING_OPTIONS = {
    "backbone": "--backbone", "feature_layer": "--feature-layer", "size": "--size", "pooling": "--pooling",
    "n_classes": "--classes", "class_list": "--class-list", "weights": "--weights", "scales": "--scales",
}


def _check_same_settings(index_dir: Path, settings: ExtractionSettings, recorded: dict) -> None:
    """Refuse, before any model is loaded, options that differ from how the existing index was built."""
    if not recorded:
        return
    wanted = settings.to_dict()

    def shown(key: str, value: object) -> str:
        return "1 (single-scale)" if key == "scales" and value is None else repr(value)  # to_dict leaves out scale 1

    differences = [
        f"{option} {shown(key, wanted.get(key))} given, {key!r}: {shown(key, recorded.get(key))} in the index"
        for key, option in _SETTING_OPTIONS.items()
        if wanted.get(key) != recorded.get(key)
    ]
    if differences:
        raise CamRetrievalError(
            f"the index at {index_dir} was built with other settings: {'; '.join(differences)}. Leave those options "
            "out to add to it with its own settings, or index into a new folder"
        )


def run_index(args: argparse.Namespace) -> int:
    if args.pca is not None and (args.dim is not None or args.npca is not None):
        raise CamRetrievalError(
            "--dim and --npca size the whitening an index learns on its own collection; a --pca file brings its own "
            "(camretrieval fit-pca --dim D --npca N learns one)"
        )
    _check_watch_arguments(args)
    from camretrieval.method.whitening import PCAWhitening
    from camretrieval.storage.writer import update_index, whitening_for_index

    meta = _existing_index_meta(args.index_dir)
    _check_recall_argument(args, meta)
    recorded = meta.get("settings", {})
    whitening = PCAWhitening.load(args.pca) if args.pca is not None else None
    settings = _index_settings(args, whitening, recorded)
    _check_same_settings(args.index_dir, settings, recorded)
    if args.pca is None and args.whiten == "none" and not meta:
        print("whitening: none (--whiten none)", file=sys.stderr)
    elif args.pca is None and args.watch and not meta and args.whiten == "auto" and _no_images_yet(args.images_dir):
        print("whitening: none (the folder has no images yet; --pca FILE gives one)", file=sys.stderr)
    elif args.pca is None:
        whitening, note = whitening_for_index(
            args.index_dir, args.images_dir, settings, dim=args.dim or DEFAULT_WHITENING_DIM,
            n_pca=args.npca or DEFAULT_NPCA, batch_size=args.batch_size, workers=args.workers, device=args.device,
            precision=args.precision, progress=not args.quiet,
            min_images=0 if args.whiten == "collection" else MIN_COLLECTION_WHITENING,
        )
        if meta and (args.dim is not None or args.npca is not None):
            note += " (--dim and --npca apply to a new index only)"
        print(note, file=sys.stderr)
    if args.no_maps:
        keep_maps = False
    else:  # an existing index keeps what it stores; a new one stores maps for the class-weighted pooling
        keep_maps = (meta["maps"] is not None) if meta else None
    if args.watch:
        return _watch(args, whitening, settings, keep_maps)
    report = update_index(
        args.index_dir,
        args.images_dir,
        whitening,
        settings,
        keep_maps=keep_maps,
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
        ann_recall=args.recall,
        verify_maps=args.verify,
    )
    _report_failures(report.failures, report.attempted)
    if report.failed_before:
        print(f"{report.failed_before} files that failed before and have not changed were not tried again", file=sys.stderr)
    if report.missing:
        print(
            f"{len(report.missing)} indexed images are no longer in {args.images_dir} and are still searched: "
            f"camretrieval remove {args.index_dir} --missing drops them",
            file=sys.stderr,
        )
    if report.ann:
        print(f"approximate index: {report.ann['kind']}, recall@100 {report.ann['recall_at_100']:.3f} against exact search"
              + _ann_effort(report.ann))
    rate = f" ({report.seconds / report.described:.3f} s per image)" if report.described else ""
    print(
        f"indexed {report.described} images ({report.added} new files, {report.updated} changed, "
        f"{len(report.failures)} unusable; {report.unchanged} unchanged) in {report.seconds:.1f} s{rate}: "
        f"{report.total} images in {args.index_dir}"
    )
    return 0


def _ann_effort(ann: dict) -> str:
    """", target 0.95: nprobe 40, k_factor 2" for an index calibrated to a recall target, else ""."""
    if not ann.get("target"):
        return ""
    effort = ", ".join(f"{key} {value}" for key, value in (ann.get("effort") or {}).items())
    return f" (target {ann['target']}: {effort})" if effort else f" (target {ann['target']})"


def _check_recall_argument(args: argparse.Namespace, meta: dict) -> None:
    """--recall needs an approximate index, given now or kept by the index, and is not a --watch option."""
    if args.recall is None:
        return
    if args.watch:
        raise CamRetrievalError(
            "--recall is set once: run camretrieval index with --ann and --recall without --watch; --watch then keeps it"
        )
    if args.ann == "none" or (args.ann is None and not meta.get("ann_kind")):
        raise CamRetrievalError(
            "--recall sets the effort of an approximate index, and this index has none: add --ann ivf (or hnsw, ivfpq)"
        )


def _check_watch_arguments(args: argparse.Namespace) -> None:
    if args.poll is not None and not args.watch:
        raise CamRetrievalError("--poll sets how often --watch lists the folder: add --watch, or leave --poll out")
    if args.watch and args.engine == "ray":
        raise CamRetrievalError(
            "--watch describes each batch of changes in this process: leave out --engine ray (index a large folder "
            "once with --engine ray, then follow it with --watch)"
        )


def _no_images_yet(images_dir: Path) -> bool:
    from camretrieval.extraction.images import find_images

    return images_dir.is_dir() and not find_images(images_dir)


def _watch(args: argparse.Namespace, whitening: PCAWhitening | None, settings: ExtractionSettings, keep_maps: bool | None) -> int:
    """``index --watch``: follow the folder until Ctrl-C or SIGTERM, then say what was done (exit status 0)."""
    from camretrieval.storage.watch import watch_folder

    summary = watch_folder(
        args.index_dir, args.images_dir, whitening, settings, keep_maps=keep_maps, batch_size=args.batch_size,
        workers=args.workers, device=args.device, progress=not args.quiet, commit_every=args.commit_every,
        ann=args.ann, precision=args.precision, float16=args.float16, poll=args.poll,
    )
    if summary.interrupted_batch:
        print(
            "stopped in the middle of a batch: what it committed is kept, the rest is described at the next start",
            file=sys.stderr,
        )
    print(
        f"stopped watching: {summary.added} added, {summary.updated} updated, {summary.removed} removed, "
        f"{summary.unusable} unusable in {summary.batches} batches: {summary.total} images in {args.index_dir}"
    )
    return 0


def resolve_removal_paths(paths: list[str], root: Path | None, known: set[str], cwd: Path | None = None) -> list[str]:
    """The paths ``remove`` was given, as the index names them where they can be: a path the index lists (relative
    to the indexed folder) as it is; else a path that exists relative to the current folder (``cwd``) and lies under
    the indexed ``root``, relative to the root; else as given (absolute paths are resolved by the writer)."""
    cwd = Path.cwd() if cwd is None else cwd
    resolved = []
    for path in paths:
        candidate = cwd / path
        if path in known or Path(path).is_absolute() or root is None or not candidate.exists():
            resolved.append(path)
            continue
        try:
            resolved.append(candidate.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:  # not under the indexed folder: reported as not in the index
            resolved.append(path)
    return resolved


def run_remove(args: argparse.Namespace) -> int:
    if not args.paths and not args.missing:
        raise CamRetrievalError("name the images to remove, or --missing for those no longer on disk")
    from camretrieval.storage.catalog import IndexStore
    from camretrieval.storage.writer import remove_images

    store = IndexStore.open(args.index_dir)
    try:
        root = store.meta().get("image_root")
        known = set(store.known_files())
    finally:
        store.close()
    paths = resolve_removal_paths(args.paths, Path(root) if root else None, known)
    removed, unknown = remove_images(args.index_dir, paths, args.missing)
    for path in unknown:
        given = args.paths[paths.index(path)] if path in paths else path
        print(f"not in the index: {given}", file=sys.stderr)
    print(f"removed {removed} images from {args.index_dir}")
    return 0 if not unknown else 1


def _check_whitening_arguments(args: argparse.Namespace) -> None:
    if args.pca is not None and args.pca_images is not None:
        raise CamRetrievalError("give --pca FILE or --pca-images DIR, not both")
    if args.pca_images is None and (args.dim is not None or args.npca is not None):
        raise CamRetrievalError(
            "--dim and --npca size the whitening learned with --pca-images DIR"
            + ("; a --pca file brings its own" if args.pca is not None else "")
        )


def _refinement_name(options: "SearchOptions") -> str:
    """How a table row names the refinement evaluated (nothing for plain search)."""
    from camretrieval.search.refinement import SearchOptions

    if not options.refined:
        return ""
    if options == SearchOptions.refine():
        return ", --refine"
    parts = []
    if options.online:
        classes = f" N_c = {options.online_classes}" if options.online_classes else ""
        parts.append(f"OnA{classes}" + ("" if options.online_whitening else " unwhitened"))
    if options.rerank:
        parts.append(f"R{options.rerank}")
    if options.qe:
        gate = options.qe_gate_or_default
        parts.append(f"{'alpha-' if options.qe_alpha else ''}QE{options.qe}" + (f" gate {gate}" if gate else ""))
    return ", " + " + ".join(parts)


def _evaluate_refinement(
    args: argparse.Namespace, dataset: RetrievalDataset, describer: "Describer", whitening: PCAWhitening | None,
    options: "SearchOptions", variant: "Variant",
) -> "VariantResult":
    """Index the dataset's images (into --index DIR, grown or reused, or a temporary folder) and score ``options``
    through the index's own ranking."""
    from camretrieval.evaluation.runner import evaluate_refinement
    from camretrieval.search.index import Index

    settings = describer.settings
    index, failures = Index.build(
        dataset.root, whitening, backbone=settings.backbone, weights=settings.weights,
        feature_layer=settings.feature_layer, size=settings.size, n_classes=settings.n_classes,
        batch_size=args.batch_size, workers=args.workers, device=args.device, progress=not args.quiet,
        pooling=settings.pooling, keep_maps=True if options.needs_maps else None, index_dir=args.index,
        class_list=settings.class_list, scales=settings.scales,
    )
    for failure in failures:
        print(f"{dataset.name}: database image unusable, ranked last: {failure.path}: {failure.reason}", file=sys.stderr)
    require_refinement_maps(index, options, args)
    return evaluate_refinement(index, dataset, options, variant, progress=not args.quiet)


def run_eval(args: argparse.Namespace) -> int:
    _check_whitening_arguments(args)
    _check_benchmark_arguments(args)
    from camretrieval.evaluation.runner import (
        Variant,
        evaluate_variants,
        fit_variant_whitenings,
        markdown_table,
        result_record,
    )
    from camretrieval.extraction.describer import Describer
    from camretrieval.extraction.images import find_images
    from camretrieval.method.whitening import PCAWhitening

    options = refinement_options(args)
    if args.index is not None and not options.refined:
        raise CamRetrievalError("--index keeps the index that query-time refinement is evaluated on: give it with "
                                "--refine, --online, --rerank R or --qe K")
    dataset = _load_benchmark(args)
    whitening = PCAWhitening.load(args.pca) if args.pca is not None else None
    settings = _settings(args, whitening, n_classes=args.classes)
    pooling, n_classes = settings.pooling, settings.n_classes
    name = f", class list of {n_classes}" if settings.class_list else f", N_c = {n_classes}"
    variant = Variant(f"{pooling}" + (name if pooling == "cam" else "") + _refinement_name(options), pooling, n_classes,
                      whiten=whitening is not None or args.pca_images is not None)
    describer = Describer.from_settings(settings, None, args.device, args.precision)
    whitenings = {pooling: whitening} if whitening is not None else {}
    if args.pca_images is not None:
        whitenings = fit_variant_whitenings(
            describer, [variant], find_images(args.pca_images), args.pca_images,
            dim=args.dim or DEFAULT_WHITENING_DIM, n_pca=args.npca or DEFAULT_NPCA,
            batch_size=args.batch_size, workers=args.workers, progress=not args.quiet,
        )
    if options.refined:
        result = _evaluate_refinement(args, dataset, describer, whitenings.get(pooling), options, variant)
    else:
        [result] = evaluate_variants(
            describer, dataset, [variant], whitenings, args.batch_size, args.workers, not args.quiet,
            keep_similarity=args.report is not None,
        )
    record_settings = describer.settings.to_dict() | {
        "weights": describer.backbone.weights, "whitening": str(args.pca or args.pca_images or "none"),
        "dataset": dataset.name, "database_images": len(dataset.images), "queries": len(dataset.queries),
    }
    if options.refined:
        record_settings["refinement"] = dataclasses.asdict(options) | {"qe_gate": options.qe_gate_or_default}
    record = result_record(result, record_settings)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(f"{dataset.name}: {len(dataset.images)} database images, {len(dataset.queries)} queries")
        title = f"{settings.backbone}, size {settings.size}{scales_note(settings.scales)}, whitening {record_settings['whitening']}"
        print(markdown_table(title, [result]))
    if args.report is not None:
        from camretrieval.evaluation.report import write_eval_report

        page = write_eval_report(args.report, dataset, result, record, describer)
        print(f"report: {page}", file=sys.stderr)
    return 0


def run_tables(args: argparse.Namespace) -> int:
    _check_benchmark_arguments(args)
    from camretrieval.evaluation.runner import (
        Variant,
        VariantResult,
        evaluate_variants,
        fit_variant_whitenings,
        markdown_table,
        table_1a_variants,
        table_1b_variants,
        table_2_variants,
    )
    from camretrieval.extraction.backbones import Backbone, WeightsNotFoundError, load_backbone
    from camretrieval.extraction.describer import Describer
    from camretrieval.extraction.images import find_images

    dataset = _load_benchmark(args)
    progress = not args.quiet
    pca_paths = find_images(args.pca_images)
    sections = [
        f"Tables on {dataset.name} ({len(dataset.images)} images, {len(dataset.queries)} queries), PCA-whitening "
        f"({args.dim}-d, N_pca = {args.npca}) learned on {args.pca_images.name} ({len(pca_paths)} images), "
        f"size {args.size}{scales_note(args.scales)}.\n"
    ]

    def run(backbone: Backbone, variants: list[Variant]) -> list:
        describer = Describer(backbone, args.size, device=args.device, scales=args.scales)
        whitenings = fit_variant_whitenings(
            describer, variants, pca_paths, args.pca_images, args.dim, args.npca, batch_size=args.batch_size,
            workers=args.workers, progress=progress,
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


def short_class_name(name: str) -> str:
    """An ImageNet class's first name ("great white shark" of "great white shark, white shark, man-eater, ...")."""
    return name.split(",")[0].strip()


def _explain_settings(args: argparse.Namespace) -> tuple[ExtractionSettings, str]:
    """The settings ``explain`` describes the image with, and a note saying whose they are: the --index's (an option
    given that differs from it is refused), else the options'."""
    from camretrieval.constants import DEFAULT_SIZE
    from camretrieval.extraction.settings import ExtractionSettings

    if args.index is None:
        settings = ExtractionSettings(args.backbone or DEFAULT_BACKBONE, size=args.size or DEFAULT_SIZE, weights=args.weights)
        return settings, f"{settings.backbone}, {settings.size} px"
    from camretrieval.storage.catalog import IndexStore

    store = IndexStore.open(args.index)
    try:
        recorded = store.meta().get("settings")
    finally:
        store.close()
    if not recorded:
        raise CamRetrievalError(f"the index at {args.index} has no images yet: run camretrieval index first")
    settings = ExtractionSettings.from_dict(
        {key: recorded.get(key) for key in ("backbone", "feature_layer", "size", "weights", "pooling", "n_classes")}
    )
    given = {"--backbone": args.backbone, "--size": args.size, "--weights": args.weights}
    index_values = {"--backbone": settings.backbone, "--size": settings.size, "--weights": settings.weights}
    for option, value in given.items():
        if value is None:
            continue
        if option == "--weights":
            value = str(Path(value).resolve())
        if value != index_values[option]:
            raise CamRetrievalError(
                f"{option} {given[option]} is not the index's ({index_values[option]}): leave {option} out to explain "
                f"the image as the index at {args.index} sees it, or leave --index out"
            )
    return settings, f"as the index {args.index.name} sees it: {settings.backbone}, {settings.size} px"


def run_explain(args: argparse.Namespace) -> int:
    from camretrieval.explain import explain_figure, open_image_argument
    from camretrieval.extraction.describer import Describer

    _check_output_file(args.output)
    image = open_image_argument(args.image)
    settings, seen_as = _explain_settings(args)
    describer = Describer.from_settings(settings, device=args.device)
    figure, classes = explain_figure(describer, image, args.classes, args.box, title=f"{image.name} ({seen_as})")
    output = args.output or Path(f"{image.stem}.explain.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(output)
    names = [short_class_name(c.name) for c in classes]
    width = max(len(name) for name in names)
    for rank, (c, name) in enumerate(zip(classes, names), start=1):
        print(f"{rank:>2}. {name:<{width}}  {100 * c.probability:5.1f}%  (class {c.index})")
    print(f"wrote {output}")
    return 0


COMMANDS = {
    "fit-pca": run_fit_pca,
    "learn-classes": run_learn_classes,
    "index": run_index,
    "info": run_info,
    "remove": run_remove,
    "search": run_search,
    "eval": run_eval,
    "tables": run_tables,
    "demo": run_demo,
    "serve": run_serve,
    "explain": run_explain,
}
