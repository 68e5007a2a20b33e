"""Query-time refinement from stored maps (METHOD.md sections 3 and 5): the maps store, online aggregation against a
plain computation of its definition, re-ranking with CAM regions (batched = cropped = plain; the stored index never
modified; clipping; the no-region fallback), query expansion's formula, the missing-maps error, and the CLI flags.

A tiny real index: 9 clutter-dev images (3 objects x 3 views) at 128 px with efficientnet_lite0 (4 x 6 to 4 x 7 cells).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from camretrieval import Describer, Index, PCAWhitening
from camretrieval.cli import main
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.images import load_image
from camretrieval.method.cell_major import cropped_region_class_vectors
from camretrieval.method.pooling import channel_weights, channel_weights_from_fractions
from camretrieval.search import refinement as refinement_module
from camretrieval.search.expansion import expanded_query, expansion_weights, reciprocal_neighbours
from camretrieval.search.online import online_descriptors
from camretrieval.search.refinement import Ranking, Refinement, SearchOptions
from camretrieval.search.reranking import region_scores
from camretrieval.storage.catalog import IndexStore
from camretrieval.storage.map_codec import read_header
from camretrieval.storage.maps import BlockCells, MapsNotStoredError, MapStore, RaggedMaps
from reference import reference_descriptor

SIZE = 128
N_CLASSES = 8
OBJECTS = ["apple1", "car1", "cow1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, clutter_dir, lite0):
    """(index folder built by the CLI with maps, the database folder, the PCA file, a query path and its box)."""
    root = tmp_path_factory.mktemp("refinement")
    database = root / "database"
    for name in OBJECTS:
        (database / name).mkdir(parents=True)
        for image in sorted((clutter_dir / name).glob("*.jpg"))[:3]:
            (database / name / image.name).symlink_to(image)
    # Any fixed whitening will do for exactness checks: one fit on random non-negative vectors (64-d).
    rng = np.random.default_rng(0)
    whitening = PCAWhitening(64, Describer(lite0, size=SIZE).settings.to_dict()).fit(np.abs(rng.normal(size=(300, 1280))))
    pca = root / "pca.npz"
    whitening.save(pca)
    index_dir = root / "index"
    args = ["index", str(database), str(index_dir), "--pca", str(pca), "--classes", str(N_CLASSES), "--workers", "0"]
    assert main(args + ["--quiet"]) == 0
    boxes = json.loads((clutter_dir / "boxes.json").read_text())
    query = sorted((database / "apple1").iterdir())[0]
    return index_dir, database, pca, query, tuple(boxes[f"apple1/{query.name}"])


@pytest.fixture(scope="module")
def index(tiny):
    return Index.open(tiny[0])


def _maps_of(index: Index, path) -> tuple[np.ndarray, np.ndarray]:
    """A fresh forward pass of a database image: (X, A) as K x H x W float32 NumPy arrays."""
    describer = index.describer
    with torch.inference_mode():
        maps = describer.feature_maps(describer.preprocess(load_image(path)).unsqueeze(0))
    return maps.features[0].numpy(), maps.cam_activations[0].numpy()


def _plain_class_vectors(X: np.ndarray, A: np.ndarray, W: np.ndarray, classes) -> np.ndarray:
    """Eq. 1-4 written out (loops over classes and channels) for GIVEN classes: the OnA definition for one image."""
    n_channels, height, width = X.shape
    q = [np.count_nonzero(X[k] > 0) / (height * width) for k in range(n_channels)]
    cw = [math.log(sum(q) / q[k]) if q[k] > 0 else 0.0 for k in range(n_channels)]
    vectors = []
    for c in classes:
        cam = np.zeros((height, width))
        for k in range(A.shape[0]):
            cam += W[c, k] * A[k]
        peak = cam.max()
        cam = np.maximum(cam / peak, 0) if peak > 0 else np.zeros_like(cam)
        f = np.array([cw[k] * (X[k] * cam).sum() for k in range(n_channels)])
        vectors.append(f / np.linalg.norm(f) if np.linalg.norm(f) > 0 else f)
    return np.array(vectors)


def _file_hashes(folder) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_maps_are_stored_ragged_float16_and_memory_mapped(tiny, index):
    index_dir, database, *_ = tiny
    assert IndexStore.open(index_dir).meta()["maps"] == {"separate_cam_layer": False}
    store = index.maps
    (cells,) = store.features.parts  # built in one go: one shard
    # Format 2: one compressed block per image in a memory-mapped file (storage/map_codec.py).
    assert isinstance(cells, BlockCells) and isinstance(cells.data, np.memmap) and store.cam_activations is None
    assert store.formats == {2} and cells.channels == 1280
    table = store.features.table
    # Ragged: these images have three map shapes (4x7, 6x4, 4x6), and each block is where the table says.
    assert table.shape == (9, 3) and len({(h, w) for _, h, w in table.tolist()}) == 3
    starts = np.sort(table[:, 0])
    sizes = [read_header(cells.data, int(start)).size for start in starts]
    assert starts[0] == 16 and (starts[1:] == starts[:-1] + sizes[:-1]).all() and starts[-1] + sizes[-1] == len(cells.data)
    assert not any(p.name.endswith((".spool", ".partial")) for p in index_dir.rglob("*"))
    X, _ = _maps_of(index, database / index.paths[4])
    stored = store.features.image(4)  # H x W x K, cell-major
    assert np.array_equal(stored, X.transpose(1, 2, 0).astype(np.float16))
    # float16: at most 2^-11 relative error per value.
    assert np.abs(stored.astype(np.float32) - X.transpose(1, 2, 0)).max() <= 2**-11 * np.abs(X).max()


def test_online_aggregation_equals_its_definition(tiny, index):
    """OnA of every database image with the query region's top-8 classes, against Eq. 1-4 and section 3 written out
    on the same images' maps: equal on the stored (float16) maps, and within float16 of fresh float32 maps."""
    _, database, _, query_path, box = tiny
    query = index.describe_query(query_path, box, SearchOptions(online=True))
    classes = query.classes[:N_CLASSES].tolist()
    assert classes == index.describer.image_vectors(query_path, box).classes[0].tolist()  # the region's classes
    W = index.describer.backbone.classifier_weight.double().numpy()
    w = index.whitening
    online = online_descriptors(index.maps, np.arange(len(index)), classes, index.describer.backbone.classifier_weight, w)
    worst_float32 = 0.0
    for i, path in enumerate(index.paths):
        stored = index.maps.features.image(i).astype(np.float64).transpose(2, 0, 1)
        plain16 = reference_descriptor(_plain_class_vectors(stored, stored, W, classes), w.mean_, w.components_, w.eigenvalues_)
        assert online[i] == pytest.approx(plain16, abs=1e-5)
        X, _ = _maps_of(index, database / path)
        X = X.astype(np.float64)
        plain32 = reference_descriptor(_plain_class_vectors(X, X, W, classes), w.mean_, w.components_, w.eigenvalues_)
        worst_float32 = max(worst_float32, float(np.abs(online[i] - plain32).max()))
    # Storing float16 maps moves lite0's OnA descriptors by ~1e-6 here (1.7e-5 at 448 px on clutter-dev, scores by
    # 8e-6): 95% of its head activations are exactly 0 or 6 (ReLU6), which float16 holds exactly. Backbones with
    # unbounded activations round more (at most 2^-11 relative per value).
    assert worst_float32 < 1e-4
    ranking = index.rank(query, SearchOptions(online=True))
    q = query.descriptor(N_CLASSES, w)
    assert ranking.scores == pytest.approx((online @ q)[ranking.ids], abs=1e-6)
    assert list(ranking.ids) == list(np.argsort(-(online @ q), kind="stable"))
    # With an image's OWN classes, OnA gives back its stored OfA descriptor (up to float16).
    own = index.describer.image_vectors(database / index.paths[2]).classes[0]
    again = online_descriptors(index.maps, [2], own, index.describer.backbone.classifier_weight, w)[0]
    assert again == pytest.approx(index.descriptors[2], abs=3e-3)


def test_online_top_resorts_only_the_top(tiny, index):
    _, _, _, query_path, box = tiny
    query = index.describe_query(query_path, box, SearchOptions(online=True))
    plain = index.rank(query)
    top = index.rank(query, SearchOptions(online=True, online_top=4))
    assert set(top.ids[:4]) == set(plain.ids[:4]) and list(top.ids[4:]) == list(plain.ids[4:])
    assert list(top.scores[:4]) == sorted(top.scores[:4], reverse=True)
    everything = index.rank(query, SearchOptions(online=True, online_top=0))  # 0: every image
    clipped = index.rank(query, SearchOptions(online=True, online_top=1000))  # R > database: all re-aggregated
    assert list(clipped.ids) == list(everything.ids) and clipped.scores == pytest.approx(everything.scores, abs=1e-6)


def test_refine_is_unwhitened_online_aggregation_over_the_query_top_8_classes(tiny, index):
    """SearchOptions.refine(): OnA with the query's top 8 classes and no whitening: each database image's raw class
    vectors for those classes, l2-normalised, summed, l2-normalised (Eq. 4 and section 3 without the PCA step),
    scored against the query's alike."""
    _, _, _, query_path, box = tiny
    options = SearchOptions.refine()
    assert (options.online, options.online_classes, options.online_whitening) == (True, 8, False)
    query = index.describe_query(query_path, box, options)
    ranking = index.rank(query, options)
    weight = index.describer.backbone.classifier_weight
    raw = online_descriptors(index.maps, np.arange(len(index)), query.classes[:8], weight, None)
    q = torch.nn.functional.normalize(query.vectors[:8].sum(0), dim=0).numpy()  # query.vectors are l2-normalised
    assert raw.shape[1] == index.maps.features.channels  # the raw feature space, not the whitened one
    assert ranking.scores == pytest.approx(np.sort(raw @ q)[::-1], abs=1e-5)
    assert list(ranking.ids) == list(np.argsort(-(raw @ q), kind="stable"))
    for bad in ({"rerank": 5}, {"qe": 2}):
        with pytest.raises(CamRetrievalError, match="raw feature space"):
            SearchOptions(online=True, online_whitening=False, **bad)


def test_online_aggregation_is_bounded_by_default(tiny, index, monkeypatch):
    """By default OnA re-aggregates the top DEFAULT_ONLINE_TOP of plain search: a small index entirely, a large one
    (here: a default of 4) only its top, exactly as an explicit --online-top."""
    _, _, _, query_path, box = tiny
    query = index.describe_query(query_path, box, SearchOptions(online=True))
    everything = index.rank(query, SearchOptions(online=True, online_top=0))
    default = index.rank(query, SearchOptions(online=True))
    assert list(default.ids) == list(everything.ids) and default.scores == pytest.approx(everything.scores, abs=1e-6)
    monkeypatch.setattr(refinement_module, "DEFAULT_ONLINE_TOP", 4)
    assert SearchOptions(online=True).online_limit(len(index)) == 4
    bounded, explicit = index.rank(query, SearchOptions(online=True)), index.rank(query, SearchOptions(online=True, online_top=4))
    assert list(bounded.ids) == list(explicit.ids)
    assert list(bounded.ids[4:]) == list(index.rank(query).ids[4:])  # past the top 4: plain search's order


def test_channel_weights_from_fractions_is_eq_3(index):
    X = torch.from_numpy(index.maps.features.image(0).astype(np.float32)).permute(2, 0, 1).unsqueeze(0)
    X[0, :5] = 0  # channels with no positive entry get weight 0
    fractions = (X > 0).float().mean(dim=(2, 3))
    assert torch.equal(channel_weights_from_fractions(fractions), channel_weights(X))


def test_batched_regions_equal_cropping_and_the_plain_definition(tiny, index):
    _, _, _, query_path, box = tiny
    query = index.describe_query(query_path, box, SearchOptions(rerank=1))
    backbone = index.describer.backbone
    weight, strides, w = backbone.classifier_weight, (32, 32), index.whitening
    classes, q_re = query.classes[:6], query.descriptor(6, w)
    candidates = np.array([5, 0, 8, 3, 1, 7, 2, 6, 4])
    batched = region_scores(index.maps, candidates, classes, q_re, weight, w, strides)
    cropped = region_scores(index.maps, candidates, classes, q_re, weight, w, strides, crop=True)
    assert batched.scores == pytest.approx(cropped.scores, abs=1e-5)
    assert batched.descriptors == pytest.approx(cropped.descriptors, abs=1e-5)
    assert batched.boxes == cropped.boxes and any(b is not None for b in batched.boxes)
    # One winning region written out: the cells of its box, Eq. 1-4 on them, aggregated.
    i = next(i for i, b in enumerate(batched.boxes) if b is not None)
    col1, row1, col2, row2 = batched.boxes[i]
    cells = index.maps.features.image(int(candidates[i])).astype(np.float64)[row1:row2, col1:col2].transpose(2, 0, 1)
    vectors = _plain_class_vectors(cells, cells, weight.double().numpy(), classes.tolist())
    plain = reference_descriptor(vectors, w.mean_, w.components_, w.eigenvalues_)
    assert batched.descriptors[i] == pytest.approx(plain, abs=1e-5)
    assert batched.scores[i] == pytest.approx(float(plain @ q_re), abs=1e-5)
    maps = torch.from_numpy(index.maps.features.image(int(candidates[i])).astype(np.float32))
    one = cropped_region_class_vectors(maps, maps, weight, classes, batched.boxes[i], 32, strides)
    assert one.numpy() == pytest.approx(vectors, abs=1e-5)


def test_reranking_resorts_the_top_r_and_never_modifies_the_index(tiny, index):
    index_dir, _, _, query_path, box = tiny
    before_files = _file_hashes(index_dir)
    before_descriptors = index.descriptors.copy()
    before_cells = np.array(index.maps.features.parts[0])
    query = index.describe_query(query_path, box, SearchOptions(online=True, rerank=1))
    plain = index.rank(query)
    reranked = index.rank(query, SearchOptions(rerank=4))
    assert set(reranked.ids[:4]) == set(plain.ids[:4]) and list(reranked.ids[4:]) == list(plain.ids[4:])
    assert list(reranked.scores[:4]) == sorted(reranked.scores[:4], reverse=True)
    assert set(reranked.overrides) == set(plain.ids[:4].tolist())
    # Every refinement, several queries in a row: the files and the arrays in memory stay byte-identical.
    for options in [SearchOptions(rerank=100, qe=3), SearchOptions(online=True, rerank=5, qe=2, qe_alpha=3.0)]:
        index.search([query_path, query_path], [box, None], top=5, options=options)
    assert _file_hashes(index_dir) == before_files
    assert index.descriptors.tobytes() == before_descriptors.tobytes()
    assert np.array(index.maps.features.parts[0]).tobytes() == before_cells.tobytes()
    again = index.rank(query)
    assert list(again.ids) == list(plain.ids) and np.array_equal(again.scores, plain.scores)


def test_r_and_qe_larger_than_the_database_are_clipped(tiny, index):
    _, _, _, query_path, box = tiny
    query = index.describe_query(query_path, box, SearchOptions(online=True, rerank=1))
    for big, small in [(SearchOptions(rerank=1000), SearchOptions(rerank=9)),
                       (SearchOptions(qe=1000), SearchOptions(qe=9)),
                       (SearchOptions(rerank=50, qe=50, qe_alpha=2.0), SearchOptions(rerank=9, qe=9, qe_alpha=2.0))]:
        a, b = index.rank(query, big), index.rank(query, small)
        assert len(a.ids) == 9 and list(a.ids) == list(b.ids) and np.array_equal(a.scores, b.scores)
    excluded = index.rank(query, SearchOptions(rerank=1000, qe=1000), exclude=[0, 3])
    assert len(excluded.ids) == 7 and not {0, 3} & set(excluded.ids.tolist())
    assert len(index.search([query_path], [box], top=50, options=SearchOptions(rerank=100))[0]) == 9


def test_query_expansion_is_its_formula(tiny, index):
    rng = np.random.default_rng(1)
    q = rng.normal(size=16)
    q /= np.linalg.norm(q)
    d = rng.normal(size=(4, 16))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    average = (q + d.sum(axis=0)) / np.linalg.norm(q + d.sum(axis=0))
    assert expanded_query(q, d) == pytest.approx(average, abs=1e-6)
    s = np.clip(d @ q, 0, None)
    alpha = (q + (s**3) @ d) / np.linalg.norm(q + (s**3) @ d)
    assert expanded_query(q, d, alpha=3.0) == pytest.approx(alpha, abs=1e-6)
    assert list(expansion_weights(q, d, 0.0)) == [1.0] * 4
    assert expanded_query(q, d[:0]) == pytest.approx(q, abs=1e-7)

    # Through the index: the top-K results, each as the descriptor it was ranked with, and a new search.
    _, _, _, query_path, box = tiny
    query = index.describe_query(query_path, box, SearchOptions(rerank=1))
    first = index.rank(query, SearchOptions(rerank=3))
    for k, a in [(2, 0.0), (5, 3.0)]:
        expanded = index.rank(query, SearchOptions(rerank=3, qe=k, qe_alpha=a, qe_gate=0))  # the paper's QE: all K
        neighbours = first.descriptors(first.ids[:k])
        assert np.array_equal(neighbours[0], first.overrides[int(first.ids[0])])  # a re-ranked one: its best region
        new_query = expanded_query(first.query, neighbours, a)
        everything = index.descriptors @ new_query
        for i, region in first.overrides.items():
            everything[i] = region @ new_query
        assert expanded.scores == pytest.approx(everything[expanded.ids], abs=1e-6)
        assert list(expanded.ids) == list(np.argsort(-everything, kind="stable"))


def test_reciprocal_neighbours_is_its_definition():
    """Result i passes the gate when q . d_i is at least the k-th largest of d_i's similarities (ties pass)."""
    around = np.array([[0.9, 0.5, 0.1, -np.inf], [0.9, 0.5, 0.1, 0.3], [0.2, -np.inf, -np.inf, -np.inf]])
    query = np.array([0.5, 0.49, -1.0])
    assert reciprocal_neighbours(query, around, 1).tolist() == [False, False, False]
    assert reciprocal_neighbours(query, around, 2).tolist() == [True, False, True]  # row 3: fewer than 2 candidates
    assert reciprocal_neighbours(query, around, 3).tolist() == [True, True, True]
    with pytest.raises(CamRetrievalError, match="at least 1"):
        reciprocal_neighbours(query, around, 0)


def test_gated_expansion_expands_with_the_reciprocal_results_only():
    """Refinement.expand(gate=k) against the gate written out with loops, on random descriptors in near-duplicate
    pairs: the expanded query is QE over the results that pass; when none passes, the ranking is the first one."""
    rng = np.random.default_rng(4)
    images = rng.normal(size=(20, 8))
    descriptors = np.concatenate([images, images + 0.05 * rng.normal(size=(20, 8))]).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    refinement = Refinement(descriptors, None, 64, None, None)
    kinds = set()
    for q, k in [(q, k) for q in range(10) for k in (1, 3, 6)]:
        query = descriptors[q] + 0.4 * rng.normal(size=8).astype(np.float32)
        query /= np.linalg.norm(query)
        excluded = [q]
        scores = descriptors @ query
        ids = np.array([i for i in np.argsort(-scores.astype(np.float64), kind="stable") if i not in excluded])
        first = Ranking(ids, scores[ids], descriptors, query=query)
        top = 5
        passed = []
        for i in ids[:top].tolist():
            others = sorted((float(descriptors[i] @ descriptors[j]) for j in ids.tolist() if j != i), reverse=True)
            passed.append(float(scores[i]) >= others[k - 1])
        kinds.add((any(passed), all(passed)))
        gated = refinement.expand(first, top, 0.0, gate=k)
        if not any(passed):
            assert gated is first
            continue
        expected = expanded_query(query, descriptors[ids[:top][passed]])
        again = descriptors @ expected
        again[excluded] = -np.inf
        assert list(gated.ids) == [i for i in np.argsort(-again.astype(np.float64), kind="stable") if i not in excluded]
        assert gated.scores == pytest.approx(again[gated.ids], abs=1e-6)
    assert kinds >= {(True, False), (False, False)}  # some queries partly gated, some not expanded at all


def test_a_candidate_without_a_usable_region_is_scored_by_its_whole_image(tiny, index):
    _, _, _, query_path, box = tiny
    query = index.describe_query(query_path, box, SearchOptions(rerank=1))
    weight, w = index.describer.backbone.classifier_weight, index.whitening
    classes, q_re = query.classes[:6], query.descriptor(6, w)
    everything = np.arange(len(index))
    # Every proposal under a minimum size larger than the images: no region anywhere.
    none = region_scores(index.maps, everything, classes, q_re, weight, w, (32, 32), min_size=10_000)
    whole = online_descriptors(index.maps, everything, classes, weight, w)
    assert none.boxes == [None] * len(index)
    assert none.scores == pytest.approx(whole @ q_re, abs=1e-5)


def test_cams_with_no_positive_value_give_finite_scores():
    """All-zero maps, and CAMs negative everywhere: no NaN, no proposals, the whole-image fallback."""
    rng = np.random.default_rng(2)
    height, width, channels = 3, 4, 8
    cells = np.abs(rng.normal(size=(2 * height * width, channels))).astype(np.float16)
    cells[: height * width] = 0  # image 0: all-zero maps
    table = np.array([[0, height, width], [height * width, height, width]], dtype=np.int64)
    store = MapStore(RaggedMaps([cells], table))
    weight = -torch.rand(10, channels)  # positive maps x negative weights: every CAM is negative (image 1)
    whitening = PCAWhitening(4).fit(np.abs(rng.normal(size=(50, channels))))
    query = np.ones(4, dtype=np.float32) / 2
    result = region_scores(store, [0, 1], [3, 1, 4], query, weight, whitening, (32, 32), min_size=1)
    assert np.isfinite(result.scores).all() and np.isfinite(result.descriptors).all()
    assert result.boxes == [None, None]
    assert np.isfinite(online_descriptors(store, [0, 1], [3, 1, 4], weight, whitening)).all()


def test_an_index_without_maps_says_how_to_rebuild(tiny, index, tmp_path, capsys):
    index_dir, database, pca, query_path, box = tiny
    bare = Index.open(index_dir)
    bare.maps = None
    bare.save(tmp_path / "bare")  # saved without maps
    reopened = Index.open(tmp_path / "bare")
    assert reopened.maps is None and not any("maps" in p.name for p in (tmp_path / "bare").rglob("*"))
    for options in [SearchOptions(online=True), SearchOptions(rerank=10)]:
        with pytest.raises(MapsNotStoredError, match=r"camretrieval index .*without --no-maps"):
            reopened.search([query_path], [box], options=options)
    assert reopened.search([query_path], [box], top=3, options=SearchOptions(qe=2))  # QE needs no maps
    assert main(["search", str(tmp_path / "bare"), str(query_path), "--rerank", "10"]) == 2
    assert "without --no-maps" in capsys.readouterr().err
    # camretrieval index --no-maps: no maps stored.
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((database / "car1").iterdir())[:2]:
        (few / path.name).symlink_to(path.resolve())
    args = ["index", str(few), str(tmp_path / "rebuilt"), "--pca", str(pca), "--no-maps", "--workers", "0", "--quiet"]
    assert main(args) == 0
    assert Index.open(tmp_path / "rebuilt").maps is None
    assert not any("maps" in p.name for p in (tmp_path / "rebuilt").rglob("*"))


def test_search_flags_through_the_cli(tiny, index, capsys):
    index_dir, _, _, query_path, box = tiny
    base = ["search", str(index_dir), str(query_path), "--box", ",".join(str(v) for v in box), "--json", "--top", "9"]
    query = index.describe_query(query_path, box, SearchOptions(online=True, online_classes=4, rerank=1))
    flags = {
        (): SearchOptions(),
        ("--online",): SearchOptions(online=True),
        ("--online", "--online-classes", "4", "--online-top", "5"): SearchOptions(online=True, online_classes=4, online_top=5),
        ("--rerank", "100", "--rerank-classes", "3"): SearchOptions(rerank=100, rerank_classes=3),
        ("--qe", "2"): SearchOptions(qe=2),
        ("--refine",): SearchOptions.refine(),
        ("--online", "--online-unwhitened", "--online-top", "0"): SearchOptions(online=True, online_whitening=False, online_top=0),
        ("--rerank", "5", "--qe", "3", "--qe-alpha", "3"): SearchOptions(rerank=5, qe=3, qe_alpha=3.0),
        ("--qe", "3", "--qe-gate", "2"): SearchOptions(qe=3, qe_gate=2),
        ("--qe", "3", "--qe-gate", "0"): SearchOptions(qe=3, qe_gate=0),
    }
    for extra, options in flags.items():
        assert main(base + list(extra)) == 0, extra
        hits = json.loads(capsys.readouterr().out)[0]["results"]
        expected = index.rank(query, options)
        assert [h["path"] for h in hits] == [index.paths[i] for i in expected.ids], extra
        assert [h["score"] for h in hits] == pytest.approx(expected.scores.tolist(), abs=1e-5), extra
    for bad in [["--qe-alpha", "2"], ["--online-top", "3"], ["--rerank", "-1"], ["--online", "--online-classes", "0"],
                ["--refine", "--qe", "2"], ["--refine", "--online"], ["--online-unwhitened"],
                ["--online", "--online-unwhitened", "--rerank", "3"], ["--qe-gate", "3"], ["--qe", "2", "--qe-gate", "-1"]]:
        assert main(base + bad) == 2, bad
        assert "error" in capsys.readouterr().err
