"""Retrieval metrics: average precision as the official Oxford ``compute_ap`` computes it (trapezoid rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def average_precision(positive_ranks: Sequence[int] | np.ndarray, n_positives: int) -> float:
    """AP from the 0-based ranks of the positives in a ranked list from which junk images were removed.

    The trapezoid rule of the official Oxford ``compute_ap`` (as in revisitop): each positive adds the mean of the
    precision just before and at its rank, times one recall step ``1 / n_positives``.
    """
    if n_positives == 0:
        return 0.0
    ranks = np.sort(np.asarray(positive_ranks, dtype=np.float64))
    found = np.arange(len(ranks), dtype=np.float64)
    precision_before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1.0))
    precision_at = (found + 1) / (ranks + 1)
    return float(((precision_before + precision_at) / 2).sum() / n_positives)


def labels_mean_average_precision(similarity: np.ndarray, labels: Sequence[str], query_ids: Sequence[int]) -> tuple[float, np.ndarray]:
    """mAP of queries that are also database items: each query against all others (itself excluded), positives
    the items with the same label. similarity: Q x N (query rows, database columns); query_ids: each query's
    database index. Returns (mAP, per-query AP)."""
    labels = np.asarray(labels)
    aps = []
    for row, query_id in zip(similarity, query_ids):
        order = np.argsort(-row, kind="stable")
        order = order[order != query_id]
        relevant = labels[order] == labels[query_id]
        aps.append(average_precision(np.flatnonzero(relevant), int(relevant.sum())))
    aps = np.asarray(aps)
    return float(aps.mean()) if len(aps) else 0.0, aps
