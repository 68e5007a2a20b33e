"""Dataset loaders: the three Oxford ground-truth formats agree, revisited sets, the restricted unpickler, label
folders with boxes, UKBench, Holidays, distractors and lookup by name."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.datasets import (
    DATASET_NAMES,
    DatasetError,
    RetrievalDataset,
    UnsafePickleError,
    classic_from_mat,
    classic_from_text,
    from_revisitop_pickle,
    holidays,
    image_folder,
    load_dataset,
    safe_load_pickle,
    ukbench,
    with_distractors,
)
from camretrieval.evaluation.metrics import evaluate


def names_of(dataset: RetrievalDataset, indices: np.ndarray) -> set[str]:
    names = dataset.image_names
    return {names[i] for i in indices}


def touch(folder: Path, *names: str) -> None:
    """Tiny placeholder image files: the loaders read names, not pixels."""
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8\xff")


# --- classic Oxford: text, .mat and pickle agree -------------------------------------------------------------


@pytest.fixture(scope="module")
def oxford_text(gnd_dir):
    return classic_from_text(gnd_dir / "oxford5k_gt_files")


@pytest.fixture(scope="module")
def oxford_mat(gnd_dir):
    return classic_from_mat(gnd_dir / "gnd_oxford5k.mat")


def test_oxford_text_and_mat_agree_on_all_55_queries(oxford_text, oxford_mat):
    assert len(oxford_text.queries) == len(oxford_mat.queries) == 55
    assert len(oxford_mat.images) == 5063
    for text_query, mat_query, text_gnd, mat_gnd in zip(oxford_text.queries, oxford_mat.queries, oxford_text.gnd,
                                                        oxford_mat.gnd):
        assert text_query.name == mat_query.name
        assert text_query.box == pytest.approx(mat_query.box)
        # the query image is a database image in the classic sets, and is the one named
        query_name = text_query.name
        assert oxford_text.image_names[text_query.db_index] == oxford_mat.image_names[mat_query.db_index] == query_name
        assert names_of(oxford_text, text_gnd["ok"]) == names_of(oxford_mat, mat_gnd["ok"])
        assert names_of(oxford_text, text_gnd["junk"]) == names_of(oxford_mat, mat_gnd["junk"])
    assert oxford_text.queries[0].label == "all_souls_1" and oxford_text.queries[-1].label == "radcliffe_camera_5"


def test_duplicate_in_good_list_is_counted_once(gnd_dir, oxford_text):
    folder = gnd_dir / "oxford5k_gt_files"
    listed = (folder / "all_souls_1_good.txt").read_text().split() + (folder / "all_souls_1_ok.txt").read_text().split()
    assert len(listed) == len(set(listed)) + 1  # the duplicate the README warns about
    assert len(oxford_text.gnd[0]["ok"]) == len(set(listed)) == 78


def test_revisited_oxford_keeps_the_55_classic_queries_and_boxes(gnd_dir, oxford_mat):
    revisited = from_revisitop_pickle(gnd_dir / "gnd_roxford5k.pkl")
    for classic_query, revisited_query in zip(oxford_mat.queries, revisited.queries[:55]):
        assert revisited_query.name == classic_query.name
        assert revisited_query.box == pytest.approx(classic_query.box)
    # revisited positives of a classic query are images of the classic database
    assert names_of(revisited, revisited.gnd[0]["easy"]) <= set(oxford_mat.image_names)


def test_cirtorch_classic_pickle_agrees_with_mat(tmp_path, oxford_mat):
    # cirtorch ships gnd_oxford5k.pkl (imlist, qimlist, gnd with ok/junk/bbx as NumPy arrays); build one from the
    # .mat, in every pickle protocol, and load it through the restricted unpickler
    names = oxford_mat.image_names
    for protocol in (2, 3, 4, 5):
        data = {
            "imlist": names,
            "qimlist": [query.name for query in oxford_mat.queries],
            "gnd": [{"ok": g["ok"].astype(np.uint16), "junk": g["junk"], "bbx": np.array(q.box)}
                    for g, q in zip(oxford_mat.gnd, oxford_mat.queries)],
        }
        folder = tmp_path / str(protocol) / "oxford5k"
        folder.mkdir(parents=True)
        (folder / "gnd_oxford5k.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
        loaded = load_dataset("oxford5k", tmp_path / str(protocol))
        assert loaded.protocol == "classic" and loaded.images == oxford_mat.images
        assert loaded.root == folder / "jpg"
        for a, b, qa, qb in zip(loaded.gnd, oxford_mat.gnd, loaded.queries, oxford_mat.queries):
            np.testing.assert_array_equal(a["ok"], b["ok"])
            np.testing.assert_array_equal(a["junk"], b["junk"])
            assert qa == qb


def test_text_format_with_an_image_folder(tmp_path, gnd_dir, oxford_text):
    image_dir = tmp_path / "oxford5k" / "jpg"
    touch(image_dir, *[f"{name}.jpg" for name in oxford_text.image_names], "extra_000001.jpg")
    dataset = classic_from_text(gnd_dir / "oxford5k_gt_files", image_dir=image_dir)
    assert len(dataset.images) == len(oxford_text.images) + 1  # the database is the folder
    assert names_of(dataset, dataset.gnd[3]["ok"]) == names_of(oxford_text, oxford_text.gnd[3]["ok"])
    os.remove(image_dir / "all_souls_000013.jpg")
    with pytest.raises(DatasetError, match="all_souls_000013.jpg"):
        classic_from_text(gnd_dir / "oxford5k_gt_files", image_dir=image_dir)


def test_paris_mat(gnd_dir):
    paris = load_dataset("paris6k", gnd_dir)  # the flat layout of the shared folder also works
    assert (len(paris.images), len(paris.queries)) == (6392, 55)
    assert paris.queries[0].name == "paris_defense_000605" and paris.queries[0].box is not None
    assert all(len(g["ok"]) > 0 for g in paris.gnd)


# --- revisited sets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_images"), [("roxford5k", 4993), ("rparis6k", 6322)])
def test_revisited_sets_load_in_the_revisitop_layout(tmp_path, gnd_dir, name, n_images):
    (tmp_path / name).mkdir()
    (tmp_path / name / f"gnd_{name}.pkl").symlink_to(gnd_dir / f"gnd_{name}.pkl")
    dataset = load_dataset(name.upper(), tmp_path)  # names are case-insensitive; no jpg folder needed
    raw = safe_load_pickle(gnd_dir / f"gnd_{name}.pkl")
    assert dataset.protocol == "revisited"
    assert (len(dataset.images), len(dataset.queries)) == (n_images, 70)
    assert dataset.image_names == raw["imlist"] and [q.name for q in dataset.queries] == raw["qimlist"]
    assert dataset.image_path(0) == tmp_path / name / "jpg" / f"{raw['imlist'][0]}.jpg"
    assert dataset.query_path(0) == tmp_path / name / "jpg" / f"{raw['qimlist'][0]}.jpg"
    for query, entry, raw_entry in zip(dataset.queries, dataset.gnd, raw["gnd"]):
        assert query.db_index is None  # revisited query images are not in the database
        assert query.box == pytest.approx(tuple(raw_entry["bbx"]))
        for key in ("easy", "hard", "junk"):
            assert sorted(entry[key].tolist()) == sorted(raw_entry[key])


def test_image_paths_follow_sub_folders(tmp_path):
    # Paris ships its images in one folder per landmark: names are found wherever they are under jpg/
    touch(tmp_path / "toy" / "jpg", "defense/paris_defense_000001.jpg", "eiffel/paris_eiffel_000002.jpg")
    data = {"imlist": ["paris_defense_000001", "paris_eiffel_000002"], "qimlist": ["paris_eiffel_000002"],
            "gnd": [{"bbx": [1, 2, 3, 4], "ok": [0, 1], "junk": []}]}
    (tmp_path / "toy" / "gnd_toy.pkl").write_bytes(pickle.dumps(data))
    dataset = from_revisitop_pickle(tmp_path / "toy" / "gnd_toy.pkl")
    assert dataset.images == ["defense/paris_defense_000001.jpg", "eiffel/paris_eiffel_000002.jpg"]
    assert dataset.queries[0].db_index == 1 and dataset.queries[0].box == (1.0, 2.0, 3.0, 4.0)


# --- restricted unpickler ------------------------------------------------------------------------------------


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "roxford5k" / "gnd_roxford5k.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [Exploit(marker)]}))
    with pytest.raises(UnsafePickleError, match="system") as error:
        safe_load_pickle(path)
    assert str(path) in str(error.value)
    with pytest.raises(UnsafePickleError):
        load_dataset("roxford5k", tmp_path)
    assert not marker.exists()
    assert issubclass(UnsafePickleError, CamRetrievalError)


@pytest.mark.parametrize("payload", [
    (eval, ("1+1",)),
    (getattr, (object(), "__class__")),
    (pickle.loads, (b"N.",)),
])
def test_other_callables_are_refused(tmp_path, payload):
    class Payload:
        def __reduce__(self):
            return payload

    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(UnsafePickleError):
        safe_load_pickle(path)


def test_safe_pickle_loads_arrays_and_containers(tmp_path):
    value = {"a": [1, 2.5, "x", (3, None), {4}], "b": np.arange(6, dtype=np.int16).reshape(2, 3), "c": np.float32(2)}
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        loaded = safe_load_pickle(path)
        assert loaded["a"] == value["a"] and loaded["c"] == value["c"]
        np.testing.assert_array_equal(loaded["b"], value["b"])
    (tmp_path / "broken.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a readable pickle"):
        safe_load_pickle(tmp_path / "broken.pkl")


# --- folders of labels ---------------------------------------------------------------------------------------


def test_clutter_dev_has_boxes_for_every_query(clutter_dir):
    dataset = image_folder(clutter_dir)
    assert dataset.protocol == "labels" and dataset.root == clutter_dir
    assert len(dataset.images) == len(dataset.queries) == 400
    assert len(set(dataset.labels)) == 40
    assert all(query.box is not None for query in dataset.queries)
    query = dataset.queries[0]
    assert query.path == "apple1/apple1-022-090.jpg" and query.box == (411.0, 185.0, 591.0, 376.0)
    for i, (query, g) in enumerate(zip(dataset.queries, dataset.gnd)):
        assert query.db_index == i and g["junk"].tolist() == [i]
        assert len(g["ok"]) == 9 and {dataset.labels[j] for j in g["ok"]} == {query.label}


def test_eth80_without_boxes(eth80_dir):
    dataset = image_folder(eth80_dir)
    assert len(set(dataset.labels)) == 40 and all(query.box is None for query in dataset.queries)
    assert all(len(g["ok"]) == 40 for g in dataset.gnd)  # 41 views per object, itself excluded


def test_image_folder_errors(tmp_path):
    touch(tmp_path, "a/1.jpg", "a/2.jpg", "b/3.jpg")
    (tmp_path / "boxes.json").write_text('{"a/1.jpg": [0, 0, 10, 10], "c/9.jpg": [0, 0, 5, 5]}')
    with pytest.raises(DatasetError, match="c/9.jpg"):
        image_folder(tmp_path)
    (tmp_path / "boxes.json").write_text('{"a/1.jpg": [10, 0, 5, 10]}')
    with pytest.raises(DatasetError, match="x1 < x2"):
        image_folder(tmp_path)
    dataset = image_folder(tmp_path, boxes=None)
    assert [q.box for q in dataset.queries] == [None] * 3
    with pytest.raises(DatasetError, match="not found"):
        image_folder(tmp_path, boxes="other.json")
    touch(tmp_path, "loose.jpg")
    with pytest.raises(DatasetError, match="no label"):
        image_folder(tmp_path, boxes=None)


# --- UKBench and Holidays ------------------------------------------------------------------------------------


def test_ukbench(tmp_path):
    folder = tmp_path / "ukbench" / "jpg"
    touch(folder, *[f"ukbench{i:05d}.jpg" for i in range(12)], "readme.txt")
    dataset = load_dataset("ukbench", tmp_path)
    assert dataset.root == folder and dataset.protocol == "ukbench"
    assert dataset.images[0] == "ukbench00000.jpg" and len(dataset.images) == len(dataset.queries) == 12
    assert dataset.gnd[5]["ok"].tolist() == [4, 6, 7] and dataset.gnd[5]["junk"].tolist() == [5]
    assert dataset.labels[:5] == ["0000"] * 4 + ["0001"]
    # a perfect ranking: the query first, then its group
    similarity = np.array([[2.0 if i == j else 1.0 if i // 4 == j // 4 else 0.0 for j in range(12)] for i in range(12)])
    result = evaluate(dataset, similarity)
    assert result["ns_score"] == pytest.approx(4.0) and result["map"] == pytest.approx(1.0)
    # images directly in the given folder are found too
    assert len(ukbench(folder).images) == 12
    with pytest.raises(DatasetError, match="ukbench00000.jpg"):
        ukbench(tmp_path / "ukbench" / "missing")


def test_holidays(tmp_path):
    files = ["100000.jpg", "100001.jpg", "100002.jpg", "100100.jpg", "100200.jpg", "100201.JPG"]
    touch(tmp_path, *files)
    dataset = holidays(tmp_path)
    assert dataset.images == sorted(files) and dataset.protocol == "holidays"
    assert [q.name for q in dataset.queries] == ["100000", "100100", "100200"]
    assert [q.db_index for q in dataset.queries] == [0, 3, 4]
    assert [g["ok"].tolist() for g in dataset.gnd] == [[1, 2], [], [5]]
    assert [g["junk"].tolist() for g in dataset.gnd] == [[0], [3], [4]]
    # query 100000: itself (junk), 100002, 100100 (a negative), 100001: without junk, positives at 0 and 2 -> 19/24
    ranks = np.array([[0, 2, 3, 1, 4, 5], [3, 0, 1, 2, 4, 5], [4, 5, 0, 1, 2, 3]]).T
    result = evaluate(dataset, ranks)
    assert result["aps"][0] == pytest.approx(19 / 24) and np.isnan(result["aps"][1])  # 100100 has no positives
    assert result["map"] == pytest.approx((19 / 24 + 1.0) / 2)


# --- distractors and lookup by name --------------------------------------------------------------------------


def test_with_distractors(tmp_path):
    touch(tmp_path / "set", "a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg")
    touch(tmp_path / "flickr", "x/1.jpg", "y/2.png", "3.jpg")
    dataset = image_folder(tmp_path / "set")
    extended = with_distractors(dataset, tmp_path / "flickr")
    assert extended.images[:4] == dataset.images and len(extended.images) == 7
    assert all(Path(path).is_absolute() for path in extended.images[4:])
    assert extended.image_path(4) == (tmp_path / "flickr" / "3.jpg").resolve()
    assert extended.image_path(4).is_file() and extended.image_path(0).is_file()
    assert extended.labels == [*dataset.labels, None, None, None]
    assert [g["ok"].tolist() for g in extended.gnd] == [g["ok"].tolist() for g in dataset.gnd]
    assert len(dataset.images) == 4  # the original is unchanged
    assert len(with_distractors(dataset, tmp_path / "flickr", limit=2).images) == 6
    # a distractor ranked above the positive lowers AP: query 0 (a/1), ranking [itself, distractor, a/2, ...]
    ranks = np.array([[0, 4, 1, 2, 3, 5, 6]] + [[i, *[j for j in range(7) if j != i]] for i in range(1, 4)]).T
    result = evaluate(extended, ranks)
    assert result["aps"][0] == pytest.approx(0.5 * (0 / 1 + 1 / 2))  # positive at rank 1 once junk is removed
    with pytest.raises(DatasetError, match="overlaps"):
        with_distractors(dataset, tmp_path)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_dataset("oxford105k", tmp_path)
    assert all(name in str(error.value) for name in DATASET_NAMES)
    with pytest.raises(DatasetError) as error:
        load_dataset("roxford5k", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "roxford5k" / "gnd_roxford5k.pkl") in message and "jpg" in message
    with pytest.raises(DatasetError, match="gnd_paris6k"):
        load_dataset("paris6k", tmp_path)
    with pytest.raises(DatasetError, match="holidays"):
        load_dataset("holidays", tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset("ukbench", tmp_path / "absent")
