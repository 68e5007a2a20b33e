"""Query expansion (METHOD.md section 5): average QE as the paper uses it, and alpha-QE (Radenovic et al., "Fine-tuning
CNN image retrieval with no human annotation", TPAMI 2018) as an option.

Average QE: the new query is ``l2(q + sum_{i<=K} d_i)`` over the descriptors of the top-K results, and the database
is searched again with it. alpha-QE weights each neighbour by its similarity to the query raised to alpha,
``l2(q + sum_i max(q . d_i, 0)^alpha d_i)`` (the query itself has weight 1 = (q . q)^alpha); alpha = 0 is average QE.
Negative similarities get weight 0 under alpha-QE: a power of a negative number is not a weight.
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
    return np.clip(similarities, 0.0, None) ** alpha


def expanded_query(query: np.ndarray, neighbours: np.ndarray, alpha: float = 0.0) -> np.ndarray:
    """The expanded query: ``l2(q + sum_i w_i d_i)`` (see :func:`expansion_weights`), float32 (dim,).

    ``query`` (dim,) and ``neighbours`` (K x dim) are l2-normalised descriptors; K = 0 returns the query."""
    query = np.asarray(query, dtype=np.float64).reshape(-1)
    neighbours = np.asarray(neighbours, dtype=np.float64).reshape(-1, query.size)
    total = query + expansion_weights(query, neighbours, alpha) @ neighbours
    norm = np.linalg.norm(total)
    # q + sum of unit vectors is 0 only if the neighbours exactly cancel the query: keep the query then.
    return (total / norm if norm > 1e-12 else query).astype(np.float32)
