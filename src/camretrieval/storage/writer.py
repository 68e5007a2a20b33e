"""Growing and shrinking an index folder (:mod:`camretrieval.storage.catalog`) as a collection changes.

:func:`update_index` (``camretrieval index``) describes only the images that are new or changed since the last run
(by size and modification time) and commits them in shards of ``commit_every`` images: interrupted at any moment, it
loses at most the shard in progress, and the next run goes on from there. :func:`remove_images`
(``camretrieval remove``) forgets images. :func:`write_index` replaces an index's content in one commit
(``Index.save``). All write through the same shards (:mod:`camretrieval.storage.shards`) and hold the index's writer
lock; searching meanwhile is fine.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from camretrieval.constants import DEFAULT_ANN_RECALL, DEFAULT_COMMIT_EVERY, MIN_COLLECTION_WHITENING
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.describer import Describer, FileFailure
from camretrieval.extraction.fitting import fit_whitening
from camretrieval.extraction.images import IMAGE_EXTENSIONS, find_images
from camretrieval.extraction.settings import ExtractionSettings
from camretrieval.method.whitening import DEFAULT_SHRINKAGE, PCAWhitening
from camretrieval.storage.ann import ANN_KINDS, build_search_index, calibrate, check_recall_target, measure_recall
from camretrieval.storage.catalog import FileState, IndexFileError, IndexStore
from camretrieval.storage.check import check_index, repair, upgrade_maps
from camretrieval.storage.maps import MapStore
from camretrieval.storage.ray import DEFAULT_RAY_WORKERS, describe_with_ray
from camretrieval.storage.shards import ShardResult, ShardWriter, describe_in_shards, load_snapshot

# An index made without a PCA file learns its whitening on an even sample of at most this many of its own images.
DEFAULT_WHITENING_SAMPLE = 2000


@dataclass
class UpdateReport:
    """What one :func:`update_index` run did."""

    added: int = 0  # files seen for the first time
    updated: int = 0  # files seen before and changed since
    described: int = 0  # of the added and updated files, those described and committed
    unchanged: int = 0  # already indexed and not changed: not described again
    failures: list[FileFailure] = field(default_factory=list)  # files that could not be read this run
    failed_before: int = 0  # unchanged files that could not be decoded in an earlier run (not tried again)
    retried: int = 0  # unchanged files that could not be read in an earlier run, tried again
    attempted: int = 0  # files this run tried to describe (added, updated, retried, and those unreadable at once)
    missing: list[str] = field(default_factory=list)  # indexed images no longer in the folder (kept until removed)
    removed: int = 0  # with remove_missing: indexed files no longer in the folder, removed
    repaired: list[str] = field(default_factory=list)  # damaged files found (their images were described again)
    commits: int = 0
    total: int = 0  # images in the index after this run
    ann: dict | None = None  # the approximate index, when the index has one: kind, recall@100 against exact search, effort
    seconds: float = 0.0


def check_compatible(store: IndexStore, wanted: dict, whitening: PCAWhitening | None) -> None:
    """Refuse to add to an index made with other settings, another folder, or another whitening: its descriptors
    and the new ones would not be comparable."""
    meta = store.meta()
    if "settings" not in meta:
        return
    differences = [
        f"{key}: {meta[key]!r} in the index, {wanted[key]!r} now"
        for key in ("settings", "image_root", "maps")
        if meta.get(key) != wanted.get(key)
    ]
    if (meta.get("whitening") is None) != (whitening is None):
        differences.append("whitening: " + ("none in the index, given now" if whitening else "in the index, none given now"))
    elif whitening is not None and not whitening.same_as(PCAWhitening.load(store.directory / meta["whitening"])):
        differences.append("whitening: another PCA file than the one the index was built with")
    if differences:
        raise IndexFileError(
            f"the index at {store.directory} was built differently, so new descriptors would not match its own ("
            + "; ".join(differences)
            + "): index with the same options and PCA file, or into a new folder"
        )


def update_index(
    index_dir: str | Path,
    image_root: str | Path,
    whitening: PCAWhitening | None,
    settings: ExtractionSettings | None = None,
    keep_maps: bool | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    device: str = "cpu",
    progress: bool = True,
    commit_every: int = DEFAULT_COMMIT_EVERY,
    ann: str | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int = DEFAULT_RAY_WORKERS,
    precision: str = "float32",
    float16: bool | None = None,
    only: Collection[str] | None = None,
    remove_missing: bool = False,
    describer: Describer | None = None,
    ann_recall: float | None = None,
    verify_maps: bool = False,
) -> UpdateReport:
    """Bring the index in ``index_dir`` (created if needed) up to date with the images under ``image_root``: describe
    the new and changed ones, in commits of ``commit_every`` images. Returns what it did; images that are indexed but
    no longer in the folder are listed, not removed (:func:`remove_images` does that).

    ``settings`` (:class:`~camretrieval.extraction.settings.ExtractionSettings`; default: those the ``whitening``
    was learned with) say how images are described; ``keep_maps`` (default: for the class-weighted pooling) also
    stores their maps for query-time refinement. ``ann`` ("hnsw", "ivf" or "ivfpq", :mod:`camretrieval.storage.ann`)
    gives the index an approximate FAISS index, rebuilt after every run that changed the collection; "none" drops it;
    None keeps what the index had. ``ann_recall``: the recall@100 its search effort is calibrated to (on held-out
    descriptors of the collection; default for "ivf": 0.95, the others keep their fixed effort); None keeps the
    index's.

    ``engine`` "ray" describes on Ray (:mod:`camretrieval.storage.ray`): the cluster at ``ray_address``, or a local
    Ray instance of ``ray_workers`` workers; the descriptors are those of the local path. ``float16``: search
    with the descriptors in float16 (exact, or HNSW; half the memory, no measurable mAP cost); None keeps what the
    index had.

    ``only``: look at these files (relative to ``image_root``) instead of listing the whole folder; those not there
    count as gone. ``remove_missing``: remove the indexed files that are gone (an index that follows its folder,
    :mod:`camretrieval.storage.watch`; an empty folder is then an empty index, not an error). ``describer``: one
    already loaded for these settings and whitening, reused. Damaged shards found first are described again
    (:func:`camretrieval.storage.check.check_index`; ``verify_maps``: decoding every stored block of maps)."""
    started = time.perf_counter()
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise CamRetrievalError(f"{image_root} is not a folder of images")
    if ann is not None and ann != "none" and ann not in ANN_KINDS:
        raise CamRetrievalError(f"unknown approximate index {ann!r}: choose one of {', '.join(ANN_KINDS)} or none")
    if ann_recall is not None:
        ann_recall = check_recall_target(ann_recall)
    if engine not in ("local", "ray"):
        raise CamRetrievalError(f"unknown engine {engine!r}: choose local or ray")
    if commit_every < 1:
        raise CamRetrievalError(f"commit_every must be at least 1, got {commit_every}")
    if settings is not None and not isinstance(settings, ExtractionSettings):
        raise TypeError(
            f"update_index takes its extraction settings as one ExtractionSettings, got {settings!r}: e.g. "
            "update_index(index_dir, image_root, whitening, ExtractionSettings(backbone=..., size=...))"
        )
    settings = settings if settings is not None else ExtractionSettings.from_pca(whitening)
    if describer is None:
        describer = Describer.from_settings(settings, whitening, device, precision)
    elif describer.settings.to_dict() != settings.to_dict() or describer.whitening is not whitening:
        raise ValueError("update_index: the describer given was made with other settings or another whitening")
    keep_maps = settings.pooling == "cam" if keep_maps is None else keep_maps
    separate = describer.backbone.feature_layer != describer.backbone.cam_layer
    wanted = index_meta(describer.settings.to_dict(), image_root, separate if keep_maps else None)
    report = UpdateReport()
    with IndexStore.writing(index_dir) as store:
        check_compatible(store, wanted, whitening)
        damages = check_index(store, verify_maps)
        if damages:  # described again below from the images on disk: they count as new files
            report.repaired = [str(damage) for damage in damages]
            repair(store, damages)
        upgrade_maps(store, progress)  # maps written before issue 14 (float16) re-encoded, losslessly, once
        pending, gone = _compare_folder(store, image_root, report, only, allow_empty=remove_missing)
        report.attempted = len(pending) + len(report.failures)
        for failure in report.failures:  # files listed but gone or unreadable before their turn (dangling links, ...)
            if progress:
                print(f"skipped {failure.path}: {failure.reason}", file=sys.stderr)
        whitening_file = store.save_whitening(whitening)
        meta = wanted | {"whitening": whitening_file}
        if pending:
            if progress:
                print(f"{len(pending)} images to describe ({report.unchanged} already indexed)", file=sys.stderr)
            if engine == "ray":
                spec = {
                    "settings": settings.to_dict(), "device": device, "precision": precision,
                    "keep_maps": keep_maps, "batch_size": batch_size, "threads": 1,
                    "image_root": str(image_root.resolve()), "index_dir": str(store.directory.resolve()),
                    "whitening": str((store.directory / whitening_file).resolve()) if whitening_file else None,
                }
                shards = describe_with_ray(spec, pending, commit_every, ray_address, ray_workers)
            else:
                shards = describe_in_shards(
                    describer, image_root, pending, store.directory, keep_maps, batch_size, workers, progress,
                    commit_every, report.failures,
                )
            _commit_all(store, shards, meta, report, len(pending), ray=engine == "ray", progress=progress)
        elif "settings" not in store.meta():
            store.commit(None, [], meta=meta)
        if remove_missing and gone:  # after the commits: a renamed file is never missing from the index meanwhile
            report.removed = store.remove(gone)
            report.missing = []
        _set_search_index(store, float16, ann, progress, report, ann_recall)
        store.delete_unused_files()
        report.total = store.count_done()
    report.seconds = time.perf_counter() - started
    return report


def whitening_for_index(
    index_dir: str | Path,
    image_root: str | Path,
    settings: ExtractionSettings,
    dim: int = 512,
    n_pca: int = 1,
    sample: int = DEFAULT_WHITENING_SAMPLE,
    batch_size: int | None = None,
    workers: int = 2,
    device: str = "cpu",
    precision: str = "float32",
    progress: bool = True,
    min_images: int = MIN_COLLECTION_WHITENING,
) -> tuple[PCAWhitening | None, str]:
    """The whitening of an index made without a PCA file, and a one-line note saying where it comes from.

    An existing index keeps the whitening it started with (None for an index of raw descriptors), so that its
    descriptors stay comparable as it grows. A new one of at least ``min_images`` images learns its
    whitening on the collection itself (a smaller one is not whitened: None): an even sample of at most ``sample`` of
    the images under ``image_root``, described with ``settings``, regularised by
    :data:`~camretrieval.method.whitening.DEFAULT_SHRINKAGE` (on the searched collection itself, plain whitening
    can cost much, shrunk never below no whitening at any sample size measured: docs/method.md).
    """
    if IndexStore.exists(index_dir):
        store = IndexStore.open(index_dir)
        try:
            meta = store.meta()
            if "settings" in meta:
                if not meta.get("whitening"):
                    return None, f"the index at {index_dir} has unwhitened descriptors: adding to it without whitening"
                whitening = PCAWhitening.load(store.directory / meta["whitening"])
                return whitening, f"using the whitening the index at {index_dir} was built with"
        finally:
            store.close()
    image_root = Path(image_root)
    if not image_root.is_dir():
        raise CamRetrievalError(f"{image_root} is not a folder of images")
    paths = find_images(image_root)
    if not paths:
        raise CamRetrievalError(f"no images (jpg, jpeg, png, webp, bmp, tif, tiff) under {image_root}")
    if len(paths) < min_images:
        return None, (
            f"whitening: none ({len(paths)} images are too few to learn one on the collection itself that helps: "
            f"from {min_images}; --pca FILE gives one learned on another collection, --whiten collection forces it)"
        )
    chosen = [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(sample, len(paths))).round().astype(int))]
    describer = Describer.from_settings(settings, None, device, precision)
    if progress:
        print(f"learning the whitening on {len(chosen)} of the {len(paths)} images (no PCA file given)", file=sys.stderr)
    whitening, failures = fit_whitening(
        describer, chosen, image_root, dim, n_pca, batch_size, workers, progress, shrinkage=DEFAULT_SHRINKAGE
    )
    whitening.settings["learned_on"] = "collection"
    note = (
        f"whitening: {whitening.input_dim} -> {whitening.dim_} PCA-whitening (shrinkage {DEFAULT_SHRINKAGE:g}) learned on "
        f"{len(chosen) - len(failures)} images of the collection itself, kept as the index grows (--pca FILE: one "
        "learned on another collection, the paper's protocol)"
    )
    return whitening, note


def index_meta(settings: dict, image_root: str | Path | None, separate_cam_layer: bool | None) -> dict:
    """What the catalog's meta table records about how an index was made (the whitening file and the descriptors'
    dimension are added as they are written): its settings (``ExtractionSettings.to_dict()``), its folder, and
    whether and how it keeps maps."""
    return {
        "settings": dict(settings),
        "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
        "maps": {"separate_cam_layer": separate_cam_layer} if separate_cam_layer is not None else None,
    }


def write_index(
    index_dir: str | Path,
    paths: Sequence[str],
    descriptors: np.ndarray,
    whitening: PCAWhitening | None,
    settings: dict,
    image_root: Path | None,
    maps: MapStore | None,
) -> None:
    """Replace the content of the index in ``index_dir`` (created if needed) with these images, in one commit through
    one shard: a crash leaves either the old index or this one. The search options of a replaced index (approximate
    index, float16) are reset with it."""
    with IndexStore.writing(index_dir) as store:
        meta = index_meta(settings, image_root, maps.separate_cam_layer if maps is not None else None)
        meta |= {"whitening": store.save_whitening(whitening), "dim": int(descriptors.shape[1])}
        meta |= {"ann_kind": None, "ann": None, "ann_recall": None, "float16": False}  # a replaced index's search options go too
        shard = ShardWriter(store.directory, len(paths), maps is not None, bool(maps and maps.separate_cam_layer))
        try:
            for row, path in enumerate(paths):
                stored = maps.image_tensors(row) if maps is not None else (None, None)
                shard.add(path, _file_state(image_root, path), descriptors[row], *stored)
            done = shard.publish() if len(shard) else []
        except BaseException:
            shard.abort()
            raise
        store.commit(shard.name if done else None, done, meta=meta, replace=True)
        store.delete_unused_files()


def _file_state(root: Path | None, path: str) -> FileState:
    """The file's state as :func:`update_index` compares it; (-1, -1), never equal to a real file's, when the file is
    not there (it will be described again if it appears)."""
    try:
        return FileState.of(root / path) if root is not None else FileState(-1, -1)
    except OSError:
        return FileState(-1, -1)


def _compare_folder(
    store: IndexStore, image_root: Path, report: UpdateReport, only: Collection[str] | None, allow_empty: bool
) -> tuple[list[tuple[str, FileState]], list[str]]:
    """The files under ``image_root`` (or, given ``only``, those of its files) that are new or changed since the
    catalog saw them, and the files the catalog knows that are gone from there; counts the rest."""
    known = store.known_files()
    paths = find_images(image_root) if only is None else sorted(path for path in set(only) if _is_image(image_root, path))
    if not paths and not known and only is None and not allow_empty:
        raise CamRetrievalError(f"no images (jpg, jpeg, png, webp, bmp, tif, tiff) under {image_root}")
    pending: list[tuple[str, FileState]] = []
    for path in paths:
        try:
            state = FileState.of(image_root / path)
        except OSError as error:  # vanished since the folder was listed
            report.failures.append(FileFailure(path, f"unreadable: {error}", retry=True))
            continue
        before = known.get(path)
        if before is None or before[0] != state:
            pending.append((path, state))
            report.added += before is None
            report.updated += before is not None
        elif before[1] == "done":
            report.unchanged += 1
        elif before[1] == "retry":  # it could not be read last time (moved away, no permission): try again
            pending.append((path, state))
            report.retried += 1
        else:
            report.failed_before += 1
    present = set(paths)
    looked_at = known if only is None else [path for path in set(only) if path in known]
    gone = sorted(path for path in looked_at if path not in present)
    report.missing = [path for path in gone if known[path][1] == "done"]
    return pending, gone


def _is_image(image_root: Path, path: str) -> bool:
    """Whether ``find_images(image_root)`` would list ``path`` (relative, POSIX): an image file name, no hidden part,
    there (a dangling link counts, as in a listing) and not a folder."""
    parts = path.split("/")
    return (
        not any(part.startswith(".") or part == "" for part in parts)
        and os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS
        and os.path.lexists(image_root / path)
        and not (image_root / path).is_dir()
    )


def _commit_all(
    store: IndexStore, shards: Iterator[ShardResult], meta: dict, report: UpdateReport, total: int, ray: bool, progress: bool
) -> None:
    """Commit each shard as it comes. Interrupted or unable to write, say what is safe and how to go on."""
    bar = tqdm(total=total, unit="img", disable=not (progress and ray), file=sys.stderr)  # the local path has its own
    try:
        for result in shards:
            commit_shard(store, result, meta)
            report.commits += 1
            report.described += len(result.done)
            if ray:  # failures come with the results (the local path reported them as they happened)
                for path, _, reason in result.failed:
                    report.failures.append(FileFailure(path, reason))
                    bar.write(f"skipped {path}: {reason}", file=sys.stderr)
            bar.update(len(result.done) + len(result.failed))
    except KeyboardInterrupt:
        print(f"the {store.count_done()} images committed so far are safe: run the same command again to go on", file=sys.stderr)
        raise
    except OSError as error:  # a full disk, a read-only or vanished index folder
        raise IndexFileError(
            f"could not write to {store.directory} ({error.strerror or error}): the {store.count_done()} images committed "
            "so far are safe; fix that and run the same command again to go on"
        ) from error
    finally:
        bar.close()


def _set_search_index(
    store: IndexStore, float16: bool | None, ann: str | None, progress: bool, report: UpdateReport,
    ann_recall: float | None = None,
) -> None:
    """Apply ``--float16`` / ``--ann`` / ``--recall`` (None: keep the index's) and bring the approximate index up to
    date."""
    if float16 is not None and bool(store.meta().get("float16")) != float16:
        store.set_meta({"float16": float16})
        store.commit(None, [])  # a new generation: an approximate index in the other precision is rebuilt
    if ann is None and ann_recall is None:
        report.ann = refresh_ann(store, progress)
        return
    previous = {key: store.meta().get(key) for key in ("ann_kind", "ann_recall")}
    wanted = ({} if ann is None else {"ann_kind": None if ann == "none" else ann})
    store.set_meta(wanted | ({} if ann_recall is None else {"ann_recall": ann_recall}))
    try:
        report.ann = refresh_ann(store, progress)
    except CamRetrievalError:  # e.g. too few images to train IVF-PQ, or a recall it cannot reach: keep what it had
        store.set_meta(previous)
        refresh_ann(store, progress)
        raise


def commit_shard(store: IndexStore, result: ShardResult, meta: dict) -> None:
    """Make a published shard part of the index (one transaction)."""
    store.commit(result.name, result.done, result.failed, meta=meta | ({"dim": result.dim} if result.dim else {}))


def refresh_ann(store: IndexStore, progress: bool) -> dict | None:
    """Rebuild the approximate index when the index wants one (``meta['ann_kind']``) and the collection changed since
    it was built, calibrate its search effort to the recall target (``meta['ann_recall']``, default for "ivf":
    ``DEFAULT_ANN_RECALL``) or else measure its recall@100 against exact search on held-out descriptors
    (:func:`camretrieval.storage.ann.calibrate`, :func:`~camretrieval.storage.ann.measure_recall`). A new target
    alone recalibrates the saved index without rebuilding it. Returns its meta data, None when the index has none."""
    meta = store.meta()
    kind = meta.get("ann_kind")
    if not kind:
        if meta.get("ann"):
            store.set_meta({"ann": None})  # its file goes with the next delete_unused_files()
        return None
    target = meta.get("ann_recall") or (DEFAULT_ANN_RECALL if kind == "ivf" else None)
    current = meta.get("ann")
    up_to_date = bool(current) and current.get("kind") == kind and current.get("generation") == meta["generation"]
    if up_to_date and current.get("target") == target:
        return current
    started = time.perf_counter()
    snapshot = store.snapshot()
    descriptors, _, _ = load_snapshot(store, snapshot, with_maps=False)
    index = store.load_ann(snapshot) if up_to_date else None
    if index is None:
        if progress:
            print(f"building the {kind} index of {len(descriptors)} descriptors", file=sys.stderr)
        index = build_search_index(descriptors, kind, float16=bool(meta.get("float16")) and kind == "hnsw")
    if target is not None:
        if progress:
            print(f"calibrating its search effort to recall@100 {target}", file=sys.stderr)
        calibration = calibrate(index, descriptors, target)
        recall, effort = calibration.recall, calibration.effort
    else:
        recall, effort = (measure_recall(index, descriptors, k=100) if len(descriptors) else 1.0), {}
    settings = {
        "kind": kind,
        "recall_at_100": round(recall, 4),
        "target": target,
        "effort": effort,
        "seconds": round(time.perf_counter() - started, 3),
    }
    store.save_ann(index, settings)
    return store.meta()["ann"]


def remove_images(index_dir: str | Path, paths: Sequence[str] = (), missing: bool = False) -> tuple[int, list[str]]:
    """Forget images of an index: ``paths`` (relative to the indexed folder, or absolute under it) and, with
    ``missing``, every indexed image no longer on disk. Returns (how many were removed, paths the index did not
    hold)."""
    IndexStore.open(index_dir).close()  # an index that is not there is an error, never created empty
    with IndexStore.writing(index_dir) as store:
        meta = store.meta()
        root = Path(meta["image_root"]) if meta.get("image_root") else None
        known = store.known_files()
        wanted = []
        for path in paths:
            relative = str(path)
            if root is not None and Path(path).is_absolute():
                try:
                    relative = Path(path).resolve().relative_to(root).as_posix()
                except ValueError:
                    relative = str(path)
            wanted.append(relative)
        if missing:
            if root is None:
                raise CamRetrievalError(f"the index at {index_dir} does not record its image folder")
            wanted += [path for path in known if not (root / path).is_file()]
        unknown = [path for path in wanted if path not in known]
        removed = store.remove([path for path in dict.fromkeys(wanted) if path in known])
        refresh_ann(store, progress=False)
        store.delete_unused_files()
    return removed, unknown
