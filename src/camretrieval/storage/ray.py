"""Extraction beyond one machine: describing a collection's images on a Ray cluster (``camretrieval index --engine
ray``), with Ray Data.

The writer (the ``index`` process, which holds the index's lock and alone writes the catalog) lists and compares the
folder as always, cuts what is to be described into chunks of ``commit_every`` images, and hands them to a pool of
Ray actors (``map_batches`` with an actor class: each worker loads the model once). Each actor describes its chunk
with exactly the code of the single-process path (:func:`camretrieval.storage.shards.describe_in_shards`) and writes one
shard straight into the index folder; the writer commits each shard as its result arrives. A worker that dies loses
only its chunk's shard, which the writer never committed and the next run deletes and redoes.

The workers must see the images and the index folder at the same paths as the writer (one machine, or a shared file
system such as NFS on a cluster). Ray is an optional dependency: ``pip install 'camretrieval[ray]'``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from camretrieval.constants import DEFAULT_RAY_WORKERS
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.describer import Describer
from camretrieval.extraction.settings import ExtractionSettings
from camretrieval.method.whitening import PCAWhitening
from camretrieval.storage.catalog import FileState
from camretrieval.storage.shards import ShardResult, describe_in_shards


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part used
    except ImportError as error:
        raise CamRetrievalError(
            "--engine ray needs Ray with Ray Data: pip install 'camretrieval[ray]' (or 'ray[data]')"
        ) from error
    return ray


class ShardWorker:
    """A Ray actor: loads the backbone once, then describes chunks of images into shards of the index folder."""

    def __init__(self, spec: dict) -> None:
        torch.set_num_threads(max(1, int(spec["threads"])))
        whitening = PCAWhitening.load(spec["whitening"]) if spec["whitening"] else None
        settings = ExtractionSettings.from_dict(spec["settings"])
        self.describer = Describer.from_settings(settings, whitening, spec["device"], spec["precision"])
        self.spec = spec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = []
        for chunk in batch["chunk"]:
            pending = [(path, FileState(size, mtime_ns)) for path, size, mtime_ns in json.loads(chunk)]
            failures: list = []
            for result in describe_in_shards(
                self.describer, Path(self.spec["image_root"]), pending, Path(self.spec["index_dir"]),
                self.spec["keep_maps"], self.spec["batch_size"], 0, False, len(pending), failures,
            ):
                results.append(json.dumps({
                    "name": result.name,
                    "done": [(path, state.size, state.mtime_ns, row) for path, state, row in result.done],
                    "failed": [(path, state.size, state.mtime_ns, reason) for path, state, reason in result.failed],
                    "dim": result.dim,
                    "worker": os.getpid(),
                }))
        return {"result": np.array(results, dtype=object)}


def describe_with_ray(
    spec: dict,
    pending: Sequence[tuple[str, FileState]],
    commit_every: int,
    address: str | None = None,
    workers: int = DEFAULT_RAY_WORKERS,
) -> Iterator[ShardResult]:
    """Describe ``pending`` on Ray in chunks of ``commit_every`` and yield each published shard as it completes (in
    completion order). ``spec``: what a worker needs to build the same :class:`~camretrieval.extraction.describer.Describer`
    (see :func:`camretrieval.storage.writer.update_index`). ``address``: a running cluster ("auto", "ray://host:10001", ...);
    None starts a local Ray instance with ``workers`` CPUs for this run."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the writer shows its own (images committed, rate, time left)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        chunks = [
            json.dumps([(path, state.size, state.mtime_ns) for path, state in pending[start : start + commit_every]])
            for start in range(0, len(pending), commit_every)
        ]
        dataset = ray.data.from_items([{"chunk": chunk} for chunk in chunks], override_num_blocks=len(chunks))
        described = dataset.map_batches(
            ShardWorker,
            fn_constructor_args=(spec,),
            batch_size=1,
            batch_format="numpy",
            concurrency=max(1, min(workers, len(chunks))),
            num_cpus=1,
        )
        for row in described.iter_rows():
            result = json.loads(row["result"])
            yield ShardResult(
                result["name"],
                [(path, FileState(size, mtime), row_) for path, size, mtime, row_ in result["done"]],
                [(path, FileState(size, mtime), reason) for path, size, mtime, reason in result["failed"]],
                result["dim"],
            )
    finally:
        if started_here:
            ray.shutdown()
