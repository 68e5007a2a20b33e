"""camretrieval.storage.ann on small synthetic clustered descriptors: exact search matches numpy, float16 storage barely moves
scores, the approximate indexes find most true neighbours, recall is counted right, and indexes survive
serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from camretrieval.errors import CamRetrievalError
from camretrieval.storage.ann import (
    ANN_KINDS,
    build_search_index,
    deserialize,
    index_kind,
    ivfpq_min_vectors,
    measure_recall,
    recall_at,
    search_settings,
    serialize,
    set_search_effort,
)


def clustered(n: int = 3000, d: int = 64, n_centres: int = 60, seed: int = 0) -> np.ndarray:
    """l2-normalised clumps around 60 centres with a decaying spectrum (like benchmarks/search_scale.py, smaller):
    a point's 10 nearest neighbours have cosine about 0.77, unrelated points about 0."""
    rng = np.random.default_rng(seed)
    spectrum = np.arange(1, d + 1) ** -0.5
    centres = rng.standard_normal((n_centres, d)) * spectrum
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, n_centres, n)] + 0.7 * rng.standard_normal((n, d)) * spectrum / np.linalg.norm(spectrum)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


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


@pytest.mark.parametrize("kind, bound", [("hnsw", 0.9), ("ivfpq", 0.5)])
def test_approximate_recall(data, indexes, kind, bound):
    # Measured recall@10 on this data (200 queries, seeds 0-2): hnsw 1.00, ivfpq 0.75-0.77 (16 one-byte codes for 64
    # dimensions is coarse within a clump, where the 10 nearest differ little). The bounds sit well under those, to absorb FAISS/BLAS versions, and far
    # above chance (10 / 3000 = 0.003): a broken metric (L2 on raw codes, wrong ids) would fail them.
    assert measure_recall(indexes[kind], data, k=10, n_queries=200) >= bound


def test_kinds_and_settings(indexes):
    assert {name: index_kind(index) for name, index in indexes.items()} == {name: name for name in indexes}
    settings = search_settings(indexes["ivfpq"])
    assert settings["pq_m"] == 16 and settings["pq_bits"] == 8 and settings["nprobe"] == 32
    assert settings["nlist"] == 3000 // 39  # 4 * sqrt(3000) = 219 lists, clipped to 39 training vectors each
    assert search_settings(indexes["hnsw"])["ef_search"] == 128


def test_recall_at_hand_worked():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    approx = np.array([[2, 0, 9], [-1, -1, 3]])
    assert recall_at(exact, approx, k=3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert recall_at(exact, approx, k=1) == pytest.approx((0 + 0) / 2)  # top-1: {0} vs {2}, {3} vs {-1}
    assert recall_at(np.array([[7, -1]]), np.array([[-1, 7]]), k=2) == pytest.approx(0.5)  # -1 never matches -1


@pytest.mark.parametrize("name", ["exact", "exact-float16", "hnsw", "ivfpq"])
def test_serialise_round_trip(data, indexes, name):
    queries = clustered(10, seed=2)
    original = indexes[name]
    loaded = deserialize(serialize(original))
    assert index_kind(loaded) == name and loaded.ntotal == len(data)
    assert search_settings(loaded) == search_settings(original)  # efSearch / nprobe are saved too
    for a, b in zip(original.search(queries, 20), loaded.search(queries, 20)):
        np.testing.assert_array_equal(a, b)
    assert deserialize(bytes(serialize(original))).ntotal == len(data)


def test_search_effort_after_loading(data, indexes):
    hnsw = deserialize(serialize(indexes["hnsw"]))
    set_search_effort(hnsw, ef_search=16, nprobe=3)  # nprobe does not apply to HNSW: ignored
    assert search_settings(hnsw)["ef_search"] == 16
    ivf = deserialize(serialize(indexes["ivfpq"]))
    assert set_search_effort(ivf, nprobe=10_000) is ivf and ivf.nprobe == ivf.nlist  # capped at nlist
    full = measure_recall(ivf, data, k=10, n_queries=100)
    set_search_effort(ivf, nprobe=1)
    assert ivf.nprobe == 1 and measure_recall(ivf, data, k=10, n_queries=100) <= full
    with pytest.raises(CamRetrievalError, match="at least 1"):
        set_search_effort(ivf, nprobe=0)


def test_ivfpq_needs_enough_vectors():
    small = clustered(500)
    assert ivfpq_min_vectors() == 1024
    with pytest.raises(CamRetrievalError, match=r"at least 1024 descriptors.*got 500.*exact search"):
        build_search_index(small, "ivfpq")
    assert build_search_index(small, None).ntotal == 500  # exact search has no minimum


def test_bad_arguments(data):
    assert ANN_KINDS == ("hnsw", "ivfpq")
    with pytest.raises(CamRetrievalError, match="unknown search index kind 'lsh'"):
        build_search_index(data, "lsh")
    with pytest.raises(CamRetrievalError, match="float16 does not apply"):
        build_search_index(data, "ivfpq", float16=True)
    with pytest.raises(CamRetrievalError, match="must divide"):
        build_search_index(data, "ivfpq", pq_m=7)
    with pytest.raises(CamRetrievalError, match="N x dim"):
        build_search_index(data[0])
