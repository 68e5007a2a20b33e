"""Search indexes for large collections: exact inner-product search (float32, or float16 storage) by default, and
approximate FAISS indexes for collections where a full scan is too slow, with their search effort calibrated to a
recall target.

Descriptors are l2-normalised, so every index here ranks by inner product (= cosine). All indexes are FAISS's own
classes, made with :func:`faiss.index_factory` where it can, and stored with :func:`faiss.serialize_index` (see
:func:`serialize` / :func:`deserialize`), never pickled. The kinds (``ANN_KINDS``):

- "ivf": inverted lists (a flat coarse quantizer) of fast-scan 4-bit PQ codes, each query's candidates re-scored
  exactly from a float16 copy of the descriptors: ``IVF{nlist},PQ{dim/2}x4fs,Refine(SQfp16)``. The one that keeps
  recall@100 >= 0.95 at a million (docs/search_scale.md); dim / 4 + 2 * dim + 8 bytes per image (1.2 kB at 512-d).
- "hnsw": a graph over the float32 (or float16) descriptors; the fastest per query, 3.6x slower to build than "ivf"
  at 1M, 2.3 kB per image.
- "ivfpq": inverted lists of 8-bit PQ codes, 1/14 of float32; recall@100 below 0.9 without re-scoring.

The search effort (IVF ``nprobe``, the re-scoring depth ``k_factor``, HNSW ``efSearch``) is saved with the index.
:func:`calibrate` chooses the cheapest effort whose recall@100 against exact search, measured on held-out
descriptors of the collection itself, meets a target; :func:`set_search_effort` is the expert knob.

    >>> index = build_search_index(descriptors, "ivf")         # or None (exact), "hnsw", "ivfpq"
    >>> calibrate(index, descriptors, target=0.95)             # sets nprobe / k_factor; returns the held-out recall
    >>> scores, ids = index.search(queries, 100)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NoReturn

import faiss
import numpy as np

# ANN_KINDS: the approximate index kinds of :func:`build_search_index` (``None`` is exact search); defined in
# camretrieval.constants, importable without FAISS (the command line's choices).
from camretrieval.constants import ANN_KINDS, DEFAULT_ANN_RECALL
from camretrieval.errors import CamRetrievalError

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
HNSW_MAX_EF_SEARCH = 4096  # calibration's ceiling for efSearch
IVF_NPROBE = 32
IVF_MAX_TRAIN = 100_000
IVF_MIN_POINTS_PER_LIST = 39  # FAISS's own k-means warns below 39 training points per centroid
IVF_TRAIN_PER_LIST = 50  # "ivf" trains its k-means on 50 vectors per list (at least IVF_MAX_TRAIN, at most all)
IVF_K_FACTOR = 2  # "ivf" before calibration: re-score the top 2k candidates
PQ_BITS = 8
FAST_SCAN_BITS = 4  # FAISS's fast-scan PQ codes are 4-bit
REFINE_FACTORS = (1, 2, 4, 8)  # the re-scoring depths calibration tries (k_factor: k_factor * k candidates)
# Calibration's cost model for "ivf": one re-scored candidate (a float16 dot product) weighs as much as scanning this
# many fast-scan codes. A rough weight from single-query timings on the 2-core machine of docs/search_scale.md, not a
# documented measurement; re-scoring deeper than 2-4k buys almost nothing there anyway.
REFINE_COST_IN_CODES = 12
CALIBRATION_QUERIES = 500
CONFIDENCE_Z = 1.645  # calibration asks the held-out recall's one-sided 95% lower bound to meet the target
RECALL_K = 100


@dataclass
class Calibration:
    """What :func:`calibrate` chose: the effort set on the index and its measured recall@k on held-out queries."""

    target: float
    recall: float
    effort: dict = field(default_factory=dict)
    queries: int = 0
    k: int = RECALL_K
    lower_bound: float = 1.0  # the recall's one-sided 95% lower confidence bound (>= target)


def _as_matrix(descriptors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise CamRetrievalError(f"descriptors must be a non-empty N x dim matrix, got shape {np.shape(descriptors)}")
    return x


def ivfpq_min_vectors(nbits: int = PQ_BITS) -> int:
    """The fewest vectors :func:`build_search_index` trains an IVF-PQ index on: 4 per PQ centroid (2**nbits)."""
    return 4 * 2**nbits


def ivf_min_vectors() -> int:
    """The fewest vectors an "ivf" index is trained on: 39 per centroid of its 16-centroid (4-bit) PQ, FAISS's own
    k-means minimum."""
    return IVF_MIN_POINTS_PER_LIST * 2**FAST_SCAN_BITS


def check_recall_target(target: float) -> float:
    """``target`` as a float, or a clear error when it is not a recall in (0, 1]."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise CamRetrievalError(f"the recall target must be a number in (0, 1], e.g. 0.95; got {target!r}") from None
    if not 0 < value <= 1:
        raise CamRetrievalError(f"the recall target must be in (0, 1] (a fraction of the true top 100), e.g. 0.95; got {target!r}")
    return value


def _largest_divisor(dim: int, at_most: int) -> int:
    return max(m for m in range(1, max(1, at_most) + 1) if dim % m == 0)


def default_pq_m(dim: int) -> int:
    """PQ subquantizers for ``dim`` dimensions: the largest divisor of ``dim`` that is at most ``dim / 4`` (about 4
    dimensions per 8-bit code, so 128 bytes for a 512-d descriptor, 1/16 of float32)."""
    return _largest_divisor(dim, dim // 4)


def default_fast_scan_m(dim: int) -> int:
    """Fast-scan (4-bit) PQ subquantizers for "ivf": the largest divisor of ``dim`` that is at most ``dim / 2`` (2
    dimensions per 4-bit code: 128 bytes for a 512-d descriptor)."""
    return _largest_divisor(dim, dim // 2)


def default_nlist(n_vectors: int, n_train: int) -> int:
    """IVF lists: about 4 * sqrt(N), at most one per 39 training vectors (what k-means needs), at least 1."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_train // IVF_MIN_POINTS_PER_LIST))


def _training_sample(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    if x.shape[0] <= size:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(x.shape[0], size, replace=False))]


def build_search_index(
    descriptors: np.ndarray,
    kind: str | None = None,
    *,
    float16: bool = False,
    hnsw_m: int = HNSW_M,
    ef_construction: int = HNSW_EF_CONSTRUCTION,
    ef_search: int = HNSW_EF_SEARCH,
    nlist: int | None = None,
    pq_m: int | None = None,
    pq_bits: int = PQ_BITS,
    nprobe: int = IVF_NPROBE,
    max_train: int = IVF_MAX_TRAIN,
    seed: int = 0,
) -> faiss.Index:
    """An inner-product FAISS index holding ``descriptors`` (N x dim, l2-normalised), ids = row numbers, with the
    default search effort (:func:`calibrate` then sets one for a recall target).

    kind None: exact search, ``IndexFlatIP`` (or ``IndexScalarQuantizer`` QT_fp16 with ``float16``: half the memory,
    scores rounded to float16). "ivf": ``index_factory("IVF{nlist},PQ{pq_m}x4fs,Refine(SQfp16)")``, ``nlist``
    default :func:`default_nlist`, k-means on ``IVF_TRAIN_PER_LIST`` vectors per list (at least ``max_train``),
    ``pq_m`` default :func:`default_fast_scan_m`; it re-scores from float16 whatever ``float16`` says, and needs
    :func:`ivf_min_vectors` vectors. "hnsw": ``IndexHNSWFlat`` (``IndexHNSWSQ`` fp16 with ``float16``), ``hnsw_m``
    links per node, ``ef_construction`` / ``ef_search`` candidate lists. "ivfpq": ``IndexIVFPQ``, ``nlist`` lists,
    ``pq_m`` subquantizers of ``pq_bits`` bits (default :func:`default_pq_m`), trained on at most ``max_train`` of
    the descriptors; it needs :func:`ivfpq_min_vectors` vectors, and ``float16`` does not apply.
    """
    x = _as_matrix(descriptors)
    n, dim = x.shape
    if kind is None:
        if float16:
            index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        if float16:
            index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        index = _ivf(x, nlist, pq_m, nprobe, max_train, seed)
    elif kind == "ivfpq":
        if float16:
            raise CamRetrievalError("float16 does not apply to an ivfpq index (its PQ codes are already compressed)")
        index = _ivfpq(x, nlist, pq_m, pq_bits, nprobe, max_train, seed)
    else:
        raise CamRetrievalError(f"unknown search index kind {kind!r}; choose exact (none) or one of: {', '.join(ANN_KINDS)}")
    if not index.is_trained:  # the scalar quantizers: fp16 needs no statistics, but FAISS wants train() called
        index.train(x[: min(n, 1000)])
    index.add(x)
    return index


def _ivf(x: np.ndarray, nlist: int | None, pq_m: int | None, nprobe: int, max_train: int, seed: int) -> faiss.Index:
    n, dim = x.shape
    if n < ivf_min_vectors():
        raise CamRetrievalError(
            f"an ivf index needs at least {ivf_min_vectors()} descriptors to train its product quantizer, got {n}; "
            "use exact search (no --ann, or --ann none) for a collection this small: it is fast at this size"
        )
    pq_m = default_fast_scan_m(dim) if pq_m is None else pq_m
    if pq_m < 1 or dim % pq_m:
        raise CamRetrievalError(f"the PQ subquantizers ({pq_m}) must divide the descriptor dimension ({dim})")
    wanted_lists = round(4 * math.sqrt(n)) if nlist is None else nlist
    train = _training_sample(x, max(max_train, IVF_TRAIN_PER_LIST * wanted_lists), seed)
    nlist = default_nlist(n, len(train)) if nlist is None else nlist
    if not 1 <= nlist <= len(train):
        raise CamRetrievalError(f"nlist must be between 1 and the {len(train)} training vectors, got {nlist}")
    # A flat coarse quantizer: with an HNSW one (IVF{nlist}_HNSW32) recall@100 at 1M reached 0.898 by nprobe 256,
    # against 0.989 (the sweeps of docs/search_scale.md).
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{FAST_SCAN_BITS}fs,Refine(SQfp16)", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    index.train(train)
    ivf.nprobe = min(nprobe, nlist)
    faiss.downcast_index(index).k_factor = IVF_K_FACTOR
    return index


def _ivfpq(x: np.ndarray, nlist: int | None, pq_m: int | None, pq_bits: int, nprobe: int, max_train: int, seed: int) -> faiss.Index:
    n, dim = x.shape
    needed = ivfpq_min_vectors(pq_bits)
    if n < needed:
        raise CamRetrievalError(
            f"an ivfpq index needs at least {needed} descriptors to train its {2**pq_bits}-centroid product "
            f"quantizer, got {n}; use exact search (no --ann) for a collection this small"
        )
    pq_m = default_pq_m(dim) if pq_m is None else pq_m
    if pq_m < 1 or dim % pq_m:
        raise CamRetrievalError(f"the PQ subquantizers ({pq_m}) must divide the descriptor dimension ({dim})")
    train = _training_sample(x, max_train, seed)
    nlist = default_nlist(n, len(train)) if nlist is None else nlist
    if not 1 <= nlist <= len(train):
        raise CamRetrievalError(f"nlist must be between 1 and the {len(train)} training vectors, got {nlist}")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, pq_bits, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.pq.cp.seed = seed
    # our own floor (ivfpq_min_vectors) replaces k-means' warning below 39 points per PQ centroid, printed per subquantizer
    index.pq.cp.min_points_per_centroid = 4
    index.train(train)
    index.nprobe = min(nprobe, nlist)
    return index


def _inverted_lists(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part of an index (itself, or the base of an ``IndexRefine``), None for other kinds."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def set_search_effort(
    index: faiss.Index, *, ef_search: int | None = None, nprobe: int | None = None, k_factor: int | None = None
) -> faiss.Index:
    """Set the search effort of a built or loaded index in place (and return it): ``ef_search`` for HNSW (raised
    to k by FAISS when k is larger), ``nprobe`` for IVF (capped at nlist), ``k_factor`` for "ivf" (it re-scores
    ``k_factor * k`` candidates). A setting the index kind has not got is ignored, so one call can serve any kind;
    exact indexes have none."""
    inner = faiss.downcast_index(index)
    if ef_search is not None and hasattr(inner, "hnsw"):
        if ef_search < 1:
            raise CamRetrievalError(f"efSearch must be at least 1, got {ef_search}")
        inner.hnsw.efSearch = int(ef_search)
    ivf = _inverted_lists(inner)
    if nprobe is not None and ivf is not None:
        if nprobe < 1:
            raise CamRetrievalError(f"nprobe must be at least 1, got {nprobe}")
        ivf.nprobe = int(min(nprobe, ivf.nlist))
    if k_factor is not None and isinstance(inner, faiss.IndexRefine):
        if k_factor < 1:
            raise CamRetrievalError(f"k_factor must be at least 1, got {k_factor}")
        inner.k_factor = float(k_factor)
    return index


def index_kind(index: faiss.Index) -> str:
    """What a (loaded) FAISS index is: "exact", "exact-float16", "ivf", "hnsw", "hnsw-float16", "ivfpq", or its class
    name."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexFlat):
        return "exact"
    if isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        return "exact-float16"
    if isinstance(inner, faiss.IndexRefine) and isinstance(faiss.downcast_index(inner.base_index), faiss.IndexIVFPQFastScan):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSWSQ):
        return "hnsw-float16"
    if isinstance(inner, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVFPQ):
        return "ivfpq"
    return type(inner).__name__


def search_settings(index: faiss.Index) -> dict:
    """The kind and the search/build parameters of an index, for reports and index headers."""
    inner = faiss.downcast_index(index)
    settings: dict = {"kind": index_kind(inner), "n": int(inner.ntotal), "dim": int(inner.d)}
    if hasattr(inner, "hnsw"):
        settings.update(M=int(inner.hnsw.nb_neighbors(1)), ef_construction=int(inner.hnsw.efConstruction),
                        ef_search=int(inner.hnsw.efSearch))
    ivf = _inverted_lists(inner)
    if ivf is not None:
        settings.update(nlist=int(ivf.nlist), nprobe=int(ivf.nprobe))
        pq = faiss.downcast_index(ivf)
        if hasattr(pq, "pq"):
            settings.update(pq_m=int(pq.pq.M), pq_bits=int(pq.pq.nbits))
    if isinstance(inner, faiss.IndexRefine):
        settings.update(k_factor=int(inner.k_factor))
    return settings


def serialize(index: faiss.Index) -> np.ndarray:
    """The index as bytes (a uint8 array) through :func:`faiss.serialize_index`."""
    return faiss.serialize_index(index)


def deserialize(data: np.ndarray | bytes) -> faiss.Index:
    """An index from :func:`serialize`'s bytes, as its own FAISS class (search settings such as efSearch/nprobe/
    k_factor are those it was saved with; :func:`set_search_effort` changes them)."""
    array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data, np.uint8)
    return faiss.deserialize_index(array)  # already its own class; downcasting this temporary again would free it


def recall_at(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int = 100) -> float:
    """Mean over queries of |top-k exact & top-k approximate| / k (rows are queries, best first). The -1 ids FAISS
    returns for results it could not fill count as misses; k larger than the database is not corrected for, so
    pass k <= N."""
    return float(recall_per_query(exact_ids, approx_ids, k).mean())


def recall_per_query(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int = 100) -> np.ndarray:
    """|top-k exact & top-k approximate| / k of each query (:func:`recall_at` is their mean)."""
    exact = np.asarray(exact_ids)[:, :k]
    approx = np.asarray(approx_ids)[:, :k]
    if exact.shape[0] != approx.shape[0]:
        raise CamRetrievalError(f"{exact.shape[0]} exact rows but {approx.shape[0]} approximate rows")
    if k < 1 or exact.shape[0] == 0:
        raise CamRetrievalError("recall needs k >= 1 and at least one query")
    return np.array([len(np.intersect1d(e[e >= 0], a[a >= 0])) for e, a in zip(exact, approx)], np.float64) / k


class HeldOut:
    """Held-out queries drawn from a collection's own descriptors, with their exact top k among the others.

    A database member finds itself at rank 1, and an IVF index always visits its own list, so a member is an easy
    query. Here the ``n_queries`` sampled members are left out of both the exact and the approximate results (a FAISS
    ``IDSelector``): for IVF kinds that is search over the collection without them, i.e. fresh queries from the
    collection's own distribution. An HNSW graph still holds their nodes and walks through them (slightly optimistic;
    benchmarks/search_scale.py compares with queries that are not members)."""

    def __init__(self, descriptors: np.ndarray, k: int = RECALL_K, n_queries: int = CALIBRATION_QUERIES, seed: int = 0,
                 chunk: int = 65_536) -> None:
        x = _as_matrix(descriptors)
        n = x.shape[0]
        if n < 2:
            raise CamRetrievalError(f"held-out recall needs at least 2 descriptors, got {n}")
        count = max(1, min(n_queries, n // 10))
        self.ids = np.sort(np.random.default_rng(seed).choice(n, count, replace=False)).astype(np.int64)
        self.queries = x[self.ids]
        self.k = min(k, n - count)
        self._batch = faiss.IDSelectorBatch(self.ids)  # kept: the selector below points at it
        self.selector = faiss.IDSelectorNot(self._batch)
        self.exact_ids = self._exact_top(x, chunk)

    def _exact_top(self, x: np.ndarray, chunk: int) -> np.ndarray:
        """Exact top k of every query among the descriptors that are not queries, by chunks (no copy of the
        collection in a FAISS flat index)."""
        best_scores = np.full((len(self.ids), 0), -np.inf, np.float32)
        best_ids = np.zeros((len(self.ids), 0), np.int64)
        held = np.zeros(x.shape[0], bool)
        held[self.ids] = True
        for start in range(0, x.shape[0], chunk):
            scores = self.queries @ x[start : start + chunk].T
            scores[:, held[start : start + chunk]] = -np.inf
            ids = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
            scores = np.concatenate([best_scores, scores], axis=1)
            ids = np.concatenate([best_ids, ids], axis=1)
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k] if scores.shape[1] > self.k else np.argsort(-scores, axis=1)
            best_scores = np.take_along_axis(scores, top, axis=1)
            best_ids = np.take_along_axis(ids, top, axis=1)
        return best_ids

    def recall(self, index: faiss.Index) -> float:
        """recall@k of ``index`` (with its current effort) on the held-out queries."""
        return float(self.recalls(index).mean())

    def bounds(self, index: faiss.Index) -> tuple[float, float]:
        """(recall@k, its one-sided 95% lower confidence bound) of ``index`` on queries like these: the lower bound is
        the mean less ``CONFIDENCE_Z`` standard errors of the per-query recalls."""
        recalls = self.recalls(index)
        spread = CONFIDENCE_Z * recalls.std(ddof=1) / math.sqrt(len(recalls)) if len(recalls) > 1 else 0.0
        return float(recalls.mean()), float(recalls.mean() - spread)

    def recalls(self, index: faiss.Index) -> np.ndarray:
        """recall@k of each held-out query, searched by ``index`` with its current effort."""
        inner = faiss.downcast_index(index)
        ivf = _inverted_lists(inner)
        if ivf is not None:
            params = base = faiss.SearchParametersIVF(nprobe=int(ivf.nprobe), sel=self.selector)
            if isinstance(inner, faiss.IndexRefine):  # base stays referenced here until the search is done
                params = faiss.IndexRefineSearchParameters(k_factor=float(inner.k_factor), base_index_params=base)
        elif hasattr(inner, "hnsw"):
            params = faiss.SearchParametersHNSW(efSearch=int(inner.hnsw.efSearch), sel=self.selector)
        else:
            params = faiss.SearchParameters(sel=self.selector)
        _, ids = index.search(self.queries, self.k, params=params)
        return recall_per_query(self.exact_ids, ids, self.k)


def measure_recall(index: faiss.Index, descriptors: np.ndarray, k: int = RECALL_K, n_queries: int = 100, seed: int = 0) -> float:
    """recall@k of ``index`` against exact inner-product search over ``descriptors`` (the vectors it holds), with a
    random ``n_queries`` of them (at most a tenth) as held-out queries, left out of both result lists
    (:class:`HeldOut`). 1.0 for a one-vector index."""
    x = _as_matrix(descriptors)
    if x.shape[0] != index.ntotal:
        raise CamRetrievalError(f"the index holds {index.ntotal} vectors, but {x.shape[0]} descriptors were given")
    if x.shape[0] < 2:
        return 1.0
    return HeldOut(x, k, n_queries, seed).recall(index)


def calibrate(
    index: faiss.Index, descriptors: np.ndarray, target: float = DEFAULT_ANN_RECALL, k: int = RECALL_K,
    n_queries: int = CALIBRATION_QUERIES, seed: int = 0,
) -> Calibration:
    """Set the cheapest search effort of ``index`` whose recall@k on held-out queries (:class:`HeldOut`: ``n_queries``
    of the ``descriptors`` it holds, at most a tenth) meets ``target`` with 95% confidence (its one-sided lower bound
    does: on 500 queries a mean about 0.004 above the target), and return it with the measured recall.

    "ivf": for each re-scoring depth in ``REFINE_FACTORS`` the fewest lists (nprobe) that reach the target, then the
    pair with the fewest codes scanned + ``REFINE_COST_IN_CODES`` per re-scored candidate. "ivfpq": the fewest lists.
    "hnsw": the smallest efSearch (at most ``HNSW_MAX_EF_SEARCH``). A target even the most effort misses is an error
    that says what it reaches. An exact index needs no calibration (recall 1)."""
    target = check_recall_target(target)
    x = _as_matrix(descriptors)
    if x.shape[0] != index.ntotal:
        raise CamRetrievalError(f"the index holds {index.ntotal} vectors, but {x.shape[0]} descriptors were given")
    kind = index_kind(index)
    if x.shape[0] < 2 or kind in ("exact", "exact-float16"):
        return Calibration(target, 1.0, {}, 0, k)
    held = HeldOut(x, k, n_queries, seed)
    inner = faiss.downcast_index(index)
    measured: dict[tuple, tuple[float, float]] = {}

    def bounds(**effort) -> tuple[float, float]:
        """(mean, lower bound) of the held-out recall with this effort."""
        key = tuple(sorted(effort.items()))
        if key not in measured:
            set_search_effort(index, **effort)
            measured[key] = held.bounds(index)
        return measured[key]

    def meets(**effort) -> bool:
        return bounds(**effort)[1] >= target

    if hasattr(inner, "hnsw"):
        ef = _smallest(lambda value: meets(ef_search=value), max(16, held.k), HNSW_MAX_EF_SEARCH)
        if ef is None:
            _unreachable(kind, bounds(ef_search=HNSW_MAX_EF_SEARCH)[0], target, f"efSearch {HNSW_MAX_EF_SEARCH}")
        effort = {"ef_search": ef}
    else:
        ivf = _inverted_lists(inner)
        if ivf is None:
            raise CamRetrievalError(f"cannot calibrate a {kind} index: it has no search effort to set")
        nlist = int(ivf.nlist)
        refines = isinstance(inner, faiss.IndexRefine)
        scanned = _codes_scanned(ivf, held.queries)
        best_cost, effort, fewest = math.inf, None, 1
        for factor in sorted(REFINE_FACTORS, reverse=True) if refines else [None]:  # deepest re-scoring first
            extra = {"k_factor": factor} if refines else {}
            rescoring = REFINE_COST_IN_CODES * (factor or 0) * held.k
            # only as many lists as still cost less than the cheapest setting so far are worth trying, and no fewer
            # than that setting's: less re-scoring needs at least as many lists
            most = min(nlist, int(np.searchsorted(scanned, best_cost - rescoring, "left")))
            if most < fewest:
                continue
            nprobe = _smallest(lambda value, extra=extra: meets(nprobe=value, **extra), fewest, most)
            if nprobe is not None:
                best_cost, effort, fewest = scanned[nprobe - 1] + rescoring, {"nprobe": nprobe, **extra}, nprobe
        if effort is None:
            most_effort = {"nprobe": nlist} | ({"k_factor": max(REFINE_FACTORS)} if refines else {})
            _unreachable(kind, bounds(**most_effort)[0], target, ", ".join(f"{key} {value}" for key, value in most_effort.items()))
    recall, lower = bounds(**effort)
    set_search_effort(index, **effort)
    return Calibration(target, recall, effort, len(held.ids), held.k, lower)


def _smallest(meets, low: int, high: int) -> int | None:
    """The smallest integer in [low, high] for which ``meets`` holds, assuming it is monotone: doubling from ``low``,
    then bisection; None when even ``high`` fails."""
    failed, value = low - 1, low
    while not meets(value):
        if value >= high:
            return None
        failed, value = value, min(2 * value, high)
    while value - failed > 1:  # meets(value), not meets(failed)
        middle = (failed + value) // 2
        failed, value = (failed, middle) if meets(middle) else (middle, value)
    return value


def _unreachable(kind: str, best: float, target: float, most: str) -> NoReturn:
    raise CamRetrievalError(
        f"the {kind} index reaches recall@100 {best:.3f} at most on this collection ({most}), short of the target "
        f"{target}: ask for {math.floor(best * 100) / 100:.2f} or less, or use "
        + ("--ann ivf (it re-scores its candidates exactly) or exact search" if kind == "ivfpq" else "exact search (--ann none)")
    )


def _codes_scanned(ivf: faiss.IndexIVF, queries: np.ndarray) -> np.ndarray:
    """Mean codes an IVF search of ``queries`` scans with nprobe = 1 .. nlist (entry nprobe - 1)."""
    _, lists = ivf.quantizer.search(queries, int(ivf.nlist))
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.float64)
    return np.cumsum(sizes[np.maximum(lists, 0)], axis=1).mean(axis=0)
