"""Issue 12's defects of the index folder, each reproduced: names that are not UTF-8, failures that may pass,
damaged files that `index` must repair, an index with no images left, a read-only index, `remove` on a mistyped
path, a PCA file with impossible values, and links that lead nowhere."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from camretrieval import ExtractionSettings, Index, PCAWhitening
from camretrieval.cli import main
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.images import ImageError, ImageFileDataset, load_image
from camretrieval.method.whitening import WhiteningFileError
from camretrieval.search.refinement import SearchOptions
from camretrieval.storage import catalog
from camretrieval.storage.catalog import ANN, RETRY_MARK, SHARDS, FileState, IndexFileError, IndexStore
from camretrieval.storage.check import check_index
from camretrieval.storage.writer import remove_images, update_index

SIZE = 96
SETTINGS = {"backbone": "efficientnet_lite0", "feature_layer": "head", "cam_layer": "head", "size": SIZE, "pooling": "cam"}
NOT_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: what Python gets for such a name is a str with a surrogate


@pytest.fixture(scope="module")
def whitening(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pca") / "pca.npz"
    PCAWhitening(16, settings=SETTINGS).fit(np.abs(rng.normal(size=(200, 1280)))).save(path)
    return path


def _photos(eth80_dir: Path, folder: Path, count: int = 6) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for image in sorted((eth80_dir / "cup2").glob("*.jpg"))[:count]:
        shutil.copy(image, folder / image.name)
        names.append(image.name)
    return names


def _update(index_dir: Path, folder: Path, pca: Path, **options):
    whitening = PCAWhitening.load(pca)
    settings = ExtractionSettings.from_pca(whitening, n_classes=8)
    return update_index(index_dir, folder, whitening, settings, workers=0, progress=False, **options)


def test_a_name_that_is_not_utf8_is_indexed_found_and_kept(eth80_dir, whitening, tmp_path, capsys):
    folder = tmp_path / "photos"
    names = _photos(eth80_dir, folder)
    os.rename(folder / names[0], folder / NOT_UTF8)
    index_dir = tmp_path / "index"
    report = _update(index_dir, folder, whitening)
    assert report.total == 6 and not report.failures
    index = Index.open(index_dir)
    assert NOT_UTF8 in index.paths
    hits = index.search([folder / NOT_UTF8], top=1)[0]
    assert hits[0].path == NOT_UTF8 and hits[0].score == pytest.approx(1.0, abs=1e-4)
    again = _update(index_dir, folder, whitening)
    assert (again.unchanged, again.added, again.updated) == (6, 0, 0)
    # The command line writes the name's own bytes, in the table and in JSON.
    assert main(["search", str(index_dir), str(folder / NOT_UTF8), "--top", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["results"][0]["path"] in (NOT_UTF8, "caf\\udce9.jpg", "caf\udce9.jpg")
    assert remove_images(index_dir, [NOT_UTF8]) == (1, [])


def test_a_file_that_could_not_be_read_is_tried_again_one_that_cannot_be_decoded_is_not(eth80_dir, whitening, tmp_path):
    missing = tmp_path / "gone.jpg"
    with pytest.raises(ImageError) as error:
        load_image(missing)
    assert error.value.retry  # moved away, perhaps for a moment
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    with pytest.raises(ImageError) as error:
        load_image(tmp_path / "broken.jpg")
    assert not error.value.retry
    assert ImageFileDataset([str(missing)], SIZE, (0, 0, 0), (1, 1, 1), 32)[0].retry

    folder = tmp_path / "photos"
    names = _photos(eth80_dir, folder, 4)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    index_dir = tmp_path / "index"
    first = _update(index_dir, folder, whitening)
    assert first.total == 4 and [f.path for f in first.failures] == ["broken.jpg"]
    # An earlier run could not read names[0] (its folder was away): recorded as such, with the file's state.
    state = FileState.of(folder / names[0])
    with IndexStore.writing(index_dir) as store:
        store.remove([names[0]])
        store.commit(None, [], [(names[0], state, RETRY_MARK + "file not found (moved or deleted?)")])
        assert store.known_files()[names[0]][1] == "retry" and store.known_files()["broken.jpg"][1] == "failed"
    second = _update(index_dir, folder, whitening)
    assert (second.retried, second.failed_before, second.described, second.total) == (1, 1, 1, 4)
    assert names[0] in Index.open(index_dir).paths


def test_index_repairs_damaged_shards_and_approximate_index(eth80_dir, whitening, tmp_path):
    folder = tmp_path / "photos"
    _photos(eth80_dir, folder, 6)
    index_dir = tmp_path / "index"
    _update(index_dir, folder, whitening, commit_every=3, ann="hnsw")
    before = Index.open(index_dir, exact=True)
    shards = sorted(p for p in (index_dir / SHARDS).iterdir())
    (shards[0] / "descriptors.npy").unlink()
    with open(index_dir / ANN, "r+b") as ann:
        ann.truncate(100)
    with IndexStore.writing(index_dir) as store:
        found = check_index(store)
    assert {d.shard for d in found} == {shards[0].name, None} and all(d.images for d in found)
    with pytest.raises(CamRetrievalError):
        Index.open(index_dir).search([folder / before.paths[0]])
    report = _update(index_dir, folder, whitening, commit_every=3)
    assert len(report.repaired) == 2 and report.described == 3 and report.total == 6
    assert report.ann is not None and report.ann["recall_at_100"] == 1.0
    after = Index.open(index_dir)
    assert after.paths == before.paths and np.allclose(after.descriptors, before.descriptors, atol=1e-5)
    with IndexStore.writing(index_dir) as store:
        assert check_index(store) == []
    assert after.search([folder / before.paths[0]], top=1)[0][0].path == before.paths[0]


def test_maps_damaged_inside_a_block_are_found_by_index_verify_and_described_again(eth80_dir, whitening, tmp_path, capsys):
    """Bytes overwritten inside a maps block keep the file's length and headers: OnA names the damage and the fix,
    a plain index run does not see it, index --verify decodes every block, finds it and describes the shard again."""
    folder = tmp_path / "photos"
    names = _photos(eth80_dir, folder, 6)
    index_dir = tmp_path / "index"
    _update(index_dir, folder, whitening, commit_every=3)
    before = Index.open(index_dir)
    query = folder / names[0]
    expected = before.search([query], top=6, options=SearchOptions(online=True))[0]
    blocks = sorted((index_dir / SHARDS).glob("*/features_maps.blocks"))[1]
    data = bytearray(blocks.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    blocks.write_bytes(bytes(data))
    assert main(["search", str(index_dir), str(query), "--online"]) == 1
    assert "--verify" in capsys.readouterr().err
    with IndexStore.writing(index_dir) as store:
        assert check_index(store) == []  # headers and lengths are whole
        found = check_index(store, verify_maps=True)
    assert [d.shard for d in found] == [blocks.parent.name] and "damaged maps" in found[0].problem
    assert _update(index_dir, folder, whitening, commit_every=3).described == 0
    report = _update(index_dir, folder, whitening, commit_every=3, verify_maps=True)
    assert len(report.repaired) == 1 and report.described == 3 and report.total == 6
    again = Index.open(index_dir).search([query], top=6, options=SearchOptions(online=True))[0]
    assert [h.path for h in again] == [h.path for h in expected]


def test_an_index_with_no_images_left_finds_nothing(eth80_dir, whitening, tmp_path):
    folder = tmp_path / "photos"
    names = _photos(eth80_dir, folder, 2)
    index_dir = tmp_path / "index"
    _update(index_dir, folder, whitening)
    assert remove_images(index_dir, names) == (2, [])
    index = Index.open(index_dir)
    assert len(index) == 0 and index.search([folder / names[0]], top=5) == [[]]
    assert main(["search", str(index_dir), str(folder / names[0])]) == 0


def test_a_read_only_index_is_searched_and_refuses_writers(eth80_dir, whitening, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    names = _photos(eth80_dir, folder, 3)
    index_dir = tmp_path / "index"
    _update(index_dir, folder, whitening)
    # What a read-only file system answers (root may write anywhere, so the answer is given here).
    monkeypatch.setattr(catalog, "_writable", lambda directory: False)
    hits = Index.open(index_dir).search([folder / names[1]], top=1)[0]
    assert hits[0].path == names[1]
    with pytest.raises(IndexFileError, match="cannot write to the index .*searching a read-only index works"):
        _update(index_dir, folder, whitening)
    with pytest.raises(IndexFileError, match="cannot write"):
        remove_images(index_dir, names[:1])


def test_a_lock_that_is_a_folder_is_a_clear_error(eth80_dir, whitening, tmp_path):
    folder = tmp_path / "photos"
    _photos(eth80_dir, folder, 2)
    index_dir = tmp_path / "index"
    _update(index_dir, folder, whitening)
    (index_dir / "writer.lock").unlink()
    (index_dir / "writer.lock").mkdir()
    with pytest.raises(IndexFileError, match="cannot write to the index"):
        _update(index_dir, folder, whitening)


def test_remove_on_a_mistyped_index_creates_nothing(tmp_path):
    with pytest.raises(IndexFileError, match="no camretrieval index"):
        remove_images(tmp_path / "typo.index", ["a.jpg"])
    assert not (tmp_path / "typo.index").exists()
    assert main(["remove", str(tmp_path / "typo.index"), "a.jpg"]) == 2
    assert not (tmp_path / "typo.index").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: a.__setitem__("mean", np.full_like(a["mean"], np.nan)), "not finite"),
        (lambda a: a.__setitem__("eigenvalues", np.zeros_like(a["eigenvalues"])), "not positive"),
        (lambda a: a.__setitem__("components", a["components"][:2]), "components of shape"),
        (lambda a: a.__setitem__("header", np.array(json.dumps(["a", "list"]))), "not a camretrieval PCA"),
        (lambda a: a.__setitem__("header", np.array(json.dumps({"format": "camretrieval-pca-whitening", "version": 1}))),
         "lacks the settings"),
    ],
)
def test_a_pca_file_with_impossible_content_is_refused(whitening, tmp_path, damage, message):
    with np.load(whitening) as stored:
        arrays = dict(stored)
    damage(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(WhiteningFileError, match=message):
        PCAWhitening.load(tmp_path / "bad.npz")


def test_a_truncated_pca_file_is_refused(whitening, tmp_path):
    data = whitening.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(WhiteningFileError, match="not a camretrieval PCA-whitening file"):
        PCAWhitening.load(tmp_path / "cut.npz")


def test_links_that_lead_nowhere_are_listed(eth80_dir, whitening, tmp_path, capsys):
    folder = tmp_path / "photos"
    _photos(eth80_dir, folder, 2)
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    index_dir = tmp_path / "index"
    assert main(["index", str(folder), str(index_dir), "--pca", str(whitening), "--classes", "8", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "skipped dangling.jpg" in err and "skipped loop.jpg" in err
    assert "skipped 2 of 4 files" in err
    assert len(Index.open(index_dir)) == 2


# --- The command line's boundary (issue 12, items 8 and 13) ---


def test_queries_come_from_stdin_a_pipe_or_a_file_that_is_not_utf8(tmp_path, monkeypatch):
    import io

    from camretrieval.cli import read_queries_file

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a.jpg\nb c.jpg 1 2 30 40\n")))
    assert read_queries_file(Path("-")) == [("a.jpg", None), ("b c.jpg", (1.0, 2.0, 30.0, 40.0))]
    read_end, write_end = os.pipe()
    os.write(write_end, b"piped.jpg\n")
    os.close(write_end)
    try:
        assert read_queries_file(Path(f"/dev/fd/{read_end}")) == [("piped.jpg", None)]
    finally:
        os.close(read_end)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9.jpg\n")
    assert read_queries_file(tmp_path / "latin1.txt") == [(NOT_UTF8, None)]
    with pytest.raises(CamRetrievalError, match="is a folder"):
        read_queries_file(tmp_path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit-pca", "IMAGES", "OUT_DIR", "--quiet"], "is a folder: give the path of a file"),
        (["fit-pca", "IMAGES", "OUT", "--device", "bogus", "--quiet"], "unknown device 'bogus'"),
        (["fit-pca", "IMAGES", "OUT", "--workers", "-1"], "--workers: must be at least 0"),
        (["fit-pca", "IMAGES", "OUT", "--dim", "0"], "--dim: must be at least 1"),
        (["serve", "INDEX", "--port", "99999"], "--port: must be from 0 to 65535"),
        (["explain", "IMAGES", "--output", "OUT_DIR"], "is a folder: give the path of a file"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_any_image_is_described(
    eth80_dir, tmp_path, capsys, args, message
):
    images = eth80_dir / "cup2"
    (tmp_path / "out_dir").mkdir()
    names = {"IMAGES": str(images), "OUT_DIR": str(tmp_path / "out_dir"), "OUT": str(tmp_path / "pca.npz"),
             "INDEX": str(tmp_path / "none.index")}
    if args[0] == "explain":
        names["IMAGES"] = str(next(images.glob("*.jpg")))
    assert main([names.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "skipped" not in err and "%|" not in err


def test_an_unexpected_failure_is_one_line_and_CAMRETRIEVAL_DEBUG_shows_it(tmp_path, capsys, monkeypatch):
    from camretrieval.cli import commands

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(commands.COMMANDS, "info", broken)
    assert main(["info", str(tmp_path)]) == 3
    err = capsys.readouterr().err
    assert "unexpected error (ZeroDivisionError: a bug)" in err and "CAMRETRIEVAL_DEBUG=1" in err
    monkeypatch.setenv("CAMRETRIEVAL_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["info", str(tmp_path)])


# --- Property-based: no input of these kinds ends in anything but a clear error ---

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_box_text_parses_or_is_a_box_error(text):
    from camretrieval.method.regions import BoxError, parse_box

    try:
        box = parse_box(text)
    except BoxError:
        return
    assert len(box) == 4


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_queries_file_reads_or_is_a_clear_error(tmp_path_factory, data):
    from camretrieval.cli import read_queries_file

    path = tmp_path_factory.mktemp("q") / "queries.txt"
    path.write_bytes(data)
    try:
        queries = read_queries_file(path)
    except CamRetrievalError:
        return
    assert all(isinstance(name, str) and (box is None or len(box) == 4) for name, box in queries)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_any_file_name_survives_the_catalog(name_bytes):
    name = os.fsdecode(name_bytes)
    assert catalog.path_from_sql(catalog.path_to_sql(name)) == name


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(header=_JSON, dim=st.integers(0, 4), k=st.integers(0, 5))
def test_any_pca_file_content_loads_or_is_refused(tmp_path_factory, header, dim, k):
    path = tmp_path_factory.mktemp("pca") / "pca.npz"
    if isinstance(header, dict) and len(header) % 2:  # half the time, a header that gets past the format check
        header = header | {"format": "camretrieval-pca-whitening", "version": 1}
    rng = np.random.default_rng(dim * 7 + k)
    np.savez(path, header=np.array(json.dumps(header)), mean=rng.normal(size=k),
             components=rng.normal(size=(dim, k)), eigenvalues=rng.normal(size=dim))
    try:
        PCAWhitening.load(path)
    except WhiteningFileError:
        return


def test_a_damaged_catalog_page_is_a_clear_error_for_readers_and_writers(eth80_dir, whitening, tmp_path):
    folder = tmp_path / "photos"
    _photos(eth80_dir, folder, 2)
    index_dir = tmp_path / "index"
    _update(index_dir, folder, whitening)
    data = bytearray((index_dir / "catalog.sqlite").read_bytes())
    data[4096:8192] = bytes(range(256)) * 16  # one page of the database overwritten
    (index_dir / "catalog.sqlite").write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="damaged"):
        Index.open(index_dir)
    with pytest.raises(IndexFileError, match="damaged .*move .* away and run camretrieval index again"):
        _update(index_dir, folder, whitening)
