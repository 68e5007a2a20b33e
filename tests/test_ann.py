"""camretrieval.storage.ann on small synthetic clustered descriptors: exact search matches numpy, float16 storage barely moves
scores, the approximate indexes find most true neighbours, recall is counted right, calibration to a recall target
meets it on queries it never saw, and indexes (with their search effort) survive serialisation."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from camretrieval.errors import CamRetrievalError
from camretrieval.storage.ann import (
    ANN_KINDS,
    HeldOut,
    build_search_index,
    calibrate,
    check_recall_target,
    deserialize,
    index_kind,
    ivf_min_vectors,
    ivfpq_min_vectors,
    measure_recall,
    recall_at,
    search_settings,
    serialize,
    set_search_effort,
)


def clustered(n: int = 3000, d: int = 64, n_centres: int = 60, seed: int = 0) -> np.ndarray:
    """l2-normalised clumps around 60 fixed centres with a decaying spectrum (like benchmarks/search_scale.py,
    smaller); ``seed`` draws other points around the same centres. A point's 10 nearest neighbours have cosine
    about 0.77, unrelated points about 0."""
    spectrum = np.arange(1, d + 1) ** -0.5
    centres = np.random.default_rng(12345).standard_normal((n_centres, d)) * spectrum
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, n_centres, n)] + 0.7 * rng.standard_normal((n, d)) * spectrum / np.linalg.norm(spectrum)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(queries: np.ndarray, database: np.ndarray, k: int) -> np.ndarray:
    """Plain numpy: the ids of each query's k largest inner products."""
    return np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered()


@pytest.fixture(scope="module")
def indexes(data):
    """One index of each kind over ``data``, built once (IVF-PQ training is the slow part of this file)."""
    return {
        "exact": build_search_index(data),
        "exact-float16": build_search_index(data, float16=True),
        "hnsw": build_search_index(data, "hnsw"),
        "ivf": build_search_index(data, "ivf"),
        "ivfpq": build_search_index(data, "ivfpq"),
    }


def test_exact_matches_numpy(data, indexes):
    queries = clustered(20, seed=1)  # other draws: not database members
    scores, ids = indexes["exact"].search(queries, 10)
    similarity = queries @ data.T
    np.testing.assert_array_equal(ids, np.argsort(-similarity, axis=1, kind="stable")[:, :10])
    np.testing.assert_allclose(scores, np.take_along_axis(similarity, ids, axis=1), atol=1e-5)


def test_float16_exact_agrees_with_numpy(data, indexes):
    queries = clustered(20, seed=1)
    scores, ids = indexes["exact-float16"].search(queries, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ data.T, ids, axis=1), atol=1e-3)
    # only near-ties at rank 10 (scores within float16 rounding) can swap: measured 0.998-0.999 over 3 seeds
    assert measure_recall(indexes["exact-float16"], data, k=10, n_queries=200) >= 0.98


@pytest.mark.parametrize("kind, bound", [("hnsw", 0.9), ("ivf", 0.6), ("ivfpq", 0.5)])
def test_approximate_recall(data, indexes, kind, bound):
    # Measured recall@10 at the default effort on this data (200 held-out queries, seeds 0-2): hnsw 1.00, ivf
    # 0.84-0.85 (20 candidates re-scored), ivfpq 0.76-0.77 (16 one-byte codes for 64 dimensions is coarse within a
    # clump). The bounds sit under those, to absorb FAISS/BLAS versions, and far above chance (10 / 3000 = 0.003):
    # a broken metric (L2 on raw codes, wrong ids) would fail them.
    assert measure_recall(indexes[kind], data, k=10, n_queries=200) >= bound


def test_kinds_and_settings(indexes):
    assert {name: index_kind(index) for name, index in indexes.items()} == {name: name for name in indexes}
    settings = search_settings(indexes["ivfpq"])
    assert settings["pq_m"] == 16 and settings["pq_bits"] == 8 and settings["nprobe"] == 32
    assert settings["nlist"] == 3000 // 39  # 4 * sqrt(3000) = 219 lists, clipped to 39 training vectors each
    assert search_settings(indexes["hnsw"])["ef_search"] == 128
    ivf = search_settings(indexes["ivf"])  # 2 dimensions per 4-bit code, the top 2k re-scored from float16
    assert (ivf["pq_m"], ivf["pq_bits"], ivf["k_factor"], ivf["nlist"]) == (32, 4, 2, 3000 // 39)
    refine = faiss.downcast_index(faiss.downcast_index(indexes["ivf"]).refine_index)
    assert refine.sq.qtype == faiss.ScalarQuantizer.QT_fp16


def test_recall_at_hand_worked():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    approx = np.array([[2, 0, 9], [-1, -1, 3]])
    assert recall_at(exact, approx, k=3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert recall_at(exact, approx, k=1) == pytest.approx((0 + 0) / 2)  # top-1: {0} vs {2}, {3} vs {-1}
    assert recall_at(np.array([[7, -1]]), np.array([[-1, 7]]), k=2) == pytest.approx(0.5)  # -1 never matches -1


def test_held_out_queries_are_left_out_of_both_lists(data, indexes):
    held = HeldOut(data, k=20, n_queries=50, seed=3, chunk=700)  # chunks that do not divide N: the merge is exercised
    assert len(held.ids) == 50 and held.k == 20 and len(np.unique(held.ids)) == 50
    others = np.setdiff1d(np.arange(len(data)), held.ids)
    expected = others[exact_top(data[held.ids], data[others], 20)]  # plain numpy over the collection without them
    np.testing.assert_array_equal(np.sort(held.exact_ids, axis=1), np.sort(expected, axis=1))
    assert held.recall(indexes["exact"]) == 1.0
    _, ids = indexes["ivf"].search(held.queries, 20)  # a plain search finds the queries themselves at rank 1
    assert (ids[:, 0] == held.ids).all()
    assert held.recall(indexes["ivf"]) < 1.0  # ... the held-out one does not count them
    assert HeldOut(data[:30], n_queries=500).k == 27  # a tenth of 30 as queries, at most the other 27 as neighbours
    assert measure_recall(indexes["exact"], data) == 1.0 and measure_recall(build_search_index(data[:1], "hnsw"), data[:1]) == 1.0


def copy(index: faiss.Index) -> faiss.Index:
    """An independent copy of a fixture index, for tests that change its search effort."""
    return deserialize(serialize(index))


@pytest.mark.parametrize("kind, target", [("ivf", 0.95), ("hnsw", 0.99), ("ivfpq", 0.7)])
def test_calibration_meets_its_target_on_queries_it_never_saw(data, indexes, kind, target):
    index = copy(indexes[kind])
    calibration = calibrate(index, data, target)
    assert calibration.recall > calibration.lower_bound >= target and calibration.queries == 300 and calibration.k == 100
    assert {key: search_settings(index)[key] for key in calibration.effort} == calibration.effort  # set on the index
    fresh = clustered(1000, seed=11)  # the same clumps, not members
    _, ids = index.search(fresh, 100)
    # the cheapest setting that meets the target on 300 held-out members; on these 1000 other draws it measured
    # 0.962 (ivf: nprobe 13 of 76, k_factor 4), 0.993 (hnsw: efSearch 100), 0.767 (ivfpq: nprobe 4)
    assert recall_at(exact_top(fresh, data, 100), ids, 100) >= target - 0.02
    knob = "ef_search" if kind == "hnsw" else "nprobe"
    if calibration.effort[knob] > 100 or knob == "nprobe":  # FAISS searches HNSW with efSearch >= k = 100 anyway
        set_search_effort(index, **{knob: calibration.effort[knob] - 1})  # one step less: the bound misses the target
        assert HeldOut(data).bounds(index)[1] < target


def test_calibration_chooses_the_cheaper_of_lists_and_re_scoring(data, indexes):
    index = copy(indexes["ivf"])
    low, high = calibrate(index, data, 0.8), calibrate(index, data, 0.99)
    assert low.recall >= 0.8 and high.recall >= 0.99
    assert high.effort["nprobe"] > low.effort["nprobe"] and high.effort["k_factor"] >= low.effort["k_factor"]
    assert calibrate(indexes["exact"], data, 0.99).recall == 1.0  # exact: nothing to set


def test_calibrated_effort_survives_serialisation(data, indexes):
    index = copy(indexes["ivf"])
    calibration = calibrate(index, data, 0.9)
    loaded = copy(index)
    assert search_settings(loaded) == search_settings(index)
    assert {key: search_settings(loaded)[key] for key in ("nprobe", "k_factor")} == calibration.effort
    assert HeldOut(data).recall(loaded) == pytest.approx(calibration.recall)


@pytest.mark.parametrize("target", [0, -0.5, 1.01, 95, float("nan"), "high", None])
def test_bad_recall_targets(data, indexes, target):
    with pytest.raises(CamRetrievalError, match=r"recall target must be"):
        check_recall_target(target)
    with pytest.raises(CamRetrievalError, match=r"recall target must be"):
        calibrate(indexes["ivf"], data, target)
    assert check_recall_target("1") == 1.0


def test_an_unreachable_target_says_what_the_index_reaches(data, indexes):
    index = copy(indexes["ivfpq"])  # PQ codes alone, no re-scoring: recall@100 tops out near 0.9
    with pytest.raises(CamRetrievalError, match=r"ivfpq index reaches recall@100 0\.\d+ at most.*nprobe 76.*--ann ivf"):
        calibrate(index, data, 0.999)
    assert search_settings(index)["nprobe"] <= 76


@pytest.mark.parametrize("name", ["exact", "exact-float16", "hnsw", "ivf", "ivfpq"])
def test_serialise_round_trip(data, indexes, name):
    queries = clustered(10, seed=2)
    original = indexes[name]
    loaded = deserialize(serialize(original))
    assert index_kind(loaded) == name and loaded.ntotal == len(data)
    assert search_settings(loaded) == search_settings(original)  # efSearch / nprobe / k_factor are saved too
    for a, b in zip(original.search(queries, 20), loaded.search(queries, 20)):
        np.testing.assert_array_equal(a, b)
    assert deserialize(bytes(serialize(original))).ntotal == len(data)


def test_search_effort_after_loading(data, indexes):
    hnsw = deserialize(serialize(indexes["hnsw"]))
    set_search_effort(hnsw, ef_search=16, nprobe=3, k_factor=4)  # nprobe and k_factor do not apply to HNSW: ignored
    assert search_settings(hnsw)["ef_search"] == 16
    ivf = deserialize(serialize(indexes["ivfpq"]))
    assert set_search_effort(ivf, nprobe=10_000) is ivf and ivf.nprobe == ivf.nlist  # capped at nlist
    full = measure_recall(ivf, data, k=10, n_queries=100)
    set_search_effort(ivf, nprobe=1)
    assert ivf.nprobe == 1 and measure_recall(ivf, data, k=10, n_queries=100) <= full
    with pytest.raises(CamRetrievalError, match="at least 1"):
        set_search_effort(ivf, nprobe=0)
    refined = deserialize(serialize(indexes["ivf"]))
    set_search_effort(refined, nprobe=5, k_factor=8)
    assert (search_settings(refined)["nprobe"], search_settings(refined)["k_factor"]) == (5, 8)
    with pytest.raises(CamRetrievalError, match="k_factor must be at least 1"):
        set_search_effort(refined, k_factor=0)


def test_too_few_vectors_to_train():
    small = clustered(500)
    assert ivfpq_min_vectors() == 1024 and ivf_min_vectors() == 624
    with pytest.raises(CamRetrievalError, match=r"at least 1024 descriptors.*got 500.*exact search"):
        build_search_index(small, "ivfpq")
    with pytest.raises(CamRetrievalError, match=r"ivf index needs at least 624 descriptors.*got 500.*exact search"):
        build_search_index(small, "ivf")
    assert build_search_index(small, None).ntotal == 500  # exact search has no minimum
    hnsw = build_search_index(small, "hnsw")  # nor has HNSW; calibrated on 50 held-out members
    assert calibrate(hnsw, small, 0.95).queries == 50


def test_bad_arguments(data, indexes):
    assert ANN_KINDS == ("hnsw", "ivf", "ivfpq")
    with pytest.raises(CamRetrievalError, match="unknown search index kind 'lsh'"):
        build_search_index(data, "lsh")
    with pytest.raises(CamRetrievalError, match="float16 does not apply"):
        build_search_index(data, "ivfpq", float16=True)
    with pytest.raises(CamRetrievalError, match="must divide"):
        build_search_index(data, "ivfpq", pq_m=7)
    with pytest.raises(CamRetrievalError, match="must divide"):
        build_search_index(data, "ivf", pq_m=7)
    with pytest.raises(CamRetrievalError, match="N x dim"):
        build_search_index(data[0])
    with pytest.raises(CamRetrievalError, match="holds 3000 vectors, but 10"):
        calibrate(indexes["hnsw"], data[:10], 0.9)


def test_an_index_folder_calibrates_keeps_its_target_and_recalibrates_without_rebuilding(tmp_path, data):
    from camretrieval.search.index import Index
    from camretrieval.storage.catalog import IndexStore
    from camretrieval.storage.writer import UpdateReport, _set_search_index, write_index

    index_dir = tmp_path / "index"
    paths = [f"{i}.jpg" for i in range(len(data))]
    write_index(index_dir, paths, data, None, {"backbone": "test"}, None, None)
    with IndexStore.writing(index_dir) as store:
        report = UpdateReport()
        _set_search_index(store, None, "ivf", False, report)  # ivf's default target: 0.95
        assert report.ann["target"] == 0.95 and report.ann["recall_at_100"] >= 0.95
        built = report.ann["generation"], (index_dir / "ann.faiss").stat().st_mtime_ns
        _set_search_index(store, None, None, False, report, 0.8)  # a new target alone: recalibrated, same generation
        assert report.ann["target"] == 0.8 and 0.8 <= report.ann["recall_at_100"] < 0.95
        assert report.ann["generation"] == built[0] and report.ann["effort"]["nprobe"] <= 13
        _set_search_index(store, None, None, False, report)  # nothing asked: the index keeps its target and effort
        assert report.ann["target"] == 0.8 and store.meta()["ann_recall"] == 0.8
        with pytest.raises(CamRetrievalError, match="reaches recall@100"):
            _set_search_index(store, None, "ivfpq", False, report, 0.999)
        assert store.meta()["ann_kind"] == "ivf" and store.meta()["ann_recall"] == 0.8  # kept what it had
    opened = Index.open(index_dir)
    assert index_kind(opened.faiss_index) == "ivf"
    assert search_settings(opened.faiss_index)["nprobe"] == report.ann["effort"]["nprobe"]


@pytest.mark.parametrize("extra, message", [
    (["--recall", "1.5"], "must be a recall in (0, 1]"),
    (["--recall", "high"], "expected a recall between 0 and 1"),
    (["--recall", "0.9"], "this index has none: add --ann ivf"),
    (["--recall", "0.9", "--ann", "none"], "add --ann ivf"),
    (["--recall", "0.9", "--ann", "ivf", "--watch"], "--recall is set once"),
])
def test_recall_option_errors(tmp_path, capsys, extra, message):
    from camretrieval.cli import main

    assert main(["index", str(tmp_path), str(tmp_path / "index"), *extra]) == 2
    assert message in capsys.readouterr().err
