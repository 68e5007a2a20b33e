"""An index of a collection of images: descriptors, their paths, the settings that made them, and FAISS search.

On disk an index is a folder that grows and shrinks (:mod:`camretrieval.storage`: a SQLite catalog, immutable shards
of descriptors and compressed float16 feature maps, the whitening; no pickles), written only by
:mod:`camretrieval.storage.writer`: :meth:`Index.build` runs that writer into a folder (a temporary one unless told)
and opens the result, :meth:`Index.save` writes an index's content through it, and :meth:`Index.open` reads a
folder as of its last commit into memory.

Search is exact (FAISS inner product over l2-normalised descriptors, so cosine similarity) unless the index was built
with an approximate FAISS index (``camretrieval index --ann``). Query-time refinement (METHOD.md sections 3 and 5,
:mod:`camretrieval.search.refinement`) is chosen with :class:`~camretrieval.search.refinement.SearchOptions`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.describer import Describer, FileFailure
from camretrieval.extraction.settings import (
    DEFAULT_BACKBONE,
    DEFAULT_CLASSES,
    DEFAULT_POOLING,
    DEFAULT_SIZE,
    ExtractionSettings,
)
from camretrieval.method.regions import Box
from camretrieval.method.whitening import PCAWhitening
from camretrieval.search.refinement import QueryDescription, Ranking, Refinement, SearchOptions
from camretrieval.storage.ann import build_search_index
from camretrieval.storage.catalog import IndexFileError, IndexStore, Snapshot, repair_hint
from camretrieval.storage.maps import MapStore
from camretrieval.storage.shards import load_snapshot
from camretrieval.storage.writer import update_index, write_index


@dataclass
class SearchHit:
    path: str  # relative to the indexed folder
    score: float  # cosine similarity


class Index:
    """Descriptors of a collection and exact inner-product search over them.

    Build one with :meth:`build` (or ``camretrieval index``), reopen it with :meth:`open`, and search it with query
    images (:meth:`search`) or query descriptors (:meth:`search_descriptors`).
    """

    def __init__(
        self,
        descriptors: np.ndarray,
        paths: Sequence[str],
        whitening: PCAWhitening | None,
        settings: dict,
        image_root: str | Path | None = None,
        faiss_index: faiss.Index | None = None,
        maps: MapStore | None = None,
    ) -> None:
        descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
        if descriptors.ndim != 2 or len(descriptors) != len(paths):
            raise ValueError(f"{len(paths)} paths but descriptors of shape {descriptors.shape}")
        self.descriptors = descriptors
        self.paths = list(paths)
        self.whitening = whitening
        self.settings = dict(settings)
        self.image_root = Path(image_root) if image_root is not None else None
        if faiss_index is None:
            faiss_index = faiss.IndexFlatIP(descriptors.shape[1])
            faiss_index.add(descriptors)
        self.faiss_index = faiss_index
        if maps is not None and len(maps) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but maps of {len(maps)} images")
        self.maps = maps  # the stored maps for query-time refinement (None: built without them)
        self._describer: Describer | None = None
        self._temporary: tempfile.TemporaryDirectory | None = None  # the folder Index.build wrote, when temporary
        self.device = "cpu"

    def __len__(self) -> int:
        return len(self.paths)

    # --- building and writing (through camretrieval.storage.writer) ---

    @classmethod
    def build(
        cls,
        image_root: str | Path,
        whitening: PCAWhitening | None,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | Path | None = None,
        feature_layer: str | None = None,
        size: int = DEFAULT_SIZE,
        n_classes: int = DEFAULT_CLASSES,
        batch_size: int | None = None,
        workers: int = 2,
        device: str = "cpu",
        progress: bool = True,
        pooling: str = DEFAULT_POOLING,
        keep_maps: bool | None = None,
        index_dir: str | Path | None = None,
        class_list: Sequence[int] | None = None,
        scales: Sequence[float] = (1.0,),
    ) -> tuple["Index", list[FileFailure]]:
        """Describe every image under ``image_root`` (recursively) into an index folder and open it. Returns the
        index and the files skipped.

        ``whitening`` None makes unwhitened descriptors (the "raw" baselines); ``pooling`` picks a baseline
        instead of the class-weighted descriptor (see :data:`camretrieval.method.pooling.POOLINGS`).

        ``keep_maps`` (default: for the class-weighted pooling) also stores every image's maps (float16 values,
        compressed losslessly: about 37 kB per 448 px image with efficientnet_lite0, :mod:`camretrieval.storage.maps`)
        for online aggregation and re-ranking. The folder is ``index_dir`` (grown if it holds an index of the same settings), or
        a temporary one that lives as long as the returned index; :meth:`save` writes it elsewhere.

        ``class_list`` (a :class:`camretrieval.method.class_list.ClassList` or class indices; default: the
        whitening's, if it was learned with one): every image aggregated over exactly those classes (paper section
        4.3), N_c = its length; recorded in the settings, so queries are described alike. ``scales``: multi-scale
        descriptors (factors of ``size``, :class:`~camretrieval.extraction.settings.ExtractionSettings`)."""
        settings = ExtractionSettings(
            backbone=backbone, feature_layer=feature_layer, size=size, pooling=pooling, class_list=class_list,
            n_classes=n_classes, weights=weights, scales=tuple(scales),
        )
        temporary = None
        if index_dir is None:
            temporary = tempfile.TemporaryDirectory(prefix="camretrieval-index-")
            index_dir = Path(temporary.name) / "index"
        report = update_index(
            index_dir, image_root, whitening, settings, keep_maps, batch_size, workers, device, progress
        )
        if report.total == 0:
            raise CamRetrievalError(
                f"none of the {report.added + report.updated + report.retried} images under {image_root} could be read"
            )
        index = cls.open(index_dir, device)
        index._temporary = temporary
        return index, report.failures

    def save(self, index_dir: str | Path) -> None:
        """Write this index into ``index_dir`` (:func:`camretrieval.storage.writer.write_index`), replacing any index
        there, in one commit: a crash leaves either the old index or this one. To grow an index, use
        :func:`camretrieval.storage.writer.update_index` (``camretrieval index``) instead."""
        write_index(index_dir, self.paths, self.descriptors, self.whitening, self.settings, self.image_root, self.maps)

    @classmethod
    def open(cls, index_dir: str | Path, device: str = "cpu", exact: bool = False) -> "Index":
        """Open a saved index; queries will be described on ``device``. Searches use the index's approximate FAISS
        index when it has one (``camretrieval index --ann``), unless ``exact``.

        What is opened is the index as of its last commit: a writer adding images meanwhile is not waited for."""
        for attempt in range(3):
            store = IndexStore.open(index_dir)
            try:
                return cls._from_snapshot(store, store.snapshot(), device, exact)
            except FileNotFoundError as error:  # a writer deleted a shard no longer used after our snapshot: look again
                if attempt == 2:
                    raise IndexFileError(
                        f"the index at {index_dir} is incomplete or damaged ({error}): {repair_hint(Path(index_dir))}"
                    ) from error
            finally:
                store.close()
        raise AssertionError("unreachable")

    @classmethod
    def _from_snapshot(cls, store: IndexStore, snapshot: Snapshot, device: str, exact: bool) -> "Index":
        meta = snapshot.meta
        descriptors, whitening, maps = load_snapshot(store, snapshot, with_maps=True)
        faiss_index = None if exact else store.load_ann(snapshot)
        if faiss_index is None and meta.get("float16"):  # half the memory; no measurable mAP cost (docs/dynamic.md)
            faiss_index = build_search_index(descriptors, None, float16=True)
        index = cls(descriptors, snapshot.paths, whitening, meta["settings"], meta.get("image_root"), faiss_index, maps)
        index.device = device
        return index

    # --- search ---

    @property
    def describer(self) -> Describer:
        """The query describer, with the backbone and settings the index was built with (loaded on first use)."""
        if self._describer is None:
            settings = ExtractionSettings.from_dict(self.settings)
            self._describer = Describer.from_settings(settings, self.whitening, self.device)
        return self._describer

    def search_descriptors(self, queries: np.ndarray, top: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine-similarity search: (scores Q x k, database indices Q x k), best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        top = min(top, len(self))
        if top < 1:  # an index whose images were all removed finds nothing (FAISS asks for k > 0)
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.faiss_index.search(queries, top)

    def search(
        self,
        images: Sequence[str | Path | Image.Image],
        boxes: Sequence[Box | None] | None = None,
        top: int = 10,
        options: SearchOptions | None = None,
    ) -> list[list[SearchHit]]:
        """Search with query images (each optionally with a box in its original pixels), best hits first.
        ``options``: query-time refinement (online aggregation, re-ranking, query expansion), none by default."""
        if options is None or not options.refined:
            scores, ids = self.search_descriptors(self.describer.describe(images, boxes), top)
            return [
                [SearchHit(self.paths[i], float(score)) for score, i in zip(row_scores, row_ids) if i >= 0]
                for row_scores, row_ids in zip(scores, ids)
            ]
        boxes = boxes if boxes is not None else [None] * len(images)
        if len(boxes) != len(images):
            raise CamRetrievalError(f"{len(images)} images but {len(boxes)} boxes")
        results = []
        for image, box in zip(images, boxes):
            ranking = self.rank(self.describe_query(image, box, options), options)
            results.append([SearchHit(self.paths[i], float(s)) for i, s in zip(ranking.ids[:top], ranking.scores[:top])])
        return results

    # --- query-time refinement (METHOD.md sections 3 and 5) ---

    @property
    def n_classes(self) -> int:
        """N_c: the classes aggregated per image (offline aggregation)."""
        return int(self.settings.get("n_classes", DEFAULT_CLASSES))

    def describe_query(
        self, image: str | Path | Image.Image, box: Box | None = None, options: SearchOptions | None = None
    ) -> QueryDescription:
        """One forward pass of the query: the class vectors of as many of its top classes as ``options`` need (of
        its region and with the region's classes when it has a ``box``)."""
        options = options or SearchOptions()
        describer = self.describer
        if options.needs_maps and describer.pooling != "cam":
            raise CamRetrievalError(
                f"online aggregation and re-ranking use class activation maps: this index was built with the "
                f"{describer.pooling!r} pooling; build it with --pooling cam"
            )
        n_classes = max(
            self.n_classes,
            options.online_n_classes(self.n_classes) if options.online else 0,
            options.rerank_classes if options.rerank else 0,
        )
        pooled = describer.image_vectors(image, box, n_classes)
        classes = pooled.classes[0] if pooled.classes is not None else None
        return QueryDescription(pooled.vectors[0], classes)

    @property
    def refinement(self) -> Refinement:
        """The query-time pipeline over this index's stored descriptors and maps (loads the backbone on first use)."""
        return Refinement(self.descriptors, self.whitening, self.n_classes, self.maps, self.describer.backbone)

    def rank(
        self, query: QueryDescription, options: SearchOptions | None = None, exclude: Sequence[int] = ()
    ) -> Ranking:
        """The whole database ranked for one query (:meth:`Refinement.rank`): OfA or OnA, then re-ranking of the
        top-R, then query expansion, as ``options`` say; ``exclude``: database indices left out of the ranking."""
        return self.refinement.rank(query, options, exclude)
