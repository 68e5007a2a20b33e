"""Shards: what one commit adds to an index folder, written once and never modified (:mod:`camretrieval.storage.catalog`
says how the catalog names them).

A shard folder ``shards/<name>/`` holds ``descriptors.npy`` (n x dim, float32) and, unless the index keeps no maps,
the maps files of :mod:`camretrieval.storage.maps`. It is written under ``shards/<name>.partial/`` by a
:class:`ShardWriter` and renamed when complete (:func:`publish_shard`); a commit of the catalog then makes it part of
the index. :func:`describe_in_shards` describes images into shards (the single-process writer and each Ray worker
alike); :func:`load_snapshot` reads the descriptors (and maps) of a snapshot of the catalog back.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.describer import Describer, FileFailure
from camretrieval.method.whitening import PCAWhitening
from camretrieval.storage.catalog import (
    RETRY_MARK,
    SHARDS,
    FileState,
    IndexFileError,
    IndexStore,
    Snapshot,
    rebuild_hint,
    repair_hint,
)
from camretrieval.storage.files import fsync_directory
from camretrieval.storage.maps import MapStore, MapStoreWriter, encode_maps

DESCRIPTORS = "descriptors.npy"
_MAX_QUEUED_WRITES = 32  # images whose maps may wait for the background writer


def new_shard_folder(directory: Path) -> tuple[str, Path]:
    """A fresh shard name for the index folder ``directory`` and its ``.partial`` folder, created empty. Names are
    unique across processes and machines writing into one folder (time, host, process)."""
    name = f"{time.time_ns():x}-{socket.gethostname()}-{os.getpid()}"
    partial = Path(directory) / SHARDS / f"{name}.partial"
    partial.mkdir()
    return name, partial


def publish_shard(directory: Path, name: str, partial: Path) -> None:
    """Make a completely written ``.partial`` folder a shard: fsync its files, rename it, fsync the parent. A shard
    no commit names is deleted by the next writer, so publishing alone changes nothing a reader sees."""
    for file in partial.iterdir():
        with open(file, "rb+") as opened:
            os.fsync(opened.fileno())
    fsync_directory(partial)
    os.replace(partial, Path(directory) / SHARDS / name)
    fsync_directory(Path(directory) / SHARDS)


class ShardWriter:
    """What one commit adds, collected in a ``.partial`` shard folder of the index folder ``directory``: descriptors,
    and the maps unless the index keeps none (streamed to disk as they come). :meth:`publish` completes the shard;
    a commit of the catalog then makes it part of the index.

    The maps are converted and written on a background thread, in the order they were added, while the caller runs
    the next forward pass (extraction then costs little more than the forward pass: benchmarks/extraction_cost.py)."""

    def __init__(self, directory: Path, capacity: int, keep_maps: bool, separate_cam_layer: bool) -> None:
        self.directory = directory
        self.name, self.folder = new_shard_folder(directory)
        self.maps = MapStoreWriter(capacity, separate_cam_layer, self.folder) if keep_maps else None
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="camretrieval-maps") if keep_maps else None
        self._writes: list[Future] = []
        self.entries: list[tuple[str, FileState]] = []
        self.descriptors: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, path: str, state: FileState, descriptor: np.ndarray, features=None, cam_activations=None) -> None:
        if self.maps is not None:
            self._writes.append(self._writer.submit(self.maps.add, len(self.entries), features, cam_activations))
            if len(self._writes) > _MAX_QUEUED_WRITES:  # bounded memory: the maps wait as tensors until written
                self._writes.pop(0).result()
        self.entries.append((path, state))
        self.descriptors.append(descriptor)

    def _wait_for_writes(self) -> None:
        writes, self._writes = self._writes, []
        for write in writes:
            write.result()  # raises what the write raised

    def publish(self) -> list[tuple[str, FileState, int]]:
        """Write the descriptors, complete the maps, and make the folder a shard. Returns (path, state, row)."""
        np.save(self.folder / DESCRIPTORS, np.stack(self.descriptors).astype(np.float32))
        if self.maps is not None:
            self._wait_for_writes()
            self._writer.shutdown()
            self.maps.finish(range(len(self.entries)))
        publish_shard(self.directory, self.name, self.folder)
        return [(path, state, row) for row, (path, state) in enumerate(self.entries)]

    def abort(self) -> None:
        if self.maps is not None:
            self._writer.shutdown(cancel_futures=True)
            self.maps.abort()
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class ShardResult:
    """One published shard (or, ``name`` None, only files that failed), ready for a commit of the catalog."""

    name: str | None
    done: list[tuple[str, FileState, int]]  # path, state, row in the shard
    failed: list[tuple[str, FileState, str]]  # path, state, reason
    dim: int | None  # the descriptors' dimension


def failure_record(failure: FileFailure) -> str:
    """The error the catalog records for a file that failed: marked (:data:`RETRY_MARK`) when the reason may pass,
    so that the next run tries the file again even if it has not changed."""
    return RETRY_MARK + failure.reason if failure.retry else failure.reason


def describe_in_shards(
    describer: Describer,
    image_root: Path,
    pending: Sequence[tuple[str, FileState]],
    index_dir: Path,
    keep_maps: bool,
    batch_size: int | None,
    workers: int,
    progress: bool,
    commit_every: int,
    failures: list[FileFailure],
) -> Iterator[ShardResult]:
    """Describe ``pending`` (path relative to ``image_root``, state) in one stream of DataLoader batches, and yield a
    published shard each time ``commit_every`` files were described or failed (unreadable files are appended to
    ``failures`` as well). Used by the single-process path and by each Ray worker alike."""
    states = dict(pending)
    paths = list(states)
    separate = describer.backbone.feature_layer != describer.backbone.cam_layer
    shard: ShardWriter | None = None
    reported = len(failures)  # failures before this point were not in ``pending``

    def handled() -> int:
        return (len(shard) if shard is not None else 0) + len(failures) - reported

    def complete() -> ShardResult:
        nonlocal shard, reported
        failed = [(f.path, states[f.path], failure_record(f)) for f in failures[reported:] if f.path in states]
        if shard is None:
            result = ShardResult(None, [], failed, None)
        else:
            result = ShardResult(shard.name, shard.publish(), failed, int(len(shard.descriptors[0])))
        shard, reported = None, len(failures)
        return result

    # On a CPU the maps are encoded where they were computed (in the describer's processes, one per core, when it
    # runs so: 38 kB per image to pass on instead of 1.4 MB); a GPU's maps go to the shard writer's thread, which
    # encodes them while the GPU runs the next batch.
    encode_here = keep_maps and describer.device.type == "cpu"

    def compute(maps):
        descriptors = describer.descriptors_of_maps(maps)
        if not keep_maps:
            return descriptors, None, None
        features = maps.features
        activations = maps.cam_activations if separate else None
        if encode_here:
            features = [encode_maps(image) for image in features]
            activations = [encode_maps(image) for image in activations] if separate else None
        return descriptors, features, activations

    try:
        for indices, (descriptors, features, activations) in describer.iterate_files(
            paths, image_root, compute, batch_size, workers, progress, failures
        ):
            rows = descriptors.float().cpu().numpy()
            for row, image in enumerate(indices):
                if shard is None:
                    shard = ShardWriter(index_dir, commit_every, keep_maps, separate)
                shard.add(
                    paths[image], states[paths[image]], rows[row],
                    features[row] if features is not None else None,
                    activations[row] if activations is not None else None,
                )
                if handled() >= commit_every:
                    yield complete()
            if handled() >= commit_every:  # a run of unreadable files
                yield complete()
        if handled():
            yield complete()
    except BaseException:
        if shard is not None:
            shard.abort()
        raise


def load_snapshot(
    store: IndexStore, snapshot: Snapshot, with_maps: bool
) -> tuple[np.ndarray, PCAWhitening | None, MapStore | None]:
    """A snapshot's descriptors (in snapshot order), its whitening, and (``with_maps``, when stored) its maps."""
    meta = snapshot.meta
    if "settings" not in meta:
        raise IndexFileError(f"the index at {store.directory} holds no images yet: {rebuild_hint(store.directory)}")
    with_maps = with_maps and bool(meta.get("maps"))
    shard_of, rows = np.asarray(snapshot.shard_of, dtype=np.int64), np.asarray(snapshot.rows, dtype=np.int64)
    descriptors = np.zeros((len(rows), meta.get("dim", 0)), dtype=np.float32)
    shard_maps = []
    try:
        whitening = PCAWhitening.load(store.directory / meta["whitening"]) if meta.get("whitening") else None
        for number, name in enumerate(snapshot.shards):
            mine = shard_of == number
            stored = np.load(store.shard_path(name) / DESCRIPTORS, mmap_mode="r", allow_pickle=False)
            descriptors[mine] = stored[rows[mine]]
            if with_maps:
                shard_maps.append(MapStore.open(store.shard_path(name), meta["maps"]["separate_cam_layer"]))
    except FileNotFoundError:
        raise  # Index.open looks again: a writer may have deleted a shard after this snapshot
    except (OSError, ValueError, IndexError, CamRetrievalError) as error:
        raise IndexFileError(
            f"the index at {store.directory} is incomplete or damaged ({error}): {repair_hint(store.directory)}"
        ) from error
    return descriptors, whitening, MapStore.gather(shard_maps, shard_of, rows) if with_maps else None
