"""An index of a collection of images: descriptors, their paths, the settings that made them, and FAISS search.

On disk an index is a folder that grows and shrinks (:mod:`camretrieval.store`: a SQLite catalog, immutable shards of
descriptors and float16 feature maps, the whitening; no pickles); :func:`camretrieval.indexing.update_index` grows
it, :meth:`Index.open` reads the collection as of the last commit into memory, and :meth:`Index.build` /
:meth:`Index.save` make and write one in a single step.

Search is exact (FAISS inner product over l2-normalised descriptors, so cosine similarity) unless the index was built
with an approximate FAISS index (``camretrieval index --ann``). Query-time refinement (METHOD.md sections 3 and 5)
is chosen with :class:`SearchOptions`: online aggregation (OnA) with the query's classes, re-ranking of the top-R
with CAM regions, and (alpha-)query expansion, all computed from the stored maps and descriptors: no database image
is decoded or forwarded at query time, and none of the stored data is ever modified.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from .backbones import load_backbone
from .aggregation import aggregate
from .ann import build_search_index
from .descriptor import DEFAULT_BACKBONE, DEFAULT_CLASSES, DEFAULT_POOLING, DEFAULT_SIZE, Describer, FileFailure
from .errors import CamRetrievalError
from .expansion import expanded_query
from .images import find_images
from .mapstore import MapStore, MapStoreWriter, MapsNotStoredError, maps_missing_message
from .online import online_descriptors
from .regions import Box
from .reranking import DEFAULT_RERANK_CLASSES, region_scores, rerank_order
from .store import DESCRIPTORS, FileState, IndexFileError, IndexStore, Snapshot, new_shard_folder, publish_shard, rebuild_hint
from .whitening import PCAWhitening


@dataclass
class SearchHit:
    path: str  # relative to the indexed folder
    score: float  # cosine similarity


@dataclass(frozen=True)
class SearchOptions:
    """Query-time refinement (METHOD.md sections 3 and 5); the defaults are plain offline aggregation (OfA).

    - ``online``: online aggregation, every database image aggregated with the query's top-``online_classes``
      classes (default: the index's N_c); ``online_top`` R > 0 re-aggregates only the top-R of the OfA search.
    - ``rerank`` R: re-rank the top-R with CAM regions described with the query's top-``rerank_classes`` (N_re).
    - ``qe`` K: query expansion with the top-K results, ``qe_alpha`` > 0 for alpha-QE (0: average QE).

    R and K larger than the database are clipped to it.
    """

    online: bool = False
    online_classes: int | None = None
    online_top: int = 0
    rerank: int = 0
    rerank_classes: int = DEFAULT_RERANK_CLASSES
    qe: int = 0
    qe_alpha: float = 0.0

    def __post_init__(self) -> None:
        for name in ("online_top", "rerank", "qe"):
            if getattr(self, name) < 0:
                raise CamRetrievalError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.online_classes is not None and self.online_classes < 1:
            raise CamRetrievalError(f"online_classes must be at least 1, got {self.online_classes}")
        if self.rerank_classes < 1:
            raise CamRetrievalError(f"rerank_classes must be at least 1, got {self.rerank_classes}")
        if not (self.qe_alpha >= 0 and np.isfinite(self.qe_alpha)):
            raise CamRetrievalError(f"qe_alpha must be a finite power >= 0, got {self.qe_alpha}")
        if self.online_top and not self.online:
            raise CamRetrievalError("online_top only applies to online aggregation (online=True)")

    @property
    def refined(self) -> bool:
        return self.online or self.rerank > 0 or self.qe > 0

    @property
    def needs_maps(self) -> bool:
        return self.online or self.rerank > 0


@dataclass
class QueryDescription:
    """A query's class vectors, from one forward pass of the query (of its region when it has a box, whose classes
    are then the region's): ``vectors`` N x K, l2-normalised, of its top-N classes best first (``classes`` N), or
    for a baseline pooling its pooled vectors (``classes`` None)."""

    vectors: torch.Tensor
    classes: torch.Tensor | None

    def descriptor(self, n_classes: int | None, whitening: PCAWhitening | None) -> np.ndarray:
        """The query's descriptor aggregated over its top-``n_classes`` class vectors (all for a baseline)."""
        vectors = self.vectors if self.classes is None or n_classes is None else self.vectors[:n_classes]
        with torch.inference_mode():
            return aggregate(vectors.unsqueeze(0), whitening)[0].float().cpu().numpy()


@dataclass
class Ranking:
    """One query's ranking of the database (the excluded images left out): ``ids`` best first and their ``scores``,
    and the descriptor each image was scored with: row i of ``base`` (the stored OfA descriptors, or this query's
    OnA descriptors), or ``overrides[i]`` (an image re-aggregated online or re-ranked by a region). The index's own
    arrays are never written: ``base`` is the stored array only when nothing replaced it, and is read-only then."""

    ids: np.ndarray
    scores: np.ndarray
    base: np.ndarray
    overrides: dict[int, np.ndarray] = field(default_factory=dict)
    query: np.ndarray | None = None  # the query descriptor the ranking was made with (expansion starts from it)

    def descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.array(self.base[np.asarray(ids, dtype=np.int64)], dtype=np.float32)
        for row, i in enumerate(np.asarray(ids).tolist()):
            if i in self.overrides:
                rows[row] = self.overrides[i]
        return rows

    def similarities(self, query: np.ndarray) -> np.ndarray:
        """Every database image's similarity with ``query`` under this ranking's descriptors (N,)."""
        scores = self.base @ np.asarray(query, dtype=np.float32)
        if self.overrides:
            ids = np.fromiter(self.overrides, dtype=np.int64)
            scores[ids] = np.stack([self.overrides[i] for i in ids.tolist()]) @ query
        return scores


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
        self._maps_spooled = False  # maps still in MapStoreWriter's spool files, which save() moves into place
        self._describer: Describer | None = None
        self.device = "cpu"

    def __len__(self) -> int:
        return len(self.paths)

    # --- building ---

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
        batch_size: int = 16,
        workers: int = 2,
        device: str = "cpu",
        progress: bool = True,
        pooling: str = DEFAULT_POOLING,
        keep_maps: bool | None = None,
        maps_dir: str | Path | None = None,
        class_list: Sequence[int] | None = None,
    ) -> tuple["Index", list[FileFailure]]:
        """Describe every image under ``image_root`` (recursively). Returns the index and the files skipped.

        ``whitening`` None makes unwhitened descriptors (the "raw" baselines); ``pooling`` picks a baseline
        instead of the class-weighted descriptor (see ``camretrieval.descriptor.POOLINGS``).

        ``keep_maps`` (default: for the class-weighted pooling) also stores every image's maps in float16 for
        online aggregation and re-ranking (about 0.7 MB per 448 x 597 image with efficientnet_lite0, 266 cells x
        1280 channels x 2 bytes); they are streamed to spool files in ``maps_dir`` (default: a temporary folder;
        give the index folder to avoid a copy across file systems) and moved into the index folder by :meth:`save`.

        ``class_list`` (a :class:`camretrieval.classlist.ClassList` or class indices; default: the whitening's, if it
        was learned with one): every image aggregated over exactly those classes (paper section 4.3), N_c = its
        length; recorded in the settings, so queries are described alike."""
        image_root = Path(image_root)
        paths = find_images(image_root)
        if not paths:
            raise CamRetrievalError(f"no images (jpg, jpeg, png, webp, bmp, tif, tiff) under {image_root}")
        weights = str(Path(weights).resolve()) if weights else None
        describer = index_describer(backbone, weights, feature_layer, size, n_classes, whitening, device, pooling, class_list)
        if keep_maps is None:
            keep_maps = pooling == "cam"
        if not keep_maps:
            descriptors, done, failures = describer.describe_files(paths, image_root, batch_size, workers, progress)
            store = None
        else:
            descriptors, done, failures, store = _describe_and_keep_maps(
                describer, paths, image_root, batch_size, workers, progress, maps_dir
            )
        if not done:
            raise CamRetrievalError(f"none of the {len(paths)} images under {image_root} could be read")
        settings = index_settings(describer, weights)
        index = cls(descriptors, [paths[i] for i in done], whitening, settings, image_root.resolve(), maps=store)
        index._maps_spooled = store is not None
        index._describer = describer
        return index, failures

    # --- files ---

    def save(self, index_dir: str | Path) -> None:
        """Write this index into ``index_dir`` as a store (:mod:`camretrieval.store`), replacing any index there, in
        one commit: a crash leaves either the old index or this one. To grow an index, use
        :func:`camretrieval.indexing.update_index` (``camretrieval index``) instead."""
        with IndexStore.writing(index_dir) as store:
            name, folder = new_shard_folder(store.directory)
            try:
                np.save(folder / DESCRIPTORS, self.descriptors)
                if self.maps is not None:
                    self.maps.save(folder, move=self._maps_spooled)
                publish_shard(store.directory, name, folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            rows = [(path, _file_state(self.image_root, path), row) for row, path in enumerate(self.paths)]
            search = {"ann_kind": None, "ann": None, "float16": False}  # a replaced index's search options go too
            meta = self.store_meta(store.save_whitening(self.whitening)) | search
            store.commit(name, rows, meta=meta, replace=True)
            store.delete_unused_files()
        if self._maps_spooled:  # the spool files were moved into the shard: read them from there from now on
            self.maps = MapStore.open(store.shard_path(name), self.maps.separate_cam_layer, len(self))
            self._maps_spooled = False

    def store_meta(self, whitening_file: str | None) -> dict:
        """What the store's meta table records about this index."""
        return {
            "settings": self.settings,
            "image_root": str(self.image_root) if self.image_root else None,
            "dim": int(self.descriptors.shape[1]),
            "whitening": whitening_file,
            "maps": {"separate_cam_layer": self.maps.separate_cam_layer} if self.maps is not None else None,
        }

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
                        f"the index at {index_dir} is incomplete or damaged ({error}): rebuild it with "
                        f"{rebuild_hint(Path(index_dir))}"
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
            s = self.settings
            self._describer = index_describer(
                s["backbone"], s.get("weights"), s["feature_layer"], s["size"], s["n_classes"], self.whitening,
                self.device, s.get("pooling", DEFAULT_POOLING), s.get("class_list"),
            )
        return self._describer

    def search_descriptors(self, queries: np.ndarray, top: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine-similarity search: (scores Q x k, database indices Q x k), best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        top = min(top, len(self))
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

    def _online_classes(self, options: SearchOptions) -> int:
        return options.online_classes or self.n_classes

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
            self._online_classes(options) if options.online else 0,
            options.rerank_classes if options.rerank else 0,
        )
        pooled = describer.image_vectors(image, box, n_classes)
        classes = pooled.classes[0] if pooled.classes is not None else None
        return QueryDescription(pooled.vectors[0], classes)

    def require_maps(self, what: str) -> MapStore:
        if self.maps is None:
            raise MapsNotStoredError(maps_missing_message(what))
        return self.maps

    def _classifier_weight(self) -> torch.Tensor:
        return self.describer.backbone.classifier_weight

    def rank(
        self, query: QueryDescription, options: SearchOptions | None = None, exclude: Sequence[int] = ()
    ) -> Ranking:
        """The whole database ranked for one query: OfA or OnA (:meth:`initial_ranking`), then re-ranking of the
        top-R (:meth:`rerank`), then query expansion (:meth:`expand`), as ``options`` say. ``exclude``: database
        indices left out of the ranking (e.g. the query's own image when the query is in the database)."""
        options = options or SearchOptions()
        ranking = self.initial_ranking(query, options, exclude)
        if options.rerank:
            ranking = self.rerank(query, ranking, options.rerank, options.rerank_classes)
        if options.qe:
            ranking = self.expand(ranking, options.qe, options.qe_alpha)
        return ranking

    def _order(self, scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        ids = np.flatnonzero(allowed)
        return ids[np.argsort(-scores[ids].astype(np.float64), kind="stable")]

    def _allowed(self, exclude: Sequence[int]) -> np.ndarray:
        allowed = np.ones(len(self), dtype=bool)
        excluded = np.asarray(list(exclude), dtype=np.int64)
        if excluded.size and (excluded.min() < 0 or excluded.max() >= len(self)):
            raise CamRetrievalError(f"excluded indices must be database indices (0..{len(self) - 1})")
        allowed[excluded] = False
        return allowed

    def initial_ranking(
        self, query: QueryDescription, options: SearchOptions | None = None, exclude: Sequence[int] = ()
    ) -> Ranking:
        """OfA: the query's descriptor (its top N_c classes) against the stored descriptors. OnA (``options.online``):
        the query's descriptor over its top-``online_classes`` classes against every database image aggregated
        online with those classes (or only the top ``online_top`` of the OfA ranking, re-sorted; the rest keeps its
        OfA order and scores)."""
        options = options or SearchOptions()
        allowed = self._allowed(exclude)
        stored = self.descriptors.view()
        stored.flags.writeable = False  # the ranking holds it: nothing downstream may write into the index
        q_ofa = query.descriptor(self.n_classes, self.whitening)
        if not options.online:
            scores = stored @ q_ofa
            ids = self._order(scores, allowed)
            return Ranking(ids, scores[ids], stored, query=q_ofa)
        store = self.require_maps("online aggregation")
        n_online = self._online_classes(options)
        if query.classes is None:
            raise CamRetrievalError("online aggregation needs the query's classes (pooling cam)")
        classes, q_online = query.classes[:n_online], query.descriptor(n_online, self.whitening)
        weight = self._classifier_weight()
        if options.online_top == 0:
            base = online_descriptors(store, np.arange(len(self)), classes, weight, self.whitening)
            scores = base @ q_online
            ids = self._order(scores, allowed)
            return Ranking(ids, scores[ids], base, query=q_online)
        first = stored @ q_ofa
        ids = self._order(first, allowed)
        top = ids[: min(options.online_top, len(ids))]
        online = online_descriptors(store, top, classes, weight, self.whitening)
        top_scores = online @ q_online
        order = np.argsort(-top_scores.astype(np.float64), kind="stable")
        ids = np.concatenate([top[order], ids[len(top) :]])
        scores = np.concatenate([top_scores[order], first[ids[len(top) :]]])
        return Ranking(ids, scores, stored, {int(i): d for i, d in zip(top, online)}, query=q_online)

    def rerank(
        self, query: QueryDescription, ranking: Ranking, top: int, n_classes: int = DEFAULT_RERANK_CLASSES
    ) -> Ranking:
        """Re-rank the first ``top`` (R, clipped to the ranking) with CAM regions (METHOD.md section 5, see
        :mod:`camretrieval.reranking`): each candidate scored by its best region against the query's descriptor
        over its top-``n_classes`` (N_re) classes; the rest keeps its order. Returns a new :class:`Ranking` whose
        re-ranked images are described by their best region (for query expansion); the index is not modified."""
        store = self.require_maps("re-ranking with CAM regions")
        if query.classes is None:
            raise CamRetrievalError("re-ranking needs the query's classes (pooling cam)")
        top = min(top, len(ranking.ids))
        if top == 0:
            return ranking
        backbone = self.describer.backbone
        strides = (backbone.layer_strides[backbone.feature_layer], backbone.layer_strides[backbone.cam_layer])
        q_re = query.descriptor(n_classes, self.whitening)
        candidates = ranking.ids[:top]
        regions = region_scores(
            store, candidates, query.classes[:n_classes], q_re, self._classifier_weight(), self.whitening, strides
        )
        order = rerank_order(regions.scores)
        overrides = dict(ranking.overrides) | {int(i): d for i, d in zip(candidates, regions.descriptors)}
        return Ranking(
            np.concatenate([candidates[order], ranking.ids[top:]]),
            np.concatenate([regions.scores[order], ranking.scores[top:]]),
            ranking.base,
            overrides,
            query=ranking.query,
        )

    def expand(self, ranking: Ranking, top: int, alpha: float = 0.0) -> Ranking:
        """Query expansion (METHOD.md section 5, :mod:`camretrieval.expansion`): the ranking's query plus its first
        ``top`` (K, clipped) results, each as the descriptor it was ranked with (a re-ranked image's best region),
        weighted by similarity^``alpha`` (0: average QE); the database searched again with that query under the
        same descriptors. Images left out of ``ranking`` stay out."""
        if ranking.query is None:
            raise CamRetrievalError("query expansion needs the ranking's query descriptor")
        top = min(top, len(ranking.ids))
        if top == 0:
            return ranking
        query = expanded_query(ranking.query, ranking.descriptors(ranking.ids[:top]), alpha)
        scores = ranking.similarities(query)
        allowed = np.zeros(len(self), dtype=bool)
        allowed[ranking.ids] = True
        ids = self._order(scores, allowed)
        return Ranking(ids, scores[ids], ranking.base, dict(ranking.overrides), query=query)


def index_describer(
    backbone: str,
    weights: str | None,
    feature_layer: str | None,
    size: int,
    n_classes: int,
    whitening: PCAWhitening | None,
    device: str,
    pooling: str,
    class_list: Sequence[int] | None = None,
    precision: str = "float32",
) -> Describer:
    """The describer an index's images are described with (by :meth:`Index.build`, ``update_index`` and each Ray
    worker alike); ``weights``: an absolute path, or None for packaged weights."""
    return Describer(
        load_backbone(backbone, weights=weights, feature_layer=feature_layer),
        size,
        n_classes,
        whitening,
        device,
        pooling,
        class_list=class_list,
        precision=precision,
    )


def index_settings(describer: Describer, weights: str | None) -> dict:
    """The settings an index records: everything that determines its descriptors (queries are described alike)."""
    return describer.settings.to_dict() | {"n_classes": describer.n_classes, "weights": weights}


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
            f"the index at {store.directory} is incomplete or damaged ({error}): rebuild it with "
            f"{rebuild_hint(store.directory)}"
        ) from error
    return descriptors, whitening, MapStore.gather(shard_maps, shard_of, rows) if with_maps else None


def _file_state(root: Path | None, path: str) -> FileState:
    """The file's state as :func:`camretrieval.indexing.update_index` compares it; (-1, -1), never equal to a real
    file's, when the file is not there (it will be described again if it appears)."""
    try:
        return FileState.of(root / path) if root is not None else FileState(-1, -1)
    except OSError:
        return FileState(-1, -1)


def _describe_and_keep_maps(
    describer: Describer,
    paths: Sequence[str],
    root: Path,
    batch_size: int,
    workers: int,
    progress: bool,
    maps_dir: str | Path | None,
) -> tuple[np.ndarray, list[int], list[FileFailure], MapStore | None]:
    """:meth:`Describer.describe_files` that also streams each image's maps into a :class:`MapStoreWriter` (the
    same forward pass: storing the maps costs no extraction)."""
    backbone = describer.backbone
    separate = backbone.feature_layer != backbone.cam_layer
    writer = MapStoreWriter(len(paths), separate, maps_dir)
    rows: list[np.ndarray] = []
    done: list[int] = []
    failures: list[FileFailure] = []

    def compute(maps):
        return describer.aggregate(describer.pooled_vectors(maps)), maps

    try:
        for indices, (descriptors, maps) in describer._iterate_files(
            paths, root, compute, batch_size, workers, progress, failures
        ):
            for row, index in enumerate(indices):
                writer.add(index, maps.features[row], maps.cam_activations[row] if separate else None)
            rows.append(descriptors.cpu().numpy())
            done.extend(indices)
    except BaseException:
        writer.abort()
        raise
    if not done:
        writer.abort()
        return np.zeros((0,), np.float32), [], failures, None
    order = np.argsort(done, kind="stable")
    stacked = np.concatenate(rows)[order]
    done = [done[i] for i in order]
    return stacked.astype(np.float32), done, failures, writer.finish(done)

