"""Query expansion (METHOD.md section 5): average QE as the paper uses it, and alpha-QE (Radenovic et al., "Fine-tuning
CNN image retrieval with no human annotation", TPAMI 2018) as an option.

Average QE: the new query is ``l2(q + sum_{i<=K} d_i)`` over the descriptors of the top-K results, and the database
is searched again with it. alpha-QE weights each neighbour by its similarity to the query raised to alpha,
``l2(q + sum_i max(q . d_i, 0)^alpha d_i)`` (the query itself has weight 1 = (q . q)^alpha); alpha = 0 is average QE.
Negative similarities get weight 0 under alpha-QE: a power of a negative number is not a weight.

Gated QE (``search --qe K --qe-gate``, docs/refinement.md "QE that knows when to help"): QE helps when the first
results are right (ETH-80 objects: .743 -> .776 with K = 2) and hurts when they are not (cluttered box queries: .199
-> .154). The gate keeps only the results that are k-reciprocal neighbours of the query (Qin et al., CVPR 2011;
Zhong et al., CVPR 2017): result d_i is used when the query would rank among d_i's own k nearest database images,
``q . d_i >= the k-th largest d_i . d_j`` over the other images j. A right result usually is one; a wrong one, close to
the query only because the query is close to everything of its kind, usually is not. No threshold on the similarity
itself, whose scale differs between collections, backbones and query boxes.
"""

from __future__ import annotations

import numpy as np

from camretrieval.errors import CamRetrievalError


def expansion_weights(query: np.ndarray, neighbours: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """The weight of each neighbour (K x dim) in the expanded query: 1 (average QE, ``alpha`` 0) or
    ``max(q . d_i, 0)^alpha``."""
    if alpha < 0 or not np.isfinite(alpha):
        raise CamRetrievalError(f"the alpha of alpha-QE is a power >= 0, got {alpha}")
    if alpha == 0:
        return np.ones(len(neighbours), dtype=np.float64)
    similarities = np.asarray(neighbours, dtype=np.float64) @ np.asarray(query, dtype=np.float64)
    # at most 1 between unit vectors; rounding above it would make a large power overflow
    return np.clip(similarities, 0.0, 1.0) ** alpha


def expanded_query(query: np.ndarray, neighbours: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """The expanded query: ``l2(q + sum_i w_i d_i)`` (see :func:`expansion_weights`), float32 (dim,).

    ``query`` (dim,) and ``neighbours`` (K x dim) are l2-normalised descriptors; K = 0 returns the query."""
    query = np.asarray(query, dtype=np.float64).reshape(-1)
    neighbours = np.asarray(neighbours, dtype=np.float64).reshape(-1, query.size)
    total = query + expansion_weights(query, neighbours, alpha) @ neighbours
    norm = np.linalg.norm(total)
    # q + sum of unit vectors is 0 only if the neighbours exactly cancel the query: keep the query then.
    return (total / norm if norm > 1e-12 else query).astype(np.float32)


def reciprocal_neighbours(query_similarities: np.ndarray, neighbour_similarities: np.ndarray, k: int) -> np.ndarray:
    """Which results are k-reciprocal neighbours of the query (the gate of gated QE): result i, with similarity
    ``query_similarities[i]`` to the query and ``neighbour_similarities[i]`` (M x N, -inf where an image is not a
    candidate, itself included) to the database, is one when ``q . d_i >= `` the k-th largest of its row. Returns M
    booleans. A row with fewer than k candidates keeps its result."""
    if k < 1:
        raise CamRetrievalError(f"the reciprocal neighbourhood k must be at least 1, got {k}")
    rows = np.asarray(neighbour_similarities, dtype=np.float64)
    query_similarities = np.asarray(query_similarities, dtype=np.float64).reshape(-1)
    if rows.ndim != 2 or len(rows) != len(query_similarities):
        raise CamRetrievalError(f"{len(query_similarities)} results with similarity rows of shape {rows.shape}")
    if rows.shape[1] < k:
        return np.ones(len(rows), dtype=bool)
    kth = np.partition(rows, rows.shape[1] - k, axis=1)[:, rows.shape[1] - k]
    return query_similarities >= kth
