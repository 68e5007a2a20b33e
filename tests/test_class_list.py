"""A fixed list of classes (the paper's section 4.3): learning it, its file, the descriptor made with it, and the
command line through learn-classes -> fit-pca -> index -> search -> eval."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from camretrieval.cli import main
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.describer import Describer, check_whitening
from camretrieval.extraction.fitting import learn_classes
from camretrieval.extraction.settings import ExtractionSettings
from camretrieval.method.aggregation import aggregate
from camretrieval.method.class_list import ClassList, ClassListError, learn_class_list, most_frequent_classes
from camretrieval.method.feature_maps import FeatureMaps
from camretrieval.method.pooling import class_weighted_vectors
from camretrieval.method.whitening import PCAWhitening, WhiteningFileError
from camretrieval.search import Index, SearchOptions
from reference import reference_class_list, reference_descriptor, reference_listed_class_vectors

SIZE = 128


# --- learning the list ---


@pytest.mark.parametrize("seed, images, classes, top, length", [(0, 6, 10, 3, 4), (1, 9, 30, 5, 8), (2, 4, 12, 12, 20)])
def test_learned_list_is_the_plain_count_of_top_classes(seed, images, classes, top, length):
    scores = np.random.default_rng(seed).normal(size=(images, classes))
    got_classes, got_counts = learn_class_list(torch.tensor(scores), top, length)
    expected_classes, expected_counts = reference_class_list(scores, top, length)
    assert got_classes.tolist() == expected_classes
    assert got_counts.tolist() == expected_counts


def test_ties_go_to_the_better_ranks_then_the_smaller_index():
    ranked = np.array([[7, 3, 5], [3, 7, 9], [5, 9, 2]])  # counts: 3, 5, 7, 9 twice; 2 once
    # rank sums (0 = best): 7 -> 0 + 1 = 1, 3 -> 1 + 0 = 1, 5 -> 2 + 0 = 2, 9 -> 2 + 1 = 3
    classes, counts = most_frequent_classes(ranked, 5)
    assert classes.tolist() == [3, 7, 5, 9, 2] and counts.tolist() == [2, 2, 2, 2, 1]
    assert most_frequent_classes(ranked, 2)[0].tolist() == [3, 7]
    assert most_frequent_classes(ranked[::-1], 5)[0].tolist() == [3, 7, 5, 9, 2]  # image order does not matter


def test_learning_refuses_nonsense():
    with pytest.raises(CamRetrievalError, match="at least 1"):
        learn_class_list(torch.zeros(2, 5), 3, 0)
    with pytest.raises(CamRetrievalError, match="at least 1"):
        learn_class_list(torch.zeros(2, 5), 0, 3)
    with pytest.raises(CamRetrievalError, match="at least one image"):
        most_frequent_classes(np.zeros((0, 3)), 3)


# --- the descriptor with a fixed list ---


def _maps(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    activations = torch.relu(torch.randn(3, 8, 3, 4, generator=generator, dtype=torch.float64))
    features = torch.relu(torch.randn(3, 5, 3, 4, generator=generator, dtype=torch.float64))
    weight = torch.randn(20, 8, generator=generator, dtype=torch.float64)
    bias = torch.randn(20, generator=generator, dtype=torch.float64)
    return FeatureMaps(features, activations), weight, bias


def test_fixed_list_descriptor_is_the_listed_class_vectors_summed():
    maps, weight, bias = _maps()
    listed = [17, 2, 5, 11]
    rng = np.random.default_rng(1)
    whitening = PCAWhitening(4).fit(rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)))
    got = class_weighted_vectors(maps, weight, bias, n_classes=4, class_list=listed)
    descriptors = aggregate(got.vectors, whitening)
    for b in range(3):
        assert got.classes[b].tolist() == listed  # every image the same classes, whatever its own scores
        vectors = reference_listed_class_vectors(maps.features[b].numpy(), maps.cam_activations[b].numpy(), weight.numpy(), listed)
        assert got.vectors[b].numpy() == pytest.approx(vectors, abs=1e-9)
        expected = reference_descriptor(vectors, whitening.mean_, whitening.components_, whitening.eigenvalues_)
        assert descriptors[b].numpy() == pytest.approx(expected, abs=1e-9)
    # Asked for fewer classes (e.g. N_pca = 1 to learn the whitening): the list's first ones.
    first = class_weighted_vectors(maps, weight, bias, n_classes=1, class_list=listed)
    assert torch.equal(first.vectors, got.vectors[:, :1])


def test_the_list_replaces_each_images_own_top_classes():
    maps, weight, bias = _maps()
    own = class_weighted_vectors(maps, weight, bias, n_classes=3)
    same_as_own = class_weighted_vectors(maps, weight, bias, n_classes=3, class_list=own.classes[0].tolist())
    assert torch.equal(same_as_own.vectors[0], own.vectors[0])
    assert not torch.equal(same_as_own.classes[1:], own.classes[1:])  # the others have other top classes


def test_describer_with_a_list_records_it_and_whitening_must_match(lite0):
    describer = Describer(lite0, size=SIZE, class_list=[948, 817, 4])
    assert describer.n_classes == 3 and describer.class_list.tolist() == [948, 817, 4]
    assert describer.settings.to_dict()["class_list"] == [948, 817, 4]
    assert "class_list" not in Describer(lite0, size=SIZE).settings.to_dict()  # settings without a list unchanged
    learned_without = PCAWhitening(8, ExtractionSettings(lite0.name, lite0.feature_layer, lite0.cam_layer, SIZE).to_dict())
    with pytest.raises(WhiteningFileError, match="class_list: learned with each image's own top classes, used with a fixed list of 3"):
        check_whitening(learned_without, describer.settings)
    learned_with = PCAWhitening(8, describer.settings.to_dict())
    with pytest.raises(WhiteningFileError, match="class_list: learned with a fixed list of 3 classes, used with each"):
        check_whitening(learned_with, Describer(lite0, size=SIZE).settings)
    with pytest.raises(WhiteningFileError, match="class_list"):
        Describer(lite0, size=SIZE, whitening=learned_with, class_list=[948, 817, 5])
    # A whitening learned with a list brings it.
    assert Describer(lite0, size=SIZE, whitening=learned_with).class_list.tolist() == [948, 817, 4]


def test_describer_refuses_bad_lists(lite0):
    with pytest.raises(ClassListError, match="0..999"):
        Describer(lite0, class_list=[3, 1000])
    with pytest.raises(ClassListError, match="twice"):
        Describer(lite0, class_list=[3, 3])
    with pytest.raises(ClassListError, match="empty"):
        Describer(lite0, class_list=[])
    with pytest.raises(CamRetrievalError, match="class-weighted pooling"):
        Describer(lite0, pooling="gem", class_list=[3])
    other = ClassList([1, 2], [5, 4], "efficientnet_lite2", 448, 8, 5)
    with pytest.raises(ClassListError, match="learned with 'efficientnet_lite2', not 'efficientnet_lite0'"):
        Describer(lite0, class_list=other)


# --- the file ---


def test_file_round_trip_with_names(tmp_path, lite0, eth80_dir):
    paths = [f"{o}/{o}-000-000.jpg" for o in ("apple1", "car1", "cup1", "tomato1")]
    listed, failures = learn_classes(Describer(lite0, size=SIZE), paths, eth80_dir, top=5, length=6, progress=False)
    assert not failures and listed.n_images == 4 and listed.top == 5 and listed.size == SIZE
    assert len(listed) == 6 and list(listed.counts) == sorted(listed.counts, reverse=True)
    assert listed.names is not None and len(listed.names) == 6 and all(listed.names)
    listed.save(tmp_path / "classes.json")
    loaded = ClassList.load(tmp_path / "classes.json", lite0)
    assert loaded == listed
    data = json.loads((tmp_path / "classes.json").read_text())
    assert data["backbone"] == "efficientnet_lite0" and data["classes"][0] == {
        "index": listed.classes[0], "count": listed.counts[0], "name": listed.names[0]
    }


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\xff not json", "cannot read the class list"),
        (b"[1, 2, 3]", "is not a class list"),
        (json.dumps({"format": "camretrieval-class-list", "version": 9}).encode(), "version 9"),
        (json.dumps({"format": "camretrieval-class-list", "version": 1, "backbone": "efficientnet_lite0", "size": 448,
                     "top": 8, "n_images": 3, "classes": [{"index": "7", "count": 1}]}).encode(), "index must be an integer"),
        (json.dumps({"format": "camretrieval-class-list", "version": 1, "backbone": "efficientnet_lite0", "size": 448,
                     "top": 8, "n_images": 3, "classes": []}).encode(), "empty"),
        (json.dumps({"format": "camretrieval-class-list", "version": 1, "backbone": "efficientnet_lite0",
                     "top": 8, "n_images": 3, "classes": [{"index": 7, "count": 1}]}).encode(), "missing 'size'"),
        (json.dumps({"format": "camretrieval-class-list", "version": 1, "backbone": "efficientnet_lite0", "size": 448,
                     "top": 8, "n_images": 3, "classes": [{"index": 7, "count": 1}, {"index": 7, "count": 1}]}).encode(), "twice"),
        (json.dumps({"format": "camretrieval-class-list", "version": 1, "backbone": "efficientnet_lite0", "size": 448,
                     "top": 8, "n_images": 3, "classes": [{"index": 1000, "count": 1}]}).encode(), "0..999"),
        (json.dumps({"format": "camretrieval-class-list", "version": 1, "backbone": "resnet50", "size": 448,
                     "top": 8, "n_images": 3, "classes": [{"index": 1, "count": 1}]}).encode(), "learned with 'resnet50'"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, lite0, content, message):
    path = tmp_path / "classes.json"
    path.write_bytes(content)
    with pytest.raises(ClassListError, match=message):
        ClassList.load(path, lite0)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ClassListError, match="cannot read the class list .*nowhere.json"):
        ClassList.load(tmp_path / "nowhere.json")


# --- the command line ---


def test_cli_learn_classes_fit_pca_index_search_eval(tmp_path, eth80_dir, capsys):
    def camretrieval(*args: str) -> subprocess.CompletedProcess:  # in this process: torch is loaded once
        returncode = main(list(args))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, returncode, out, err)

    examples, database = tmp_path / "examples", tmp_path / "database"
    for obj in ["apple1", "car1", "cow1", "cup1"]:  # example images of the theme, other objects than the database's
        target = examples / obj
        target.mkdir(parents=True)
        for image in sorted((eth80_dir / obj).glob("*.jpg"))[::2]:
            shutil.copy(image, target / image.name)
    for obj in ["apple2", "car2"]:
        target = database / obj
        target.mkdir(parents=True)
        for image in sorted((eth80_dir / obj).glob("*.jpg"))[::8]:
            shutil.copy(image, target / image.name)
    classes_file, pca, plain_pca, index_dir = tmp_path / "classes.json", tmp_path / "pca.npz", tmp_path / "plain.npz", tmp_path / "index"
    common = ["--size", str(SIZE), "--workers", "1", "--quiet"]

    result = camretrieval("learn-classes", str(examples), "--output", str(classes_file), "--top", "8", "--classes", "12", *common)
    assert result.returncode == 0, result.stderr
    assert "learned 12 classes from the top 8 of 84 images" in result.stdout
    listed = ClassList.load(classes_file)
    assert len(listed) == 12 and listed.n_images == 84

    result = camretrieval("fit-pca", str(examples), str(pca), "--dim", "16", "--class-list", str(classes_file), *common)
    assert result.returncode == 0, result.stderr
    assert "class list of 12" in result.stdout
    assert PCAWhitening.load(pca).settings["class_list"] == list(listed.classes)

    result = camretrieval("index", str(database), str(index_dir), "--pca", str(pca), "--class-list", str(classes_file), "--quiet")
    assert result.returncode == 0, result.stderr
    index = Index.open(index_dir)
    assert index.settings["class_list"] == list(listed.classes) and index.settings["n_classes"] == 12
    describer = index.describer
    assert describer.class_list.tolist() == list(listed.classes)
    # The stored descriptors are the fixed-list descriptors, and a query is described alike.
    first = database / index.paths[0]
    pooled = describer.image_vectors(first)
    assert pooled.classes[0].tolist() == list(listed.classes)
    expected = aggregate(pooled.vectors, index.whitening)[0].numpy()
    assert index.descriptors[0] == pytest.approx(expected, abs=1e-5)

    result = camretrieval("search", str(index_dir), str(first), "--top", "3", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)[0]["results"]
    assert hits[0]["path"] == index.paths[0] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    refined = index.search([first], top=3, options=SearchOptions(online=True, online_classes=4, rerank=5))
    assert refined[0][0].path == index.paths[0]

    # The same index from the PCA file alone (it brings its list); a list that is not the PCA's is refused.
    result = camretrieval("index", str(database), str(tmp_path / "index2"), "--pca", str(pca), "--quiet")
    assert result.returncode == 0, result.stderr
    assert Index.open(tmp_path / "index2").descriptors == pytest.approx(index.descriptors, abs=1e-6)
    result = camretrieval("fit-pca", str(examples), str(plain_pca), "--dim", "16", *common)
    assert result.returncode == 0, result.stderr
    result = camretrieval("index", str(database), str(tmp_path / "index3"), "--pca", str(plain_pca), "--class-list", str(classes_file))
    assert result.returncode == 2 and "learned without a class list" in result.stderr

    result = camretrieval("eval", "--images", str(database), "--pca", str(pca), "--json", "--quiet", "--workers", "1")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["settings"]["class_list"] == list(listed.classes) and record["settings"]["n_classes"] == 12
    assert record["variant"] == "cam, class list of 12"
    result = camretrieval("eval", "--images", str(database), "--pca", str(plain_pca), "--class-list", str(classes_file))
    assert result.returncode == 2 and "learned without a class list" in result.stderr
