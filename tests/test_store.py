"""The index folder as a durable, incremental store: adding only what changed, removing, resuming after SIGKILL,
readers during a write, one writer at a time, and clear errors for folders it cannot use."""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from camretrieval import ExtractionSettings, Index, PCAWhitening
from camretrieval.cli import main
from camretrieval.errors import CamRetrievalError
from camretrieval.storage.catalog import CATALOG, SHARDS, IndexFileError, IndexStore
from camretrieval.storage.writer import update_index

SIZE = 96  # tiny images: these tests are about the store, not the descriptor
SETTINGS = {"backbone": "efficientnet_lite0", "feature_layer": "head", "cam_layer": "head", "size": SIZE, "pooling": "cam"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory, eth80_dir):
    """40 ETH-80 photos (two objects) and a PCA-whitening file for their descriptors."""
    root = tmp_path_factory.mktemp("store")
    source = root / "source"
    source.mkdir()
    for obj in ["cup2", "pear3"]:
        for image in sorted((eth80_dir / obj).glob("*.jpg"))[:20]:
            shutil.copy(image, source / image.name)
    rng = np.random.default_rng(0)
    whitening = PCAWhitening(16, settings=SETTINGS).fit(np.abs(rng.normal(size=(200, 1280))))
    pca = root / "pca.npz"
    whitening.save(pca)
    return source, pca


@pytest.fixture(scope="module")
def reference(photos):
    """Descriptors of every photo from one in-memory build: what any sequence of runs must end up with."""
    source, pca = photos
    index, failures = Index.build(source, PCAWhitening.load(pca), size=SIZE, n_classes=8, workers=0, progress=False)
    assert not failures
    return dict(zip(index.paths, index.descriptors))


def _update(index_dir: Path, folder: Path, pca: Path, **options):
    whitening = PCAWhitening.load(pca)
    settings = ExtractionSettings.from_pca(whitening, size=SIZE, n_classes=8)
    options = {"workers": 0, "progress": False} | options
    return update_index(index_dir, folder, whitening, settings, **options)


def _assert_matches(index: Index, reference: dict, atol: float = 1e-4) -> None:
    for path, descriptor in zip(index.paths, index.descriptors):
        assert np.allclose(descriptor, reference[path], atol=atol), path


def _names(source: Path) -> list[str]:
    return sorted(p.name for p in source.iterdir())


def _copy(source: Path, names: list[str], folder: Path) -> Path:
    """``folder`` (created if needed) with copies of these photos of ``source``."""
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(source / name, folder / name)
    return folder


def _index_args(folder: Path, index_dir: Path, pca: Path, *extra: str) -> list[str]:
    return ["index", str(folder), str(index_dir), "--pca", str(pca), "--classes", "8", "--workers", "0", "--quiet", *extra]


def _shard_folders(index_dir: Path) -> set[str]:
    return {p.name for p in (index_dir / SHARDS).iterdir()}


def _catalog_shards(index_dir: Path) -> set[str]:
    with sqlite3.connect(index_dir / CATALOG) as connection:
        return {name for (name,) in connection.execute("SELECT DISTINCT shard FROM images WHERE shard IS NOT NULL")}


def test_a_second_run_describes_only_new_and_changed_images(photos, reference, tmp_path):
    source, pca = photos
    names = _names(source)
    folder = _copy(source, names[:30], tmp_path / "photos")
    index_dir = tmp_path / "index"
    first = _update(index_dir, folder, pca, commit_every=8)
    assert (first.added, first.updated, first.unchanged, first.commits, first.total) == (30, 0, 0, 4, 30)
    assert len(_shard_folders(index_dir)) == 4

    _copy(source, names[30:], folder)  # the collection grows by a third
    second = _update(index_dir, folder, pca, commit_every=8)
    assert (second.added, second.updated, second.unchanged, second.commits, second.total) == (10, 0, 30, 2, 40)
    index = Index.open(index_dir)
    assert index.paths == sorted(names) and len(index.maps) == 40
    _assert_matches(index, reference)
    # The stored maps of an image of the first run and one of the second are where the catalog says.
    assert index.maps.features.image(0).shape[-1] == 1280 and index.maps.features.image(39).dtype == np.float16

    # A changed file is described again; the descriptor of the old content is no longer searched.
    changed = folder / names[0]
    shutil.copy(source / names[-1], changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = _update(index_dir, folder, pca)
    assert (third.added, third.updated, third.unchanged) == (0, 1, 39)
    index = Index.open(index_dir)
    assert np.allclose(index.descriptors[0], reference[names[-1]], atol=1e-4)

    # Files that left the folder stay searchable until removed; remove and --missing drop them.
    (folder / names[1]).unlink()
    fourth = _update(index_dir, folder, pca)
    assert fourth.missing == [names[1]] and len(Index.open(index_dir)) == 40
    assert main(["remove", str(index_dir), "--missing"]) == 0
    assert main(["remove", str(index_dir), str((folder / names[2]).resolve()), "nothing.jpg"]) == 1  # one unknown
    index = Index.open(index_dir)
    assert len(index) == 38 and names[1] not in index.paths and names[2] not in index.paths
    _assert_matches(index, reference | {names[0]: reference[names[-1]]})
    assert _shard_folders(index_dir) == _catalog_shards(index_dir)  # no shard left that nothing uses


def test_unreadable_files_are_recorded_and_tried_again_only_when_changed(photos, tmp_path, capsys):
    source, pca = photos
    folder = _copy(source, _names(source)[:4], tmp_path / "photos")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    index_dir = tmp_path / "index"
    assert main(_index_args(folder, index_dir, pca)) == 0
    assert "skipped broken.jpg" in capsys.readouterr().err
    assert main(_index_args(folder, index_dir, pca)) == 0
    assert "1 files that failed before and have not changed were not tried again" in capsys.readouterr().err
    shutil.copy(source / _names(source)[5], folder / "broken.jpg")  # repaired
    assert main(_index_args(folder, index_dir, pca)) == 0
    assert "indexed 1 images (0 new files, 1 changed, 0 unusable; 4 unchanged)" in capsys.readouterr().out
    assert "broken.jpg" in Index.open(index_dir).paths


def _commits(index_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index_dir / CATALOG}?mode=ro", uri=True) as connection:
            row = connection.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def _start_index(folder: Path, index_dir: Path, pca: Path, commit_every: int, workers: int = 0) -> subprocess.Popen:
    args = _index_args(folder, index_dir, pca, "--commit-every", str(commit_every), "--batch-size", "2", "--workers", str(workers))
    return subprocess.Popen(
        [sys.executable, "-m", "camretrieval.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_sigkill_at_random_moments_never_corrupts_and_the_next_run_resumes(photos, reference, tmp_path):
    source, pca = photos
    index_dir = tmp_path / "index"
    chance = random.Random(7)
    kills = 0
    for attempt in range(3):
        # With decoding workers: they inherit the writer's lock, and the next run must wait for them to exit.
        process = _start_index(source, index_dir, pca, commit_every=2, workers=2)
        before = _commits(index_dir)
        deadline = time.monotonic() + 120
        while _commits(index_dir) <= before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(chance.uniform(0, 0.6))  # somewhere in the middle of describing, writing or committing a shard
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=60)
        index = Index.open(index_dir)  # whatever was committed opens, complete and consistent
        assert 0 < len(index) <= 40 and len(index.maps) == len(index)
        _assert_matches(index, reference)
    assert kills >= 2  # the runs were really interrupted (each run takes seconds, the kills come within 0.6 s)
    result = subprocess.run(
        [sys.executable, "-m", "camretrieval.cli", *_index_args(source, index_dir, pca)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    index = Index.open(index_dir)
    assert len(index) == 40
    _assert_matches(index, reference)
    assert not any(name.endswith(".partial") for name in _shard_folders(index_dir))
    assert _shard_folders(index_dir) == _catalog_shards(index_dir)


def test_readers_see_consistent_snapshots_while_a_writer_adds(photos, reference, tmp_path):
    source, pca = photos
    folder = _copy(source, _names(source)[::5] + _names(source)[1::5], tmp_path / "photos")  # 16: 8 commits of 2
    index_dir = tmp_path / "index"
    process = _start_index(folder, index_dir, pca, commit_every=2)
    sizes = []
    try:
        while process.poll() is None:
            if _commits(index_dir):
                index = Index.open(index_dir)
                assert len(index.maps) == len(index)
                _assert_matches(index, reference)
                scores, ids = index.search_descriptors(index.descriptors[:1], top=3)
                assert ids[0, 0] == 0 and scores[0, 0] == pytest.approx(1, abs=1e-4)
                sizes.append(len(index))
            time.sleep(0.01)
    finally:
        out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert sizes == sorted(sizes) and len(set(sizes)) >= 2  # it grew while being read


def test_a_second_writer_is_refused(photos, tmp_path, capsys):
    source, pca = photos
    index_dir = tmp_path / "index"
    with IndexStore.writing(index_dir):
        assert main(_index_args(source, index_dir, pca)) == 2
        error = capsys.readouterr().err
        assert f"is being written by process {os.getpid()}" in error and "one camretrieval index or remove" in error
        assert main(["remove", str(index_dir), "--missing"]) == 2
    # Released: the same command now runs.
    assert main(_index_args(source, index_dir, pca, "--no-maps")) == 0


def test_mismatched_settings_incompatible_folders_and_versions_are_refused(photos, tmp_path, capsys):
    source, pca = photos
    index_dir = tmp_path / "index"
    few = _copy(source, _names(source)[:3], tmp_path / "few")
    assert main(_index_args(few, index_dir, pca)) == 0
    capsys.readouterr()
    assert main(_index_args(few, index_dir, pca, "--classes", "4")) == 2
    assert "'n_classes': 8" in capsys.readouterr().err
    assert main(_index_args(few, index_dir, pca, "--no-maps")) == 2
    assert "maps:" in capsys.readouterr().err
    assert main(_index_args(source, index_dir, pca)) == 2  # another folder
    assert "image_root:" in capsys.readouterr().err
    other = tmp_path / "other.npz"
    PCAWhitening(16, settings=SETTINGS).fit(np.random.default_rng(1).normal(size=(100, 1280))).save(other)
    assert main(_index_args(few, index_dir, other)) == 2
    assert "another PCA file" in capsys.readouterr().err

    with sqlite3.connect(index_dir / CATALOG) as connection:
        connection.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    with pytest.raises(IndexFileError, match="index format 1; this camretrieval reads format 2: rebuild"):
        Index.open(index_dir)
    (index_dir / CATALOG).write_bytes(b"not a database at all" * 100)
    with pytest.raises(IndexFileError, match="damaged|not a readable catalog"):
        Index.open(index_dir)

    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text('{"format": "camretrieval-index", "version": 1}')
    with pytest.raises(IndexFileError, match="older camretrieval"):
        Index.open(old)
    assert main(_index_args(few, old, pca)) == 2
    assert "older camretrieval" in capsys.readouterr().err
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert main(_index_args(few, stranger, pca)) == 2
    assert "not empty and holds no camretrieval index" in capsys.readouterr().err
    with pytest.raises(IndexFileError, match="no camretrieval index"):
        Index.open(tmp_path / "nowhere")


def test_a_failed_write_loses_nothing_committed(photos, reference, tmp_path, monkeypatch):
    """A full disk (simulated: the third shard's descriptors cannot be written) stops the run with a clear error;
    what was committed stays searchable and the next run completes the index."""
    source, pca = photos
    index_dir = tmp_path / "index"
    real_save = np.save
    calls = {"count": 0}

    def failing_save(file, array, *args, **kwargs):
        if str(file).endswith("descriptors.npy"):
            calls["count"] += 1
            if calls["count"] == 3:
                raise OSError(28, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr("camretrieval.storage.writer.np.save", failing_save)
    with pytest.raises(CamRetrievalError, match=r"No space left on device.*16 images committed so far are safe"):
        _update(index_dir, source, pca, commit_every=8)
    index = Index.open(index_dir)
    assert len(index) == 16
    _assert_matches(index, reference)
    monkeypatch.setattr("camretrieval.storage.writer.np.save", real_save)
    report = _update(index_dir, source, pca, commit_every=8)
    assert (report.added, report.unchanged, report.total) == (24, 16, 40)
    assert _shard_folders(index_dir) == _catalog_shards(index_dir)


def test_an_approximate_index_is_kept_up_to_date_and_exact_search_stays_available(photos, tmp_path, capsys):
    source, pca = photos
    names = _names(source)
    folder = _copy(source, names[:30], tmp_path / "photos")
    index_dir = tmp_path / "index"
    assert main(_index_args(folder, index_dir, pca, "--no-maps", "--ann", "hnsw")) == 0
    assert "approximate index: hnsw, recall@100 1.000" in capsys.readouterr().out  # 30 images: all are found
    index = Index.open(index_dir)
    assert isinstance(index.faiss_index, faiss.IndexHNSWFlat) and index.faiss_index.ntotal == 30
    assert isinstance(Index.open(index_dir, exact=True).faiss_index, faiss.IndexFlatIP)
    scores, ids = index.search_descriptors(index.descriptors[:5], top=1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]

    _copy(source, names[30:], folder)  # grows: the approximate index follows (the option is remembered)
    assert main(_index_args(folder, index_dir, pca, "--no-maps")) == 0
    index = Index.open(index_dir)
    assert isinstance(index.faiss_index, faiss.IndexHNSWFlat) and index.faiss_index.ntotal == 40
    assert main(["remove", str(index_dir), names[0]]) == 0
    assert Index.open(index_dir).faiss_index.ntotal == 39

    # IVF-PQ cannot be trained on 40 vectors (the removed image is still in the folder, so it is indexed again): a
    # clear error, and the index keeps an HNSW index, rebuilt for the new image.
    assert main(_index_args(folder, index_dir, pca, "--no-maps", "--ann", "ivfpq")) == 2
    assert "ivfpq" in capsys.readouterr().err
    index = Index.open(index_dir)
    assert isinstance(index.faiss_index, faiss.IndexHNSWFlat) and index.faiss_index.ntotal == 40

    # An approximate index left behind by an interrupted run (older than the catalog) is not used.
    with sqlite3.connect(index_dir / CATALOG) as connection:
        connection.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'generation'")
    with pytest.warns(UserWarning, match="searching exactly"):
        assert isinstance(Index.open(index_dir).faiss_index, faiss.IndexFlatIP)
    assert main(_index_args(folder, index_dir, pca, "--no-maps", "--ann", "none")) == 0
    assert isinstance(Index.open(index_dir).faiss_index, faiss.IndexFlatIP) and not (index_dir / "ann.faiss").exists()

    # float16 search: half the memory; scores within float16 rounding of the exact ones, so only near-ties (these
    # tiny 16-d descriptors of two objects have many: cosines above 0.999) can change places.
    exact = Index.open(index_dir)
    assert main(_index_args(folder, index_dir, pca, "--no-maps", "--float16")) == 0
    half = Index.open(index_dir)
    assert isinstance(half.faiss_index, faiss.IndexScalarQuantizer)
    exact_scores, _ = exact.search_descriptors(exact.descriptors, top=3)
    half_scores, half_ids = half.search_descriptors(half.descriptors, top=3)
    true_scores = np.einsum("qd,qkd->qk", exact.descriptors, exact.descriptors[half_ids])
    assert np.abs(half_scores - true_scores).max() < 2e-3 and np.abs(true_scores - exact_scores).max() < 2e-3
    assert main(_index_args(folder, index_dir, pca, "--no-maps", "--ann", "hnsw")) == 0  # remembered: HNSW in float16
    assert isinstance(Index.open(index_dir).faiss_index, faiss.IndexHNSWSQ)


def test_files_that_vanish_or_change_during_indexing(photos, reference, tmp_path, monkeypatch, capsys):
    """A file deleted after the folder was listed is reported and skipped; a file rewritten while the run describes
    it is described again by the next run (its recorded size and mtime are those seen before it changed)."""
    source, pca = photos
    names = _names(source)[:6]
    folder = _copy(source, names, tmp_path / "photos")
    from camretrieval.extraction.images import ImageFileDataset

    original = ImageFileDataset.__getitem__

    def meddling(self, index):
        name = Path(self.paths[index]).name
        if name == names[1]:
            (folder / name).unlink(missing_ok=True)  # gone before it is read
        if name == names[2] and (folder / name).read_bytes() != (source / names[5]).read_bytes():
            shutil.copy(source / names[5], folder / name)  # rewritten just before it is read
            os.utime(folder / name, ns=(time.time_ns(), time.time_ns() + 10**9))
        return original(self, index)

    monkeypatch.setattr(ImageFileDataset, "__getitem__", meddling)
    index_dir = tmp_path / "index"
    assert main(_index_args(folder, index_dir, pca)) == 0
    assert f"skipped {names[1]}: file not found" in capsys.readouterr().err
    index = Index.open(index_dir)
    assert names[1] not in index.paths and len(index) == 5
    monkeypatch.setattr(ImageFileDataset, "__getitem__", original)
    assert main(_index_args(folder, index_dir, pca)) == 0
    assert "indexed 1 images (0 new files, 1 changed, 0 unusable; 4 unchanged)" in capsys.readouterr().out
    _assert_matches(Index.open(index_dir), reference | {names[2]: reference[names[5]]})
