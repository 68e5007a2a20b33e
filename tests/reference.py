"""An independent, plain NumPy computation of METHOD.md sections 1-3 for one image, written from the formulas with
explicit loops over classes and channels (slow on purpose: it is the oracle the batched code is checked against)."""

from __future__ import annotations

import math

import numpy as np


def reference_class_vectors(X: np.ndarray, A: np.ndarray, W: np.ndarray, b: np.ndarray, n_classes: int):
    """X: K' x H x W features, A: K x H x W CAM activations (same resolution), W: C x K, b: C.
    Returns (classes best first, class vectors n_classes x K', each l2-normalised)."""
    K, H, Wd = A.shape
    gap = np.array([A[k].sum() / (H * Wd) for k in range(K)])
    logits = W @ gap + b
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    classes = list(np.argsort(-probs, kind="stable")[:n_classes])

    n_channels = X.shape[0]
    q = [np.count_nonzero(X[k] > 0) / (X.shape[1] * X.shape[2]) for k in range(n_channels)]  # Eq. 2
    total = sum(q)
    cw = [math.log(total / q[k]) if q[k] > 0 else 0.0 for k in range(n_channels)]  # Eq. 3

    vectors = []
    for c in classes:
        cam = np.zeros((H, Wd))
        for k in range(K):  # Eq. 1
            cam += W[c, k] * A[k]
        peak = cam.max()
        cam = np.maximum(cam / peak, 0) if peak > 0 else np.zeros_like(cam)
        f = np.array([cw[k] * (X[k] * cam).sum() for k in range(n_channels)])  # Eq. 4
        norm = np.sqrt((f**2).sum())
        vectors.append(f / norm if norm > 0 else f)
    return classes, np.array(vectors)


def reference_descriptor(vectors: np.ndarray, mean: np.ndarray, components: np.ndarray, eigenvalues: np.ndarray):
    """Section 3: each class vector PCA-whitened and l2-normalised, summed, l2-normalised."""
    total = np.zeros(components.shape[0])
    for f in vectors:
        whitened = np.array([(f - mean) @ components[d] / math.sqrt(eigenvalues[d]) for d in range(len(components))])
        total += whitened / np.linalg.norm(whitened)
    return total / np.linalg.norm(total)


# --- Baselines (METHOD.md section 8), one image X: K x H x W, plain loops over channels and cells. ---


def reference_sum(X: np.ndarray) -> np.ndarray:
    return np.array([sum(X[k, i, j] for i in range(X.shape[1]) for j in range(X.shape[2])) for k in range(len(X))])


def reference_crow(X: np.ndarray) -> np.ndarray:
    K, H, Wd = X.shape
    s_prime = np.array([[sum(X[k, i, j] for k in range(K)) for j in range(Wd)] for i in range(H)])
    S = np.sqrt(s_prime / math.sqrt((s_prime**2).sum()))
    q = [np.count_nonzero(X[k] > 0) / (H * Wd) for k in range(K)]
    cw = [math.log(sum(q) / q[k]) if q[k] > 0 else 0.0 for k in range(K)]
    return np.array([cw[k] * sum(X[k, i, j] * S[i, j] for i in range(H) for j in range(Wd)) for k in range(K)])


def reference_mac(X: np.ndarray) -> np.ndarray:
    return np.array([max(X[k].ravel()) for k in range(len(X))])


def reference_gem(X: np.ndarray, p: float = 3.0) -> np.ndarray:
    return np.array([(sum(v**p for v in X[k].ravel()) / X[k].size) ** (1 / p) for k in range(len(X))])


def reference_listed_class_vectors(X: np.ndarray, A: np.ndarray, W: np.ndarray, classes) -> np.ndarray:
    """Section 4.3's fixed list: the class vectors (Eq. 1-4, each l2-normalised) of exactly the given ``classes``, in
    their order, whatever the image's own scores. X: K' x H x W, A: K x H x W, W: C x K."""
    K, H, Wd = A.shape
    n_channels = X.shape[0]
    q = [np.count_nonzero(X[k] > 0) / (X.shape[1] * X.shape[2]) for k in range(n_channels)]  # Eq. 2
    cw = [math.log(sum(q) / q[k]) if q[k] > 0 else 0.0 for k in range(n_channels)]  # Eq. 3
    vectors = []
    for c in classes:
        cam = sum(W[c, k] * A[k] for k in range(K))  # Eq. 1
        peak = cam.max()
        cam = np.maximum(cam / peak, 0) if peak > 0 else np.zeros_like(cam)
        f = np.array([cw[k] * (X[k] * cam).sum() for k in range(n_channels)])  # Eq. 4
        norm = np.sqrt((f**2).sum())
        vectors.append(f / norm if norm > 0 else f)
    return np.array(vectors)


def reference_class_list(scores: np.ndarray, top: int, length: int) -> tuple[list[int], list[int]]:
    """Section 4.3's list, counted plainly: each image's ``top`` best-scoring classes; the ``length`` classes met most
    often, ties to the smaller sum of ranks (0 = best), then to the smaller index. Returns (classes, counts)."""
    count: dict[int, int] = {}
    rank_sum: dict[int, int] = {}
    for row in scores:
        best = sorted(range(len(row)), key=lambda c: (-row[c], c))[:top]
        for rank, c in enumerate(best):
            count[c] = count.get(c, 0) + 1
            rank_sum[c] = rank_sum.get(c, 0) + rank
    kept = sorted(count, key=lambda c: (-count[c], rank_sum[c], c))[:length]
    return kept, [count[c] for c in kept]
