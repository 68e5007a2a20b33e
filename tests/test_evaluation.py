"""Metrics: hand-computed AP / mAP / P@k cases, the revisited setups, the N-S score, and agreement with an
independent loop implementation of revisitop's protocol on the real ROxford/RParis ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.datasets import Query, RetrievalDataset, from_revisitop_pickle
from camretrieval.evaluation.metrics import (
    EvaluationError,
    average_precision,
    classic_map,
    compute_map,
    evaluate,
    labels_mean_average_precision,
    revisited_map,
    revisited_setups,
    ukbench_score,
)


def column(*indices: int) -> np.ndarray:
    """One query's ranking as a database x 1 array."""
    return np.array(indices, dtype=np.int64)[:, None]


# --- average_precision and compute_map on hand-computed cases ----------------------------------------------


def test_average_precision_trapezoid():
    # positives at 0-based ranks 0 and 2 of 2: (1+1)/2 + (1/2 + 2/3)/2 = 1 + 7/12, times recall step 1/2 = 19/24
    assert average_precision([0, 2], 2) == pytest.approx(19 / 24)
    assert average_precision([2, 0], 2) == pytest.approx(19 / 24)  # order of the input does not matter
    assert average_precision([], 3) == 0.0
    assert average_precision([], 0) == 0.0


def test_perfect_ranking_scores_one():
    ranks = np.stack([np.array([2, 0, 1, 3]), np.array([3, 1, 0, 2])], axis=1)
    mean_ap, aps, pr, prs = compute_map(ranks, [{"ok": [0, 2]}, {"ok": [1, 3], "junk": []}], kappas=(1, 2))
    assert mean_ap == pytest.approx(1.0)
    np.testing.assert_allclose(aps, [1.0, 1.0])
    np.testing.assert_allclose(prs, [[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(pr, [1.0, 1.0])


def test_reversed_ranking():
    # 5 images, positives {0, 1}; reversed ranking [4, 3, 2, 1, 0] puts them at 0-based ranks 3 and 4:
    # AP = 1/2 * [ (0/3 + 1/4)/2 + (1/4 + 2/5)/2 ] = 1/2 * (0.125 + 0.325) = 0.225
    mean_ap, aps, _, _ = compute_map(column(4, 3, 2, 1, 0), [{"ok": [0, 1], "junk": []}])
    assert mean_ap == pytest.approx(0.225)
    assert aps[0] == pytest.approx(0.225)


def test_junk_is_removed_from_the_ranking():
    # ranking [5, 9, 1, 2, 3], ok {1, 2}, junk {9}: without junk [5, 1, 2, 3], positives at ranks 1 and 2:
    # AP = 1/2 * [ (0/1 + 1/2)/2 + (1/2 + 2/3)/2 ] = 1/2 * (3/12 + 7/12) = 5/12
    ranks = column(5, 9, 1, 2, 3)
    mean_ap, aps, pr, prs = compute_map(ranks, [{"ok": [1, 2], "junk": [9]}], kappas=(1, 5, 10))
    assert mean_ap == pytest.approx(5 / 12)
    # P@k (revisitop): 1-based positions [2, 3]; k=1: kq=1, none -> 0; k=5 and 10: kq = max(pos) = 3 -> 2/3
    np.testing.assert_allclose(prs[0], [0.0, 2 / 3, 2 / 3])
    # the same ranking without the junk declared: positives at 2 and 3 -> 1/2 * [(0+1/3)/2 + (1/3+2/4)/2] = 7/24
    assert compute_map(ranks, [{"ok": [1, 2]}])[0] == pytest.approx(7 / 24)


def test_junk_before_every_positive_and_positive_also_junk():
    # junk at ranks 0 and 1 are skipped: the positive becomes rank 0
    assert compute_map(column(7, 8, 3, 1), [{"ok": [3], "junk": [7, 8]}])[0] == pytest.approx(1.0)
    # an image listed as both ok and junk stays a positive (revisitop keeps it in pos)
    assert compute_map(column(1, 0), [{"ok": [1], "junk": [1]}])[0] == pytest.approx(1.0)


def test_duplicate_ground_truth_entries_count_once():
    # ok lists 1 twice (as all_souls_1_good.txt does): still 2 positives, so a perfect ranking scores 1
    mean_ap, _, _, _ = compute_map(column(1, 2, 0, 3), [{"ok": [1, 1, 2], "junk": [0, 0]}])
    assert mean_ap == pytest.approx(1.0)


def test_repeated_index_in_ranking_is_refused():
    with pytest.raises(EvaluationError, match="more than once"):
        compute_map(column(1, 1, 0), [{"ok": [1]}])


def test_query_without_positives_is_skipped_like_revisitop():
    ranks = np.stack([np.array([0, 1, 2])] * 3, axis=1)
    mean_ap, aps, pr, prs = compute_map(ranks, [{"ok": [0]}, {"ok": [], "junk": [1]}, {"junk": [2]}], kappas=(1,))
    assert aps[0] == pytest.approx(1.0)
    assert np.isnan(aps[1]) and np.isnan(aps[2]) and np.isnan(prs[1:]).all()
    # the mean is over nq - nempty = 1 query, not 3
    assert mean_ap == pytest.approx(1.0)
    np.testing.assert_allclose(pr, [1.0])
    all_empty = compute_map(ranks[:, :1], [{"ok": []}])
    assert math.isnan(all_empty[0]) and np.isnan(all_empty[2]).all()


def test_truncated_ranking():
    # only the top 2 of a query are given: ranking [0, 3], positives {3, 4}; 4 is never found:
    # AP = (0/1 + 1/2)/2 * 1/2 = 0.125; P@1: kq = 1 -> 0; P@5: kq = min(max pos 2, 5) = 2 -> 1/2
    mean_ap, _, _, prs = compute_map(column(0, 3), [{"ok": [3, 4]}], kappas=(1, 5))
    assert mean_ap == pytest.approx(0.125)
    np.testing.assert_allclose(prs[0], [0.0, 0.5])
    # no positive at all in the truncated list: AP 0 (revisitop would fail on max of nothing)
    mean_ap, _, _, prs = compute_map(column(0, 1), [{"ok": [5]}], kappas=(1,))
    assert mean_ap == 0.0 and prs[0, 0] == 0.0


def test_precision_at_k_uses_revisitop_clipping():
    # one positive at rank 1 (1-based) and k = 5: kq = min(1, 5) = 1, so P@5 = 1/1, not 1/5
    _, _, pr, _ = compute_map(column(0, 1, 2, 3, 4, 5), [{"ok": [0]}], kappas=(1, 5))
    np.testing.assert_allclose(pr, [1.0, 1.0])


def test_bad_rankings_are_explained():
    gnd = [{"ok": [0]}, {"ok": [1]}, {"ok": [2]}]
    ranks = np.tile(np.arange(5), (3, 1))  # queries x database: transposed
    with pytest.raises(EvaluationError, match="transpose"):
        compute_map(ranks, gnd)
    with pytest.raises(EvaluationError, match="integer"):
        compute_map(ranks.T.astype(float), gnd)
    with pytest.raises(EvaluationError, match="negative"):
        compute_map(ranks.T - 1, gnd)
    with pytest.raises(EvaluationError, match="2-D"):
        compute_map(np.arange(5), gnd[:1])
    assert issubclass(EvaluationError, CamRetrievalError)


def test_classic_map_returns_named_values():
    result = classic_map(column(5, 9, 1, 2, 3), [{"ok": [1, 2], "junk": [9]}], kappas=(1, 5))
    assert result["map"] == pytest.approx(5 / 12)
    assert result["mp@1"] == 0.0 and result["mp@5"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(result["aps"], [5 / 12])


# --- revisited setups -------------------------------------------------------------------------------------


def test_revisited_setups_on_a_hand_case():
    # easy {0}, hard {1}, junk {2}; ranking [1, 3, 0, 2]
    #   Easy (ok {0}, junk {2, 1}): [3, 0] -> rank 1: (0/1 + 1/2)/2 = 0.25
    #   Medium (ok {0, 1}, junk {2}): [1, 3, 0] -> ranks 0, 2: 19/24
    #   Hard (ok {1}, junk {2, 0}): [1, 3] -> rank 0: 1.0
    result = revisited_map(column(1, 3, 0, 2), [{"easy": [0], "hard": [1], "junk": [2]}], kappas=(1,))
    assert result["map_easy"] == pytest.approx(0.25)
    assert result["map_medium"] == pytest.approx(19 / 24)
    assert result["map_hard"] == pytest.approx(1.0)
    assert result["mp@1_easy"] == 0.0 and result["mp@1_medium"] == 1.0 and result["mp@1_hard"] == 1.0


def test_revisited_needs_easy_hard_junk():
    with pytest.raises(EvaluationError, match="easy"):
        revisited_map(column(0, 1), [{"ok": [0]}])


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_revisited_rules_take_the_right_lists(gnd_dir, name):
    dataset = from_revisitop_pickle(gnd_dir / f"gnd_{name}.pkl")
    assert len(dataset.gnd) == 70
    setups = revisited_setups(dataset.gnd)
    for i, g in enumerate(dataset.gnd):
        easy, hard, junk = set(g["easy"].tolist()), set(g["hard"].tolist()), set(g["junk"].tolist())
        assert set(setups["easy"][i]["ok"].tolist()) == easy
        assert set(setups["easy"][i]["junk"].tolist()) == junk | hard
        assert set(setups["medium"][i]["ok"].tolist()) == easy | hard
        assert set(setups["medium"][i]["junk"].tolist()) == junk
        assert set(setups["hard"][i]["ok"].tolist()) == hard
        assert set(setups["hard"][i]["junk"].tolist()) == junk | easy


# --- agreement with an independent implementation on the real ground truth ----------------------------------


def reference_map(
    ranks: np.ndarray, gnd: list[dict], kappas: tuple[int, ...]
) -> tuple[float, list[float], list[float]]:
    """revisitop's protocol written as a walk down each ranked list (plain loops, no shared code)."""
    aps, prs = [], []
    for q, g in enumerate(gnd):
        ok = {int(x) for x in g["ok"]}
        junk = {int(x) for x in g.get("junk", [])}
        if not ok:
            aps.append(float("nan"))
            prs.append([float("nan")] * len(kappas))
            continue
        ap, found, position, positions = 0.0, 0, 0, []  # position: 0-based rank in the junk-free list
        for index in ranks[:, q].tolist():
            if index in ok:
                before = 1.0 if position == 0 else found / position
                at = (found + 1) / (position + 1)
                ap += (before + at) / 2 / len(ok)
                found += 1
                positions.append(position + 1)
                position += 1
            elif index not in junk:
                position += 1
        aps.append(ap)
        row = []
        for k in kappas:
            cut = min(max(positions), k)
            row.append(sum(1 for p in positions if p <= cut) / cut)
        prs.append(row)
    valid = [i for i, ap in enumerate(aps) if not math.isnan(ap)]
    mean_ap = sum(aps[i] for i in valid) / len(valid)
    mean_pr = [sum(prs[i][j] for i in valid) / len(valid) for j in range(len(kappas))]
    return mean_ap, aps, mean_pr


@pytest.mark.parametrize("name", ["roxford5k", "rparis6k"])
def test_compute_map_matches_independent_loops_on_real_gnd(gnd_dir, name):
    dataset = from_revisitop_pickle(gnd_dir / f"gnd_{name}.pkl")
    n, nq = len(dataset.images), len(dataset.queries)
    rng = np.random.default_rng(7)
    kappas = (1, 5, 10)
    # random rankings would put nearly every positive far down; also bias some towards the positives so that
    # the top-k and the junk handling are exercised
    scores = rng.random((nq, n))
    for q, g in enumerate(dataset.gnd):
        scores[q, g["easy"]] += rng.random(len(g["easy"])) * 0.9
        scores[q, g["junk"]] += rng.random(len(g["junk"])) * 0.9
    for similarity in (rng.random((nq, n)), scores):
        ranks = np.argsort(-similarity, axis=1).T
        result = revisited_map(ranks, dataset.gnd, kappas)
        for setup, setup_gnd in revisited_setups(dataset.gnd).items():
            expected_map, expected_aps, expected_pr = reference_map(ranks, setup_gnd, kappas)
            assert result[f"map_{setup}"] == pytest.approx(expected_map, abs=1e-6)
            np.testing.assert_allclose(result[f"aps_{setup}"], expected_aps, atol=1e-6)  # NaN where skipped
            for k, value in zip(kappas, expected_pr):
                assert result[f"mp@{k}_{setup}"] == pytest.approx(value, abs=1e-6)
    if name == "roxford5k":  # two ROxford queries have no easy positives: skipped in the Easy setup
        assert np.isnan(result["aps_easy"]).sum() == 2


def test_evaluate_revisited_from_similarity_and_ranks(gnd_dir):
    dataset = from_revisitop_pickle(gnd_dir / "gnd_roxford5k.pkl")
    similarity = np.random.default_rng(0).random((len(dataset.queries), len(dataset.images)))
    result = evaluate(dataset, similarity)
    assert {"map", "map_easy", "map_medium", "map_hard", "aps", "mp@5", "mp@5_hard"} <= result.keys()
    assert result["map"] == result["map_medium"]
    assert len(result["aps"]) == 70 and result["query_names"][0] == "all_souls_000013"
    from_ranks = evaluate(dataset, np.argsort(-similarity, axis=1, kind="stable").T)
    assert from_ranks["map_hard"] == result["map_hard"]
    with pytest.raises(EvaluationError, match="expected"):
        evaluate(dataset, similarity.T)
    with pytest.raises(EvaluationError, match="database images"):
        evaluate(dataset, np.full((3, 70), len(dataset.images), dtype=np.int64))


# --- UKBench and label groups -----------------------------------------------------------------------------


def test_ukbench_score():
    # 8 images in 2 groups; every image a query (column)
    perfect = np.array([[g * 4 + (q + j) % 4 for j in range(8)] for q, g in zip(range(8), [0] * 4 + [1] * 4)]).T
    perfect[4:] = 0  # rows below the top 4 do not matter
    assert ukbench_score(perfect) == pytest.approx(4.0)
    ranks = np.array([[0, 1, 5, 6], [1, 0, 2, 3]]).T  # query 0: 0, 1 of group 0 -> 2; query 1: all 4 -> 4
    assert ukbench_score(ranks) == pytest.approx(3.0)
    # explicit groups and query ids: database image 4 is a distractor (group -1)
    assert ukbench_score(column(4, 0, 1, 2), groups=[0, 0, 0, 0, -1], query_ids=[3]) == pytest.approx(3.0)
    with pytest.raises(EvaluationError, match="at least 4"):
        ukbench_score(column(0, 1, 2))


def test_evaluate_label_groups_matches_labels_mean_average_precision():
    labels = ["a", "a", "b", "b", "b", "c"]
    n = len(labels)
    gnd = []
    for i, label in enumerate(labels):
        gnd.append({"ok": [j for j in range(n) if labels[j] == label and j != i], "junk": [i]})
    dataset = RetrievalDataset(
        "toy", "/nonexistent", [f"{label}/{i}.jpg" for i, label in enumerate(labels)],
        [Query(f"{label}/{i}.jpg", None, str(i), i, label) for i, label in enumerate(labels)], gnd, "labels", labels,
    )
    similarity = np.random.default_rng(3).random((n, n))
    result = evaluate(dataset, similarity)
    expected_map, expected_aps = labels_mean_average_precision(similarity, labels, range(n))
    # image 5 ('c') has no other member: NaN and skipped here, AP 0 and counted in labels_mean_average_precision
    assert np.isnan(result["aps"][5])
    np.testing.assert_allclose(result["aps"][:5], expected_aps[:5], atol=1e-12)
    assert result["map"] == pytest.approx(expected_aps[:5].mean())
    assert "ns_score" not in result


def test_evaluate_ukbench_gives_ns_score():
    n = 8
    images = [f"ukbench{i:05d}.jpg" for i in range(n)]
    groups = [f"{i // 4:04d}" for i in range(n)]
    gnd = [{"ok": [j for j in range(n) if j // 4 == i // 4 and j != i], "junk": [i]} for i in range(n)]
    queries = [Query(p, None, p[:-4], i, groups[i]) for i, p in enumerate(images)]
    dataset = RetrievalDataset("ukbench", "/nonexistent", images, queries, gnd, "ukbench", groups)
    similarity = np.array([[1.0 if i // 4 == j // 4 else 0.0 for j in range(n)] for i in range(n)])
    result = evaluate(dataset, similarity)
    assert result["ns_score"] == pytest.approx(4.0)
    assert result["map"] == pytest.approx(1.0)
