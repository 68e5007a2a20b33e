"""The command line end to end on real photos: fit-pca, index, search (JSON and table), and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from camretrieval.cli import main, read_queries_file
from camretrieval.search.index import Index
from camretrieval.storage.catalog import IndexFileError, IndexStore

SIZE = 128  # small images keep these runs short; the defaults are exercised in test_end_to_end.py


def camretrieval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "camretrieval.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def collection(tmp_path_factory, eth80_dir):
    """A PCA learned on some ETH-80 objects and an index of three others, with a bad file among them."""
    root = tmp_path_factory.mktemp("cli")
    train, database = root / "train", root / "database"
    for obj in ["apple1", "car1", "cow1", "dog1", "horse1", "pear1", "cup1", "tomato1"]:
        shutil.copytree(eth80_dir / obj, train / obj)
    for obj in ["apple2", "cup2", "horse2"]:
        target = database / obj
        target.mkdir(parents=True)
        for image in sorted((eth80_dir / obj).glob("*.jpg"))[::4]:
            shutil.copy(image, target / image.name.upper())  # upper-case extensions are images too
    (database / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    pca = root / "pca.npz"
    result = camretrieval("fit-pca", str(train), str(pca), "--size", str(SIZE), "--dim", "64", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "learned 1280 -> 64 PCA-whitening from 328 images" in result.stdout
    index_dir = root / "index"
    result = camretrieval("index", str(database), str(index_dir), "--pca", str(pca), "--classes", "8")
    assert result.returncode == 0, result.stderr
    assert "skipped broken.jpg" in result.stderr and "skipped 1 of 34 files" in result.stderr
    assert "indexed 33 images" in result.stdout
    return root, database, pca, index_dir


def test_index_folder_holds_descriptors_paths_settings(collection):
    _, database, _, index_dir = collection
    index = Index.open(index_dir)
    assert len(index) == 33 and index.descriptors.shape == (33, 64)
    assert all(not Path(p).is_absolute() and (database / p).is_file() for p in index.paths)
    assert index.settings == {
        "backbone": "efficientnet_lite0", "feature_layer": "head", "cam_layer": "head", "size": SIZE, "pooling": "cam",
        "n_classes": 8,
        "weights": None,
    }
    assert np.allclose(np.linalg.norm(index.descriptors, axis=1), 1, atol=1e-5)
    assert IndexStore.open(index_dir).meta()["image_root"] == str(database.resolve())


def test_search_json_is_exactly_the_documented_shape(collection):
    _, database, _, index_dir = collection
    query = str(database / "cup2" / "CUP2-000-000.JPG")
    result = camretrieval("search", str(index_dir), query, "--top", "5", "--json")
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert [sorted(entry) for entry in output] == [["query", "results", "root"]]
    assert output[0]["query"] == query
    assert output[0]["root"] == str(database.resolve())  # the folder the result paths are relative to
    hits = output[0]["results"]
    assert len(hits) == 5 and all(sorted(hit) == ["path", "score"] for hit in hits)
    assert hits[0]["path"] == "cup2/CUP2-000-000.JPG" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    assert sum(hit["path"].startswith("cup2/") for hit in hits) >= 4


def test_many_queries_in_one_process_with_boxes_and_table(collection, tmp_path):
    _, database, _, index_dir = collection
    horse = database / "horse2" / "HORSE2-000-000.JPG"
    apple = database / "apple2" / "APPLE2-000-000.JPG"
    queries = tmp_path / "queries.txt"
    queries.write_text(f"# ETH-80 queries\n{horse}\n\n{apple} 40 40 216 216\n")
    result = camretrieval("search", str(index_dir), str(horse), "--queries", str(queries), "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines.count(str(horse)) == 2 and str(apple) in lines
    first_hits = [line.split() for line in lines if line.split()[:1] == ["1"]]
    assert [hit[2] for hit in first_hits] == ["horse2/HORSE2-000-000.JPG"] * 2 + ["apple2/APPLE2-000-000.JPG"]
    assert float(first_hits[0][1]) == pytest.approx(1.0, abs=1e-3)
    json_run = camretrieval("search", str(index_dir), "--queries", str(queries), "--json", "--top", "3")
    assert [entry["query"] for entry in json.loads(json_run.stdout)] == [str(horse), str(apple)]


def test_box_query_uses_the_region(collection):
    _, database, _, index_dir = collection
    query = database / "apple2" / "APPLE2-000-000.JPG"
    index = Index.open(index_dir)
    whole = index.describer.describe([query])
    region = index.describer.describe([query], [(0, 0, 128, 128)])
    assert not np.allclose(whole, region)
    hits = index.search([query], [(0, 0, 256, 256)], top=1)  # the whole 256 x 256 image as a box
    assert hits[0][0].path == "apple2/APPLE2-000-000.JPG" and hits[0][0].score == pytest.approx(1.0, abs=1e-4)


def test_queries_file_parsing(tmp_path):
    file = tmp_path / "q.txt"
    file.write_text("a.jpg\nmy photo 2.jpg 1 2 30 40.5\n  # comment\nweird name 1.jpg\n")
    assert read_queries_file(file) == [("a.jpg", None), ("my photo 2.jpg", (1, 2, 30, 40.5)), ("weird name 1.jpg", None)]
    file.write_text("a.jpg 1 2 3\n")
    with pytest.raises(Exception, match="four numbers"):
        read_queries_file(file)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--box", "10,10,5,50"], "is empty"),
        (["--box", "300,300,400,400"], "outside the 256x256 image"),
        (["--box", "1,2,3"], "four numbers"),
    ],
)
def test_bad_boxes_are_clear_errors(collection, args, message):
    _, database, _, index_dir = collection
    result = camretrieval("search", str(index_dir), str(database / "cup2" / "CUP2-000-000.JPG"), *args)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_box_with_several_queries_is_refused(collection):
    _, database, _, index_dir = collection
    query = str(database / "cup2" / "CUP2-000-000.JPG")
    result = camretrieval("search", str(index_dir), query, query, "--box", "1,1,20,20")
    assert result.returncode == 2 and "--box goes with exactly one QUERY" in result.stderr


def test_unreadable_query_is_reported_and_others_still_answered(collection, tmp_path):
    _, database, _, index_dir = collection
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    good = str(database / "cup2" / "CUP2-000-000.JPG")
    result = camretrieval("search", str(index_dir), str(bad), good, "--json")
    assert result.returncode == 1 and "bad.jpg" in result.stderr
    assert [entry["query"] for entry in json.loads(result.stdout)] == [good]


def test_missing_or_incompatible_pca_and_index_are_clear_errors(collection, tmp_path, capsys):
    root, database, pca, index_dir = collection
    assert main(["index", str(database), str(tmp_path / "i"), "--pca", str(tmp_path / "none.npz")]) == 2
    assert "camretrieval fit-pca" in capsys.readouterr().err
    assert main(["index", str(database), str(tmp_path / "i"), "--pca", str(pca), "--size", "160"]) == 2
    assert "size: learned with 128, used with 160" in capsys.readouterr().err
    assert main(["index", str(database), str(tmp_path / "i"), "--pca", str(pca), "--backbone", "efficientnet_lite1"]) == 2
    assert "backbone: learned with 'efficientnet_lite0', used with 'efficientnet_lite1'" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nowhere"), "q.jpg"]) == 2
    assert "no camretrieval index" in capsys.readouterr().err
    broken = tmp_path / "broken_index"
    shutil.copytree(index_dir, broken)
    next((broken / "shards").glob("*/descriptors.npy")).unlink()
    with pytest.raises(IndexFileError, match="incomplete or damaged"):
        Index.open(broken)


def test_empty_folder_is_a_clear_error(collection, tmp_path, capsys):
    _, _, pca, _ = collection
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), str(tmp_path / "i"), "--pca", str(pca)]) == 2
    assert "no images" in capsys.readouterr().err


def _labelled_folder(database: Path, target: Path) -> Path:
    """The database's object folders without its loose broken file (a label folder set needs every image labelled)."""
    target.mkdir()
    for folder in sorted(p for p in database.iterdir() if p.is_dir()):
        shutil.copytree(folder, target / folder.name)
    return target


def test_eval_json_scores_what_the_index_descriptors_score(collection, tmp_path):
    root, database, pca, index_dir = collection
    images = _labelled_folder(database, tmp_path / "labelled")
    result = camretrieval("eval", "--images", str(images), "--pca", str(pca), "--classes", "8", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["settings"]["pooling"] == "cam" and record["settings"]["size"] == SIZE  # taken from the PCA file
    assert record["settings"]["database_images"] == 33 and record["settings"]["queries"] == 33
    assert len(record["aps"]) == 33 and record["seconds_per_image"] > 0
    # The same images, settings and whitening through the index: the same mAP, computed independently here.
    from camretrieval.evaluation.metrics import labels_mean_average_precision

    index = Index.open(index_dir)
    labels = [p.split("/")[0] for p in index.paths]
    order = np.argsort(index.paths)  # eval lists images sorted by path, as the index does
    descriptors = index.descriptors[order]
    expected, _ = labels_mean_average_precision(descriptors @ descriptors.T, np.array(labels)[order], range(33))
    assert record["map"] == pytest.approx(expected, abs=1e-4)


def test_eval_errors_name_the_problem(collection, tmp_path):
    _, database, pca, _ = collection
    images = _labelled_folder(database, tmp_path / "labelled")
    mismatch = camretrieval("eval", "--images", str(images), "--pca", str(pca), "--pooling", "mac")
    assert mismatch.returncode == 2 and "pooling: learned with 'cam', used with 'mac'" in mismatch.stderr
    neither = camretrieval("eval", "--pca", str(pca))
    assert neither.returncode == 2 and "give either --dataset NAME --data-root DIR or --images DIR" in neither.stderr
    missing = camretrieval("eval", "--dataset", "roxford5k", "--data-root", str(tmp_path))
    assert missing.returncode == 2 and "gnd_roxford5k.pkl" in missing.stderr


def test_eval_scores_a_refinement_as_the_index_ranks_it(collection, tmp_path):
    """eval --online --qe 2 (--index kept): the mAP of Index.rank's own rankings, each image a query against the
    others (itself left out of its ranking and expansion), computed here with the plain AP of the metrics module."""
    _, database, pca, _ = collection
    images = _labelled_folder(database, tmp_path / "labelled")
    kept = tmp_path / "eval-index"
    result = camretrieval("eval", "--images", str(images), "--pca", str(pca), "--classes", "8", "--online", "--qe", "2",
                          "--index", str(kept), "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["variant"] == "cam, N_c = 8, OnA + QE2 gate 5"
    assert record["settings"]["refinement"]["online"] and record["settings"]["refinement"]["qe_gate"] == 5
    from camretrieval.evaluation.metrics import average_precision
    from camretrieval.search.refinement import SearchOptions

    index = Index.open(kept)
    labels = np.array([p.split("/")[0] for p in index.paths])
    options = SearchOptions(online=True, qe=2)
    aps = []
    for i, path in enumerate(index.paths):
        ranking = index.rank(index.describe_query(images / path, None, options), options, exclude=[i])
        relevant = labels[ranking.ids] == labels[i]
        aps.append(average_precision(np.flatnonzero(relevant), int(relevant.sum())))
    assert record["map"] == pytest.approx(float(np.mean(aps)), abs=1e-6)
    refused = camretrieval("eval", "--images", str(images), "--pca", str(pca), "--index", str(kept))
    assert refused.returncode == 2 and "--index keeps the index" in refused.stderr
    # A file that is not an image is reported, as a database image and as a query, and the evaluation goes on.
    (images / "cup2" / "broken.jpg").write_bytes(b"not an image")
    result = camretrieval("eval", "--images", str(images), "--pca", str(pca), "--classes", "8", "--qe", "2", "--json",
                          "--quiet")
    assert result.returncode == 0, result.stderr
    assert "query unusable" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(result.stdout)["settings"]["queries"] == 34
    refused = camretrieval("eval", "--images", str(images), "--pca", str(pca), "--refine", "--qe", "2")
    assert refused.returncode == 2 and "--refine is a complete refinement" in refused.stderr


def test_tables_scales_make_every_row_multiscale_as_eval_does(collection, tmp_path):
    """tables --scales: its unwhitened rows are what eval --scales gives for the same pooling."""
    root, database, _, _ = collection
    images = _labelled_folder(database, tmp_path / "labelled")
    pca_images = tmp_path / "pca"
    shutil.copytree(root / "train" / "cow1", pca_images / "cow1")  # the whitened rows are not compared here
    output = tmp_path / "tables.md"
    result = camretrieval(
        "tables", "--images", str(images), "--pca-images", str(pca_images), "--size", str(SIZE), "--dim", "8",
        "--scales", "1,0.5", "--compare-backbones", "--output", str(output), "--quiet",
    )
    assert result.returncode == 0, result.stderr
    text = output.read_text()
    assert f"size {SIZE}, scales 1,0.5." in text
    cells = {line[2:].split(" | ")[0]: line[2:].split(" | ")[1] for line in text.splitlines() if line.startswith("| ")}

    def eval_map(pooling: str, scales: str) -> str:
        run = camretrieval("eval", "--images", str(images), "--pooling", pooling, "--size", str(SIZE), "--scales",
                           scales, "--json", "--quiet")
        assert run.returncode == 0, run.stderr
        return f"{json.loads(run.stdout)['map']:.3f}"

    assert eval_map("sum", "1,0.5") == cells["Raw"]
    assert eval_map("sum", "1") != cells["Raw"]  # the scales changed the descriptors


def test_tables_command_gives_every_row_of_tables_1a_1b_2(collection, tmp_path):
    root, database, _, _ = collection
    images = _labelled_folder(database, tmp_path / "labelled")
    pca_images = tmp_path / "pca"  # 40 images and 16 dimensions: enough to check the rows, quick to learn
    shutil.copytree(root / "train" / "cow1", pca_images / "cow1")
    shutil.copytree(root / "train" / "pear1", pca_images / "pear1")
    for extra in sorted(pca_images.glob("*/*.jpg"))[40:]:
        extra.unlink()
    output = tmp_path / "tables.md"
    result = camretrieval(
        "tables", "--images", str(images), "--pca-images", str(pca_images), "--size", str(SIZE), "--dim", "16",
        "--npca", "2", "--compare-backbones", "efficientnet_lite0", "resnet50", "--output", str(output), "--quiet",
    )
    assert result.returncode == 0, result.stderr
    text = output.read_text()
    assert "PCA-whitening (16-d, N_pca = 2)" in text
    for row in ["Raw", "Raw + CroW", "Raw + PCA", "Raw + CroW + PCA", "64 CAMs (OfA)", "N_c = 1", "N_c = 8", "N_c = 32",
                "N_c = 64", "MAC + PCA", "GeM (p=3) + PCA", "R-MAC", "CroW + PCA", "efficientnet_lite0: Raw"]:
        assert f"| {row} | " in text, row
    assert "resnet50: skipped, no weights here" in text
    cells = [line[2:].split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    mean_ap = {row[0]: row[1] for row in cells if row[0] != "row"}
    assert mean_ap["64 CAMs (OfA)"] == mean_ap["N_c = 64"] == mean_ap["OfA, 64 CAMs"]  # one extraction, one row thrice
