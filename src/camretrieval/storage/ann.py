"""Search indexes for large collections: exact inner-product search (float32, or float16 storage) by default, and
approximate FAISS indexes (HNSW graph, IVF-PQ compressed codes) for collections where a full scan is too slow or
too big, with recall@k against exact search to say what the approximation costs.

Descriptors are l2-normalised, so every index here ranks by inner product (= cosine). All indexes are FAISS's own
classes; they are stored with :func:`faiss.serialize_index` (see :func:`serialize` / :func:`deserialize`), never
pickled. The search effort (HNSW ``efSearch``, IVF ``nprobe``) is saved with the index; :func:`set_search_effort`
changes it on a built or loaded one.

    >>> index = build_search_index(descriptors, "hnsw")        # or None (exact), "ivfpq"; float16=True: half memory
    >>> scores, ids = index.search(queries, 100)
    >>> measure_recall(index, descriptors, k=100)              # mean |top-100 approx & top-100 exact| / 100
"""

from __future__ import annotations

import math

import faiss
import numpy as np

# ANN_KINDS: the approximate index kinds of :func:`build_search_index` (``None`` is exact search); defined in
# camretrieval.constants, importable without FAISS (the command line's choices).
from camretrieval.constants import ANN_KINDS
from camretrieval.errors import CamRetrievalError

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_NPROBE = 32
IVF_MAX_TRAIN = 100_000
IVF_MIN_POINTS_PER_LIST = 39  # FAISS's own k-means warns below 39 training points per centroid
PQ_BITS = 8


def _as_matrix(descriptors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise CamRetrievalError(f"descriptors must be a non-empty N x dim matrix, got shape {np.shape(descriptors)}")
    return x


def ivfpq_min_vectors(nbits: int = PQ_BITS) -> int:
    """The fewest vectors :func:`build_search_index` trains an IVF-PQ index on: 4 per PQ centroid (2**nbits)."""
    return 4 * 2**nbits


def default_pq_m(dim: int) -> int:
    """PQ subquantizers for ``dim`` dimensions: the largest divisor of ``dim`` that is at most ``dim / 4`` (about 4
    dimensions per 8-bit code, so 128 bytes for a 512-d descriptor, 1/16 of float32). On 100k synthetic 512-d
    descriptors (benchmarks/search_scale.py) dim / 8 lost a further 0.12 of recall@100 (0.69 against 0.81)."""
    target = max(1, dim // 4)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def default_nlist(n_vectors: int, n_train: int) -> int:
    """IVF lists: about 4 * sqrt(N), at most one per 39 training vectors (what k-means needs), at least 1."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_train // IVF_MIN_POINTS_PER_LIST))


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
    """An inner-product FAISS index holding ``descriptors`` (N x dim, l2-normalised), ids = row numbers.

    kind None: exact search, ``IndexFlatIP`` (or ``IndexScalarQuantizer`` QT_fp16 with ``float16``: half the memory,
    scores rounded to float16). "hnsw": ``IndexHNSWFlat`` (``IndexHNSWSQ`` fp16 with ``float16``), ``hnsw_m`` links
    per node, ``ef_construction`` / ``ef_search`` candidate lists. "ivfpq": ``IndexIVFPQ``, ``nlist`` inverted lists
    (default :func:`default_nlist`), ``pq_m`` subquantizers of ``pq_bits`` bits (default :func:`default_pq_m`),
    ``nprobe`` lists visited per query, trained on at most ``max_train`` of the descriptors (a random sample);
    it needs :func:`ivfpq_min_vectors` vectors, and ``float16`` does not apply (its codes are already compressed).
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
    if n > max_train:
        train = x[np.sort(np.random.default_rng(seed).choice(n, max_train, replace=False))]
    else:
        train = x
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


def set_search_effort(index: faiss.Index, *, ef_search: int | None = None, nprobe: int | None = None) -> faiss.Index:
    """Set the search effort of a built or loaded index in place (and return it): ``ef_search`` for HNSW (raised
    to k by FAISS when k is larger), ``nprobe`` for IVF (capped at nlist). A setting the index kind has not got is
    ignored, so one call can serve any kind; exact indexes have none."""
    inner = faiss.downcast_index(index)
    if ef_search is not None and hasattr(inner, "hnsw"):
        if ef_search < 1:
            raise CamRetrievalError(f"efSearch must be at least 1, got {ef_search}")
        inner.hnsw.efSearch = int(ef_search)
    if nprobe is not None and hasattr(inner, "nprobe"):
        if nprobe < 1:
            raise CamRetrievalError(f"nprobe must be at least 1, got {nprobe}")
        inner.nprobe = int(min(nprobe, inner.nlist))
    return index


def index_kind(index: faiss.Index) -> str:
    """What a (loaded) FAISS index is: "exact", "exact-float16", "hnsw", "hnsw-float16", "ivfpq", or its class name."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexFlat):
        return "exact"
    if isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype == faiss.ScalarQuantizer.QT_fp16:
        return "exact-float16"
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
    if isinstance(inner, faiss.IndexIVFPQ):
        settings.update(nlist=int(inner.nlist), nprobe=int(inner.nprobe), pq_m=int(inner.pq.M), pq_bits=int(inner.pq.nbits))
    return settings


def serialize(index: faiss.Index) -> np.ndarray:
    """The index as bytes (a uint8 array) through :func:`faiss.serialize_index`."""
    return faiss.serialize_index(index)


def deserialize(data: np.ndarray | bytes) -> faiss.Index:
    """An index from :func:`serialize`'s bytes, as its own FAISS class (search settings such as efSearch/nprobe
    are those it was saved with; :func:`set_search_effort` changes them)."""
    array = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data, np.uint8)
    return faiss.deserialize_index(array)  # already its own class; downcasting this temporary again would free it


def recall_at(exact_ids: np.ndarray, approx_ids: np.ndarray, k: int = 100) -> float:
    """Mean over queries of |top-k exact & top-k approximate| / k (rows are queries, best first). The -1 ids FAISS
    returns for results it could not fill count as misses; k larger than the database is not corrected for, so
    pass k <= N."""
    exact = np.asarray(exact_ids)[:, :k]
    approx = np.asarray(approx_ids)[:, :k]
    if exact.shape[0] != approx.shape[0]:
        raise CamRetrievalError(f"{exact.shape[0]} exact rows but {approx.shape[0]} approximate rows")
    if k < 1 or exact.shape[0] == 0:
        raise CamRetrievalError("recall needs k >= 1 and at least one query")
    hits = [len(np.intersect1d(e[e >= 0], a[a >= 0])) for e, a in zip(exact, approx)]
    return float(np.mean(hits) / k)


def measure_recall(index: faiss.Index, descriptors: np.ndarray, k: int = 100, n_queries: int = 100, seed: int = 0) -> float:
    """recall@k of ``index`` against exact inner-product search over ``descriptors`` (the vectors it holds), with a
    random sample of ``n_queries`` of them as queries (each finds itself in both lists)."""
    x = _as_matrix(descriptors)
    if x.shape[0] != index.ntotal:
        raise CamRetrievalError(f"the index holds {index.ntotal} vectors, but {x.shape[0]} descriptors were given")
    k = min(k, x.shape[0])
    rng = np.random.default_rng(seed)
    queries = x[np.sort(rng.choice(x.shape[0], min(n_queries, x.shape[0]), replace=False))]
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, exact_ids = exact.search(queries, k)
    _, approx_ids = index.search(queries, k)
    return recall_at(exact_ids, approx_ids, k)
