"""Query-time refinement (METHOD.md sections 3 and 5) over an index's stored descriptors and maps.

A query is described once (:class:`QueryDescription`: the class vectors of its top classes, of its region when it
has a box); :meth:`Refinement.rank` then ranks the database by offline aggregation (OfA) or online aggregation with
the query's classes (OnA, :mod:`camretrieval.search.online`), re-ranks the top-R with CAM regions
(:mod:`camretrieval.search.reranking`) and expands the query (:mod:`camretrieval.search.expansion`), as
:class:`SearchOptions` say. No database image is decoded or forwarded, and the stored data is never modified: each
step returns a new :class:`Ranking`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from camretrieval.constants import DEFAULT_ONLINE_TOP, DEFAULT_QE_GATE, REFINE_ONLINE_CLASSES
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.backbones import Backbone
from camretrieval.method.aggregation import aggregate
from camretrieval.method.cell_major import DEFAULT_RERANK_CLASSES
from camretrieval.method.whitening import PCAWhitening
from camretrieval.search.expansion import expanded_query, reciprocal_neighbours
from camretrieval.search.online import online_descriptors
from camretrieval.search.reranking import region_scores, rerank_order
from camretrieval.storage.maps import MapStore, require_maps


@dataclass(frozen=True)
class SearchOptions:
    """Query-time refinement (METHOD.md sections 3 and 5); the defaults are plain offline aggregation (OfA).

    - ``online``: online aggregation, database images aggregated with the query's top-``online_classes`` classes
      (default: the index's N_c): the top ``online_top`` R of the OfA search (default
      :data:`DEFAULT_ONLINE_TOP`, which bounds a query's cost on a large index: docs/refinement.md), 0 for all.
    - ``online_whitening`` False: online aggregation without the PCA-whitening (the raw class vectors, l2-normalised
      and summed), the query alike; it ranks in the raw feature space, so re-ranking and QE (which work in the
      whitened one) do not follow it. :meth:`refine` is the measured best for box queries.
    - ``rerank`` R: re-rank the top-R with CAM regions described with the query's top-``rerank_classes`` (N_re).
    - ``qe`` K: query expansion with the top-K results, ``qe_alpha`` > 0 for alpha-QE (0: average QE), with only
      those of them that are k-reciprocal neighbours of the query: ``qe_gate`` k (default :data:`DEFAULT_QE_GATE`;
      0: all K, the paper's QE; :meth:`Refinement.expand`).

    R and K larger than the database are clipped to it.
    """

    online: bool = False
    online_classes: int | None = None
    online_top: int | None = None
    online_whitening: bool = True
    rerank: int = 0
    rerank_classes: int = DEFAULT_RERANK_CLASSES
    qe: int = 0
    qe_alpha: float = 0.0
    qe_gate: int | None = None

    def __post_init__(self) -> None:
        for name in ("online_top", "rerank", "qe", "qe_gate"):
            if (getattr(self, name) or 0) < 0:
                raise CamRetrievalError(f"{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.online_classes is not None and self.online_classes < 1:
            raise CamRetrievalError(f"online_classes must be at least 1, got {self.online_classes}")
        if self.rerank_classes < 1:
            raise CamRetrievalError(f"rerank_classes must be at least 1, got {self.rerank_classes}")
        if not (self.qe_alpha >= 0 and np.isfinite(self.qe_alpha)):
            raise CamRetrievalError(f"qe_alpha must be a finite power >= 0, got {self.qe_alpha}")
        if self.qe_gate is not None and not self.qe:
            raise CamRetrievalError("qe_gate only applies to query expansion (qe=K)")
        if self.online_top is not None and not self.online:
            raise CamRetrievalError("online_top only applies to online aggregation (online=True)")
        if not self.online_whitening and not self.online:
            raise CamRetrievalError("online_whitening only applies to online aggregation (online=True)")
        if not self.online_whitening and (self.rerank or self.qe):
            raise CamRetrievalError(
                "online aggregation without whitening ranks in the raw feature space; re-ranking and query expansion "
                "work in the whitened one: use one or the other"
            )

    @classmethod
    def refine(cls) -> "SearchOptions":
        """The measured best refinement for box queries (``search --refine``; docs/refinement.md "The measured best"):
        online aggregation with the query's top 8 classes, without the whitening, over the top
        :data:`DEFAULT_ONLINE_TOP` of plain search."""
        return cls(online=True, online_classes=REFINE_ONLINE_CLASSES, online_whitening=False)

    @property
    def refined(self) -> bool:
        return self.online or self.rerank > 0 or self.qe > 0

    @property
    def needs_maps(self) -> bool:
        return self.online or self.rerank > 0

    @property
    def online_top_or_default(self) -> int:
        """``online_top``, or :data:`DEFAULT_ONLINE_TOP` when not given (0: every image)."""
        return DEFAULT_ONLINE_TOP if self.online_top is None else self.online_top

    @property
    def qe_gate_or_default(self) -> int:
        """k of the gate on query expansion's results: ``qe_gate``, or :data:`DEFAULT_QE_GATE` when not given
        (0: none; without ``qe`` 0)."""
        if not self.qe:
            return 0
        return DEFAULT_QE_GATE if self.qe_gate is None else self.qe_gate

    def online_limit(self, n_images: int) -> int:
        """How many of the OfA ranking's first images online aggregation re-aggregates in a database of ``n_images``."""
        top = self.online_top_or_default
        return n_images if top == 0 else min(top, n_images)

    def online_n_classes(self, n_classes: int) -> int:
        """N_c of online aggregation: ``online_classes``, or the index's ``n_classes``."""
        return self.online_classes or n_classes


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
        """Every database image's similarity with ``query`` (dim,) under this ranking's descriptors (N,); with
        several queries (M x dim), M x N."""
        queries = np.asarray(query, dtype=np.float32)
        scores = queries @ self.base.T if queries.ndim == 2 else self.base @ queries
        if self.overrides:
            ids = np.fromiter(self.overrides, dtype=np.int64)
            scores[..., ids] = queries @ np.stack([self.overrides[i] for i in ids.tolist()]).T
        return scores


class Refinement:
    """The query-time pipeline over one index: its stored OfA ``descriptors`` (N x dim, only read), ``whitening``,
    N_c (``n_classes``), stored ``maps`` (None: built without them) and the ``backbone`` whose classifier weights
    give the CAMs of any class."""

    def __init__(
        self,
        descriptors: np.ndarray,
        whitening: PCAWhitening | None,
        n_classes: int,
        maps: MapStore | None,
        backbone: Backbone,
    ) -> None:
        self.descriptors = descriptors
        self.whitening = whitening
        self.n_classes = n_classes
        self.maps = maps
        self.backbone = backbone

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
            ranking = self.expand(ranking, options.qe, options.qe_alpha, options.qe_gate_or_default)
        return ranking

    def _order(self, scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
        ids = np.flatnonzero(allowed)
        return ids[np.argsort(-scores[ids].astype(np.float64), kind="stable")]

    def _allowed(self, exclude: Sequence[int]) -> np.ndarray:
        allowed = np.ones(len(self.descriptors), dtype=bool)
        excluded = np.asarray(list(exclude), dtype=np.int64)
        if excluded.size and (excluded.min() < 0 or excluded.max() >= len(self.descriptors)):
            raise CamRetrievalError(f"excluded indices must be database indices (0..{len(self.descriptors) - 1})")
        allowed[excluded] = False
        return allowed

    def initial_ranking(
        self, query: QueryDescription, options: SearchOptions | None = None, exclude: Sequence[int] = ()
    ) -> Ranking:
        """OfA: the query's descriptor (its top N_c classes) against the stored descriptors. OnA (``options.online``):
        the query's descriptor over its top-``online_classes`` classes against every database image aggregated
        online with those classes: the top ``options.online_limit`` of the OfA ranking, re-sorted (all of them on a
        database that small; the rest keeps its OfA order and scores)."""
        options = options or SearchOptions()
        allowed = self._allowed(exclude)
        stored = self.descriptors.view()
        stored.flags.writeable = False  # the ranking holds it: nothing downstream may write into the index
        q_ofa = query.descriptor(self.n_classes, self.whitening)
        if not options.online:
            scores = stored @ q_ofa
            ids = self._order(scores, allowed)
            return Ranking(ids, scores[ids], stored, query=q_ofa)
        store = require_maps(self.maps, "online aggregation")
        n_online = options.online_n_classes(self.n_classes)
        if query.classes is None:
            raise CamRetrievalError("online aggregation needs the query's classes (pooling cam)")
        whitening = self.whitening if options.online_whitening else None
        classes, q_online = query.classes[:n_online], query.descriptor(n_online, whitening)
        weight = self.backbone.classifier_weight
        limit = options.online_limit(len(self.descriptors))
        if limit == len(self.descriptors):
            base = online_descriptors(store, np.arange(len(self.descriptors)), classes, weight, whitening)
            scores = base @ q_online
            ids = self._order(scores, allowed)
            return Ranking(ids, scores[ids], base, query=q_online)
        first = stored @ q_ofa
        ids = self._order(first, allowed)
        top = ids[:limit]
        online = online_descriptors(store, top, classes, weight, whitening)
        top_scores = online @ q_online
        order = np.argsort(-top_scores.astype(np.float64), kind="stable")
        ids = np.concatenate([top[order], ids[len(top) :]])
        scores = np.concatenate([top_scores[order], first[ids[len(top) :]]])
        return Ranking(ids, scores, stored, {int(i): d for i, d in zip(top, online)}, query=q_online)

    def rerank(
        self, query: QueryDescription, ranking: Ranking, top: int, n_classes: int = DEFAULT_RERANK_CLASSES
    ) -> Ranking:
        """Re-rank the first ``top`` (R, clipped to the ranking) with CAM regions (METHOD.md section 5, see
        :mod:`camretrieval.search.reranking`): each candidate scored by its best region against the query's descriptor
        over its top-``n_classes`` (N_re) classes; the rest keeps its order. Returns a new :class:`Ranking` whose
        re-ranked images are described by their best region (for query expansion); the index is not modified."""
        store = require_maps(self.maps, "re-ranking with CAM regions")
        if query.classes is None:
            raise CamRetrievalError("re-ranking needs the query's classes (pooling cam)")
        top = min(top, len(ranking.ids))
        if top == 0:
            return ranking
        backbone = self.backbone
        strides = (backbone.layer_strides[backbone.feature_layer], backbone.layer_strides[backbone.cam_layer])
        q_re = query.descriptor(n_classes, self.whitening)
        candidates = ranking.ids[:top]
        regions = region_scores(
            store, candidates, query.classes[:n_classes], q_re, self.backbone.classifier_weight, self.whitening, strides
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

    def expand(self, ranking: Ranking, top: int, alpha: float = 0.0, gate: int = 0) -> Ranking:
        """Query expansion (METHOD.md section 5, :mod:`camretrieval.search.expansion`): the ranking's query plus its first
        ``top`` (K, clipped) results, each as the descriptor it was ranked with (a re-ranked image's best region),
        weighted by similarity^``alpha`` (0: average QE); the database searched again with that query under the
        same descriptors. ``gate`` k > 0: only the results that are k-reciprocal neighbours of the query
        (:func:`~camretrieval.search.expansion.reciprocal_neighbours`, among the ranked images); none of them, the
        ranking is returned as it is. Images left out of ``ranking`` stay out."""
        if ranking.query is None:
            raise CamRetrievalError("query expansion needs the ranking's query descriptor")
        top = min(top, len(ranking.ids))
        if top == 0:
            return ranking
        allowed = np.zeros(len(self.descriptors), dtype=bool)
        allowed[ranking.ids] = True
        neighbours = ranking.descriptors(ranking.ids[:top])
        if gate:
            around = ranking.similarities(neighbours)
            around[:, ~allowed] = -np.inf
            around[np.arange(top), ranking.ids[:top]] = -np.inf  # not its own neighbour
            neighbours = neighbours[reciprocal_neighbours(ranking.scores[:top], around, gate)]
            if len(neighbours) == 0:
                return ranking
        query = expanded_query(ranking.query, neighbours, alpha)
        scores = ranking.similarities(query)
        ids = self._order(scores, allowed)
        return Ranking(ids, scores[ids], ranking.base, dict(ranking.overrides), query=query)
