"""Seeing and managing an index from the command line, on real photos: ``index`` without a PCA file (whitening
learned on the collection, options defaulting to the index's own), ``info``, ``search --json`` with the indexed
root, ``search --html``, ``remove`` with paths relative to the current folder, ``explain --index``, and ``--dim`` /
``--npca`` of ``eval``."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from camretrieval.cli import main
from camretrieval.method.whitening import PCAWhitening
from camretrieval.search.index import Index
from camretrieval.storage.catalog import IndexStore

SIZE = 128
OBJECTS = ["apple3", "cup3", "horse3"]
COMMON = ["--workers", "0", "--quiet"]


def run(*args: str) -> tuple[int, str, str]:
    """``camretrieval ARGS`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit:
            code = exit.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def made(tmp_path_factory, eth80_dir):
    """A folder of three ETH-80 objects (every fourth view) indexed without a PCA file at size 128."""
    root = tmp_path_factory.mktemp("manage")
    images = root / "images"
    for obj in OBJECTS:
        (images / obj).mkdir(parents=True)
        for view in sorted((eth80_dir / obj).glob("*.jpg"))[::4]:
            shutil.copy(view, images / obj / view.name)
    index_dir = root / "photos.index"
    code, out, err = run(
        "index", images, index_dir, "--size", SIZE, "--dim", 16, "--classes", 8, "--whiten", "collection", *COMMON
    )
    assert code == 0, err
    assert "learned on 33 images of the collection itself" in err
    assert "indexed 33 images" in out
    return root, images, index_dir


def test_index_without_pca_learns_on_the_collection_and_keeps_its_settings(made, eth80_dir, tmp_path):
    _, _, index_dir = made
    index = Index.open(index_dir)
    assert index.settings["size"] == SIZE and index.settings["n_classes"] == 8
    assert index.whitening.settings["learned_on"] == "collection" and index.whitening.dim_ == 16
    # A small index made the same way; rerun with no options, it keeps the index's settings and whitening (its
    # size of 128 and N_c of 8: the defaults, 448 and 64, would be refused).
    images = tmp_path / "images"
    images.mkdir()
    views = sorted((eth80_dir / "pear3").glob("*.jpg"))
    for view in views[:6:2]:
        shutil.copy(view, images / view.name)
    code, _, err = run(
        "index", images, tmp_path / "index", "--size", SIZE, "--dim", 2, "--classes", 8, "--whiten", "collection",
        *COMMON,
    )
    assert code == 0, err
    first = Index.open(tmp_path / "index")
    shutil.copy(views[1], images / views[1].name)
    code, out, err = run("index", images, tmp_path / "index", *COMMON)
    assert code == 0, err
    assert "using the whitening the index" in err
    assert "indexed 1 images (1 new files, 0 changed, 0 unusable; 3 unchanged)" in out
    grown = Index.open(tmp_path / "index")
    assert len(grown) == 4 and grown.settings == first.settings and grown.whitening.same_as(first.whitening)
    # An option that differs from the index is refused, naming the difference.
    code, _, err = run("index", images, tmp_path / "index", "--size", 160, "--classes", 4, *COMMON)
    assert code == 2 and "built with other settings: --size 160 given, 'size': 128 in the index; --classes 4 given, 'n_classes': 8 in the index" in err
    # --dim and --npca apply to a new index only; given again they are accepted and said to be ignored.
    code, out, err = run("index", images, tmp_path / "index", "--dim", 16, *COMMON)
    assert code == 0 and "apply to a new index only" in err and "4 unchanged" in out


def test_a_small_collection_is_not_whitened_unless_asked(made, tmp_path):
    """On fewer than MIN_COLLECTION_WHITENING images, a whitening of the collection itself measured worse than none
    (docs/method.md): `index` without --pca then says so and indexes unwhitened descriptors; --whiten none too."""
    _, images, _ = made
    for extra in ([], ["--whiten", "none"]):
        target = tmp_path / f"plain{len(extra)}"
        code, _, err = run("index", images / "apple3", target, "--size", SIZE, *extra, *COMMON)
        assert code == 0, err
        assert "whitening: none" in err and Index.open(target).whitening is None


def test_an_index_without_maps_is_rerun_without_options(made, tmp_path):
    _, images, _ = made
    code, _, err = run("index", images / "apple3", tmp_path / "bare", "--size", SIZE, "--no-maps", *COMMON)
    assert code == 0, err
    code, out, err = run("index", images / "apple3", tmp_path / "bare", *COMMON)
    assert code == 0, err
    assert Index.open(tmp_path / "bare").maps is None and "11 unchanged" in out


def test_info_text_and_json(made, tmp_path):
    _, images, index_dir = made
    code, text, err = run("info", index_dir)
    assert code == 0, err
    assert re.search(r"^images: +33$", text, re.M)
    assert re.search(rf"^folder: +{re.escape(str(images.resolve()))}$", text, re.M)
    assert "size 128 px, pooling cam, N_c = 8" in text
    assert "1280 -> 16 PCA-whitening learned on 33 images of the collection itself" in text
    assert "maps:" in text and "stored" in text and "search:       exact" in text
    code, output, _ = run("info", index_dir, "--json")
    info = json.loads(output)
    assert info["images"] == 33 and info["failed"] == [] and info["root"] == str(images.resolve()) and info["root_exists"]
    assert info["settings"] == Index.open(index_dir).settings
    assert info["whitening"] | {"file": None} == {
        "source": "collection", "input_dim": 1280, "dim": 16, "n_images": 33, "n_pca": 1, "file": None,
    }
    assert info["dim"] == 16 and info["float16"] is False and info["ann"] is None and info["generation"] >= 1
    maps_bytes = sum(p.stat().st_size for p in (index_dir / "shards").rglob("*_maps*"))
    assert info["maps"] == {"stored": True, "bytes": maps_bytes, "formats": {"2": 1}}  # one shard, compressed maps
    assert info["bytes"] == sum(p.stat().st_size for p in index_dir.rglob("*") if p.is_file())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", info["last_change"])

    # An approximate index, a broken file and a PCA file: said as they are.
    copy = tmp_path / "copy"
    shutil.copytree(images, copy / "images")
    (copy / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    pca = tmp_path / "pca.npz"
    code, _, err = run("fit-pca", images / "cup3", pca, "--size", SIZE, "--dim", 4, *COMMON)
    assert code == 0, err
    code, _, err = run("index", copy / "images", copy / "index", "--pca", pca, "--ann", "hnsw", *COMMON)
    assert code == 0, err
    info = json.loads(run("info", copy / "index", "--json")[1])
    assert info["whitening"]["source"] == "pca-file" and info["whitening"]["n_images"] == 11
    assert info["failed"] == [{"path": "broken.jpg", "error": info["failed"][0]["error"]}]
    assert info["ann"]["kind"] == "hnsw" and info["ann"]["up_to_date"] and 0 < info["ann"]["recall_at_100"] <= 1
    text = run("info", copy / "index")[1]
    assert "from a PCA file learned on 11 images of another collection" in text
    assert "approximate (hnsw), recall@100" in text and "1 file could not be used" in text
    code, _, err = run("info", tmp_path / "nowhere")
    assert code == 2 and "no camretrieval index" in err


def test_search_json_and_table_name_the_indexed_root(made):
    _, images, index_dir = made
    query = images / "cup3" / sorted(p.name for p in (images / "cup3").iterdir())[0]
    code, out, err = run("search", index_dir, query, "--top", 3, "--json")
    assert code == 0, err
    [entry] = json.loads(out)
    assert entry["root"] == str(images.resolve()) and entry["query"] == str(query)
    assert (Path(entry["root"]) / entry["results"][0]["path"]).samefile(query)
    code, out, _ = run("search", index_dir, query, "--top", 3)
    assert out.splitlines()[0] == f"33 images under {images.resolve()}"


def test_search_imports_only_what_it_uses(made):
    _, images, index_dir = made
    query = next((images / "apple3").iterdir())
    script = (
        "import contextlib, io, json, sys\nfrom camretrieval.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    code = main(['search', {str(index_dir)!r}, {str(query)!r}])\n"
        "print(json.dumps({'code': code, 'loaded': [m for m in ('scipy', 'fastapi', 'uvicorn', 'ray', 'skimage') "
        "if m in sys.modules]}))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert json.loads(result.stdout.splitlines()[-1]) == {"code": 0, "loaded": []}, result.stderr


def test_search_html_page(made, tmp_path):
    _, images, index_dir = made
    horse = images / "horse3" / sorted(p.name for p in (images / "horse3").iterdir())[0]
    apple = images / "apple3" / sorted(p.name for p in (images / "apple3").iterdir())[0]
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{horse}\n{apple} 40 40 216 216\n")
    page = tmp_path / "out" / "results.html"
    code, out, err = run(
        "search", index_dir, "--queries", queries, "--top", 4, "--rerank", 5, "--html", page, "--explain-top", 2,
        "--json",
    )
    assert code == 0, err
    assert f"page: {page}" in err
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<script" not in text and "http://" not in text  # self-contained
    assert text.count("<section class='query'>") == 2 and text.count("<div class='hit'>") == 8
    assert text.count("<summary>why it matched</summary>") == 4  # the first two results of each query
    assert text.count("data:image/jpeg;base64,") == 2 + 2 + 8 + 4  # queries, their heatmaps, thumbnails, explanations
    assert "query (box 40, 40, 216, 216)" in text and "query (whole image)" in text
    assert "re-ranking of the top 5 with CAM regions (N_re = 6)" in text and "offline aggregation (N_c = 8)" in text
    for entry in json.loads(out):  # every result links to its image file, with its score
        for rank, hit in enumerate(entry["results"], start=1):
            assert f"href='{(images / hit['path']).resolve().as_uri()}'" in text
            assert f"<span class='rank'>{rank}.</span> <span class='score'>{hit['score']:.3f}</span>" in text
    assert re.search(r"<li>[a-z][^<]*<span class='score'>\d+\.\d%</span></li>", text)  # the query's classes
    code, _, err = run("search", index_dir, horse, "--top", 2, "--html", page, "--explain-top", 0)
    assert code == 0, err
    assert "why it matched" not in page.read_text() and page.read_text().count("<div class='hit'>") == 2
    code, _, err = run("search", index_dir, horse, "--html", tmp_path)
    assert code == 2 and "is a folder" in err


def test_remove_takes_paths_relative_to_the_current_folder(made, tmp_path, monkeypatch):
    _, images, index_dir = made
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    names = sorted(Index.open(copy).paths)
    monkeypatch.chdir(images.parent)
    code, out, err = run("remove", copy, f"images/{names[0]}")  # relative to here, under the indexed folder
    assert code == 0 and "removed 1 images" in out, err
    monkeypatch.chdir(images / "apple3")
    code, out, err = run("remove", copy, Path(names[1]).name)  # relative to here, in a sub-folder
    assert code == 0 and "removed 1 images" in out, err
    code, out, err = run("remove", copy, names[2])  # as the index lists it (relative to the indexed folder)
    assert code == 0 and "removed 1 images" in out, err
    outside = tmp_path / "elsewhere.jpg"
    shutil.copy(images / names[3], outside)
    monkeypatch.chdir(tmp_path)
    code, out, err = run("remove", copy, "elsewhere.jpg", "nothing.jpg")  # exists here, but not under the root
    assert code == 1 and "not in the index: elsewhere.jpg" in err and "not in the index: nothing.jpg" in err
    assert sorted(Index.open(copy).paths) == names[3:]


def test_explain_with_an_index_sees_the_image_as_the_index_does(made, tmp_path):
    _, images, index_dir = made
    image = images / "cup3" / sorted(p.name for p in (images / "cup3").iterdir())[0]
    code, out, err = run("explain", image, "--index", index_dir, "--output", tmp_path / "why.png", "--classes", 3)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and lines[-1] == f"wrote {tmp_path / 'why.png'}"
    for rank, line in enumerate(lines[:3], start=1):
        assert re.fullmatch(rf" {rank}\. [a-z][a-z' -]* +\d{{1,3}}\.\d%  \(class \d+\)", line), line
    # The index's size (128), not the default 448: the same as asking for that size.
    code, same_size, _ = run("explain", image, "--size", SIZE, "--output", tmp_path / "why2.png", "--classes", 3)
    assert code == 0 and same_size.splitlines()[:3] == lines[:3]
    code, default_size, _ = run("explain", image, "--output", tmp_path / "why3.png", "--classes", 3)
    assert default_size.splitlines()[:3] != lines[:3]
    code, _, err = run("explain", image, "--index", index_dir, "--size", 160)
    assert code == 2 and "--size 160 is not the index's (128)" in err
    code, _, err = run("explain", image, "--index", tmp_path / "nowhere")
    assert code == 2 and "no camretrieval index" in err


def test_eval_dim_and_npca_size_the_whitening_it_learns(made, tmp_path, eth80_dir):
    _, images, _ = made
    pca_images = tmp_path / "pca"
    for obj in ["cow1", "pear1"]:
        (pca_images / obj).mkdir(parents=True)
        for view in sorted((eth80_dir / obj).glob("*.jpg"))[::3]:
            shutil.copy(view, pca_images / obj / view.name)
    maps = {}
    for extra in [("--dim", "2"), ("--dim", "12"), ("--dim", "12", "--npca", "3")]:
        code, out, err = run("eval", "--images", images, "--pca-images", pca_images, "--size", SIZE, "--classes", 8,
                             "--json", *extra, *COMMON)
        assert code == 0, err
        maps[extra] = json.loads(out)["map"]
    assert len(set(maps.values())) == 3  # each whitening differs, so does each score
    pca = tmp_path / "pca.npz"
    assert run("fit-pca", pca_images, pca, "--size", SIZE, "--dim", 12, "--npca", 3, *COMMON)[0] == 0
    assert PCAWhitening.load(pca).settings["n_pca"] == 3
    code, out, _ = run("eval", "--images", images, "--pca", pca, "--classes", 8, "--json", *COMMON)
    assert code == 0 and json.loads(out)["map"] == pytest.approx(maps[("--dim", "12", "--npca", "3")], abs=1e-6)
    code, _, err = run("eval", "--images", images, "--pca", pca, "--npca", 3)
    assert code == 2 and "--pca-images" in err


def test_catalog_is_left_consistent_by_info(made):
    """info only reads: the catalog's generation does not move."""
    _, _, index_dir = made
    before = IndexStore.open(index_dir).meta()["generation"]
    assert run("info", index_dir)[0] == 0
    assert IndexStore.open(index_dir).meta()["generation"] == before
