"""Retrieval metrics: average precision as the official Oxford ``compute_ap`` computes it (trapezoid rule), the
revisitop ``compute_map`` protocol (mAP and mP@k with junk images removed), the revisited Easy/Medium/Hard
setups of ROxford/RParis, the UKBench N-S score, and :func:`evaluate`, one entry point for a loaded
:class:`~camretrieval.evaluation.datasets.RetrievalDataset`.

Rankings follow revisitop's convention throughout: ``ranks`` is an integer array of shape
(database size or a shorter list) x (number of queries), column ``i`` holding the database indices returned for
query ``i``, best first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from camretrieval.errors import CamRetrievalError

if TYPE_CHECKING:  # for annotations only: importing the metrics must not import the loaders (and torch)
    from camretrieval.evaluation.datasets import RetrievalDataset


class EvaluationError(CamRetrievalError):
    """Rankings, similarities or ground truth that cannot be evaluated together."""


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


def _index_array(values: Any, what: str) -> np.ndarray:
    """Ground-truth indices as a sorted, duplicate-free int64 array (None or a missing list is empty)."""
    if values is None:
        return np.empty(0, dtype=np.int64)
    array = np.asarray(values).ravel()
    if array.size == 0:
        return np.empty(0, dtype=np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise EvaluationError(f"ground-truth '{what}' must hold database indices (integers), got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(array == np.round(array)):
        raise EvaluationError(f"ground-truth '{what}' must hold whole database indices, got fractions")
    return np.unique(array.astype(np.int64))


def _check_ranks(ranks: Any, n_queries: int) -> np.ndarray:
    """Validate a revisitop-style ranking (database x queries) and return it as an integer array."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise EvaluationError(
            f"ranks must be a 2-D array (database x queries, revisitop's convention), got shape {ranks.shape}"
        )
    if not np.issubdtype(ranks.dtype, np.integer):
        raise EvaluationError(
            f"ranks must hold integer database indices, got dtype {ranks.dtype}; for a similarity matrix use "
            "evaluate(), or rank it first with np.argsort(-similarity, axis=1).T"
        )
    if ranks.shape[1] != n_queries:
        hint = " (transpose it: columns are queries)" if ranks.shape[0] == n_queries else ""
        raise EvaluationError(
            f"ranks has {ranks.shape[1]} columns but the ground truth has {n_queries} queries{hint}"
        )
    if ranks.size and ranks.min() < 0:
        raise EvaluationError("ranks holds negative database indices; every entry must be an index >= 0")
    return ranks.astype(np.int64, copy=False)


def _check_no_repeats(column: np.ndarray, query: int) -> None:
    # A repeated database index would count a positive twice (AP above 1) or shift every later rank.
    if column.size and (np.bincount(column) > 1).any():
        repeated = int(np.flatnonzero(np.bincount(column) > 1)[0])
        raise EvaluationError(
            f"the ranking of query {query} lists database image {repeated} more than once; each column of ranks "
            "must be a ranking without repeats (e.g. from np.argsort)"
        )


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP and mean precision at ``kappas`` of rankings against ground truth, as revisitop's ``compute_map``.

    ranks: database x queries array of database indices, best first (column ``i`` is query ``i``'s ranking; it may
    be shorter than the database, positives missing from it then count as never found). gnd: one mapping per
    query with ``'ok'`` (the positives) and optionally ``'junk'`` (removed from the ranking before scoring, e.g.
    the query itself). A query without positives (empty or missing ``'ok'``) gets AP and P@k NaN and is left out
    of the means, which are divided by ``nq - nempty`` as in revisitop.

    Returns (map, aps, pr, prs): the mean AP, per-query APs (nq,), mean precision at each kappa (len(kappas),) and
    per-query precisions (nq, len(kappas)). P@k follows revisitop: with 1-based junk-free positive positions
    ``pos``, ``kq = min(max(pos), k)`` and ``P@k = #(pos <= kq) / kq``.

    One deliberate difference: duplicate indices inside ``'ok'`` are counted once (as the official Oxford
    ``compute_ap``, which uses sets), where revisitop's ``len(ok)`` would count them twice and cap AP below 1.
    """
    nq = len(gnd)
    ranks = _check_ranks(ranks, nq)
    kappas = [int(k) for k in kappas]
    if any(k < 1 for k in kappas):
        raise EvaluationError(f"kappas must be positive cut-offs (e.g. 1, 5, 10), got {kappas}")
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in range(nq):
        positives = _index_array(gnd[i].get("ok"), "ok")
        if positives.size == 0:
            aps[i] = np.nan
            prs[i, :] = np.nan
            nempty += 1
            continue
        junk = _index_array(gnd[i].get("junk"), "junk")
        column = ranks[:, i]
        _check_no_repeats(column, i)
        # 0-based positions, in the ranking, of the positives and of the junk images (both ascending)
        pos = np.flatnonzero(np.isin(column, positives))
        junk_pos = np.flatnonzero(np.isin(column, junk))
        # Removing junk: each positive moves up by the number of junk images strictly before it (an image listed
        # as both ok and junk stays a positive, as in revisitop).
        pos = pos - np.searchsorted(junk_pos, pos, side="left")
        aps[i] = average_precision(pos, positives.size)
        if pos.size == 0:
            continue  # no positive in a truncated ranking: AP 0 and P@k 0 (revisitop would fail on max([]))
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), k)
            prs[i, j] = np.count_nonzero(pos1 <= kq) / kq
    scored = nq - nempty
    if scored == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(np.nansum(aps) / scored), aps, np.nansum(prs, axis=0) / scored, prs


def _precision_keys(kappas: Sequence[int], pr: np.ndarray, suffix: str = "") -> dict[str, float]:
    return {f"mp@{int(k)}{suffix}": float(value) for k, value in zip(kappas, pr)}


def classic_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """The classic Oxford5k/Paris6k protocol (also used for label groups and Holidays): positives ``'ok'``
    (good + ok), ``'junk'`` images ignored (removed from the ranking). Returns ``{"map", "aps", "mp@k"...}``."""
    mean_ap, aps, pr, _ = compute_map(ranks, gnd, kappas)
    return {"map": mean_ap, "aps": aps, **_precision_keys(kappas, pr)}


def _concat(entry: Mapping[str, Any], *keys: str) -> np.ndarray:
    return np.concatenate([np.asarray(entry.get(key, []), dtype=np.int64).ravel() for key in keys])


def revisited_setups(gnd: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The three revisitop setups of a revisited ground truth (``'easy'``, ``'hard'``, ``'junk'`` per query):
    Easy (ok = easy; junk = junk + hard), Medium (ok = easy + hard; junk = junk), Hard (ok = hard; junk = junk +
    easy)."""
    for i, entry in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in entry]
        if missing:
            raise EvaluationError(
                f"query {i} of the ground truth has no {', '.join(missing)}: the revisited protocol needs 'easy', "
                "'hard' and 'junk' lists (gnd_roxford5k.pkl / gnd_rparis6k.pkl); for 'ok'/'junk' use classic_map"
            )
    return {
        "easy": [{"ok": _concat(g, "easy"), "junk": _concat(g, "junk", "hard")} for g in gnd],
        "medium": [{"ok": _concat(g, "easy", "hard"), "junk": _concat(g, "junk")} for g in gnd],
        "hard": [{"ok": _concat(g, "hard"), "junk": _concat(g, "junk", "easy")} for g in gnd],
    }


def revisited_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """The revisited ROxford/RParis protocol: mAP and mP@k in the Easy, Medium and Hard setups.

    Returns ``map_easy``, ``map_medium``, ``map_hard``, ``mp@<k>_easy`` etc. (fractions, not percent) and the
    per-query APs ``aps_easy``, ``aps_medium``, ``aps_hard`` (NaN for a query without positives in that setup).
    """
    result: dict[str, Any] = {}
    for setup, setup_gnd in revisited_setups(gnd).items():
        mean_ap, aps, pr, _ = compute_map(ranks, setup_gnd, kappas)
        result[f"map_{setup}"] = mean_ap
        result[f"aps_{setup}"] = aps
        result.update(_precision_keys(kappas, pr, f"_{setup}"))
    return result


def ukbench_score(ranks: np.ndarray, groups: Sequence[int] | np.ndarray | None = None,
                  query_ids: Sequence[int] | np.ndarray | None = None) -> float:
    """UKBench N-S score: the mean over queries of how many of the query's group (4 images, itself included)
    are in its top 4 (4.0 is perfect).

    ranks: database x queries (at least 4 rows). groups: each database image's group id (default: index // 4,
    the UKBench numbering); query_ids: each query's database index (default: query ``i`` is image ``i``).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] < 4:
        raise EvaluationError(
            f"the N-S score needs rankings of at least 4 images per query (database x queries), got shape {ranks.shape}"
        )
    ranks = _check_ranks(ranks, ranks.shape[1])
    query_ids = np.arange(ranks.shape[1]) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    if query_ids.shape != (ranks.shape[1],):
        raise EvaluationError(f"query_ids has {query_ids.size} entries for {ranks.shape[1]} queries")
    top = ranks[:4]
    if groups is None:
        hits = top // 4 == query_ids // 4
    else:
        groups = np.asarray(groups)
        if top.max(initial=0) >= len(groups) or query_ids.max(initial=0) >= len(groups):
            raise EvaluationError(f"ranks or query_ids point past the {len(groups)} database images of groups")
        hits = groups[top] == groups[query_ids]
    return float(hits.sum(axis=0).mean()) if ranks.shape[1] else float("nan")


def ranks_from_similarity(similarity: np.ndarray) -> np.ndarray:
    """Queries x database similarities to revisitop rankings (database x queries, most similar first; ties keep
    database order)."""
    similarity = np.asarray(similarity)
    if similarity.ndim != 2:
        raise EvaluationError(f"similarity must be a 2-D array (queries x database), got shape {similarity.shape}")
    return np.argsort(-similarity, axis=1, kind="stable").T


def evaluate(
    dataset: RetrievalDataset, similarity_or_ranks: np.ndarray, kappas: Sequence[int] = (1, 5, 10)
) -> dict[str, Any]:
    """Score retrieval results on a loaded dataset with its own protocol.

    similarity_or_ranks: a floating-point similarity matrix, queries x database (higher is more similar), or an
    integer ranking, database x queries (revisitop's convention; may be shorter than the database). Queries and
    database images are in the order of ``dataset.queries`` and ``dataset.images``.

    Returns ``"map"`` and ``"aps"`` (per-query AP, NaN where a query has no positives) and ``"mp@<k>"``, plus
    ``"query_names"``; for revisited sets also ``map_easy``/``map_medium``/``map_hard`` with their ``aps_*`` and
    ``mp@<k>_*`` (``"map"`` is then the Medium setup, the number usually quoted); for UKBench ``"ns_score"``.
    """
    values = np.asarray(similarity_or_ranks)
    n_queries, n_images = len(dataset.queries), len(dataset.images)
    if np.issubdtype(values.dtype, np.floating):
        if values.shape != (n_queries, n_images):
            raise EvaluationError(
                f"similarity has shape {values.shape}, expected (queries, database images) = ({n_queries}, "
                f"{n_images}) for {dataset.name}"
            )
        ranks = ranks_from_similarity(values)
    elif np.issubdtype(values.dtype, np.integer):
        ranks = _check_ranks(values, n_queries)
        if ranks.size and ranks.max() >= n_images:
            raise EvaluationError(
                f"ranks holds database index {int(ranks.max())} but {dataset.name} has {n_images} database images"
            )
    else:
        raise EvaluationError(
            f"expected a float similarity matrix or an integer ranking, got dtype {values.dtype}"
        )
    result: dict[str, Any] = {"dataset": dataset.name, "query_names": [query.name for query in dataset.queries]}
    if dataset.protocol == "revisited":
        revisited = revisited_map(ranks, dataset.gnd, kappas)
        result.update(revisited)
        result["map"], result["aps"] = revisited["map_medium"], revisited["aps_medium"]
        result.update(_precision_keys(kappas, [revisited[f"mp@{int(k)}_medium"] for k in kappas]))
    else:
        result.update(classic_map(ranks, dataset.gnd, kappas))
    if dataset.protocol == "ukbench":
        query_ids = [query.db_index for query in dataset.queries]
        groups = None  # without labels: UKBench numbering, groups of 4 consecutive images
        if dataset.labels is not None:
            # group ids from the database labels; distractors (label None) belong to no group
            ids: dict[str, int] = {}
            groups = np.array([-1 if label is None else ids.setdefault(label, len(ids)) for label in dataset.labels])
        result["ns_score"] = ukbench_score(ranks, groups, query_ids)
    return result


def precision_recall(ranking: np.ndarray, positives: set[int], junk: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each positive of a ranking (database indices, best first), junk left out."""
    kept = [i for i in ranking.tolist() if i not in junk]
    hits = np.flatnonzero(np.isin(np.asarray(kept, dtype=np.int64), np.fromiter(positives, dtype=np.int64)))
    if not positives or hits.size == 0:
        return np.zeros(0), np.zeros(0)
    found = np.arange(1, hits.size + 1)
    return found / (hits + 1), found / len(positives)


def mean_interpolated_precision(curves: Sequence[tuple[np.ndarray, np.ndarray]], levels: int = 101) -> np.ndarray:
    """Mean over queries of the interpolated precision (the best precision at any recall >= r) at ``levels``
    recall levels from 0 to 1."""
    recall_levels = np.linspace(0, 1, levels)
    rows = []
    for precision, recall in curves:
        row = np.zeros(levels)
        for j, r in enumerate(recall_levels):
            reached = precision[recall >= r - 1e-12]
            row[j] = reached.max() if reached.size else 0.0
        rows.append(row)
    return np.mean(rows, axis=0) if rows else np.zeros(levels)
