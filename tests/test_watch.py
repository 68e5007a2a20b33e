"""``camretrieval index DIR IDX --watch``: a real watching process follows files added (some written slowly),
modified, renamed and deleted, folders moved in and deleted, answers searches meanwhile, survives ``kill -9`` in the
middle of a batch, and stops with exit status 0 on SIGTERM; with native events and with polling."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from watchdog.events import FileCreatedEvent, FileModifiedEvent
from watchdog.observers.polling import PollingObserver

from camretrieval.cli import main
from camretrieval.extraction.settings import ExtractionSettings
from camretrieval.storage import watch
from camretrieval.storage.catalog import CATALOG, SHARDS, FileState, IndexFileError, IndexStore
from camretrieval.storage.check import check_index
from camretrieval.storage.shards import load_snapshot
from camretrieval.storage.writer import update_index

SIZE = 64  # tiny images and settings: these tests are about following the folder, not the descriptor
OPTIONS = ["--size", str(SIZE), "--classes", "4", "--whiten", "none", "--workers", "0", "--batch-size", "4", "--quiet"]
TIMEOUT = 120  # seconds for one change to show (generous: the machine is shared)


BATCH = 48  # images added at once before the kill -9


def _image(path: Path, seed: int) -> Path:
    """A distinct small JPEG: a random 8 x 8 grid of colours, scaled up."""
    cells = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(cells).resize((96, 96), Image.NEAREST).save(path, quality=95)
    return path


def _start(folder: Path, index_dir: Path, logs: Path, *extra: str) -> subprocess.Popen:
    """``camretrieval index folder index_dir --watch``, its output in files under ``logs``; returns once its first
    pass is done."""
    logs.mkdir(exist_ok=True)
    out, err = open(logs / "out", "w"), open(logs / "err", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "camretrieval.cli", "index", str(folder), str(index_dir), *OPTIONS, "--watch", *extra],
        stdout=out, stderr=err, text=True,
    )
    _wait(lambda: process.poll() is not None or (logs / "out").read_text().strip(), "the first pass", logs)
    assert process.poll() is None, (logs / "err").read_text()
    assert "watching" in (logs / "err").read_text()
    return process


def _wait(condition, what: str, logs: Path | None = None, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            said = "".join((logs / name).read_text() for name in ("out", "err")) if logs else ""
            raise AssertionError(f"timed out waiting for {what}; the watcher said:\n{said}")
        time.sleep(0.1)


def _catalog(index_dir: Path) -> dict[str, tuple[FileState, str]]:
    """What the index holds now (path -> state when described, status), as a reader sees it ({} while the very first
    transaction that creates the catalog is under way)."""
    try:
        store = IndexStore.open(index_dir)
    except IndexFileError:
        return {}
    try:
        return store.known_files()
    finally:
        store.close()


def _stop(process: subprocess.Popen, logs: Path) -> str:
    """SIGTERM: it must exit 0 and say what it did."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, (logs / "err").read_text()
    out = (logs / "out").read_text()
    assert "stopped watching:" in out
    return out


def _assert_complete_and_exact(index_dir: Path, folder: Path, tmp_path: Path) -> None:
    """The index holds exactly the folder's images, passes the storage check, keeps no leftover shard, and its
    descriptors equal those of a clean build of the folder as it is now."""
    store = IndexStore.open(index_dir)
    try:
        assert check_index(store) == []
        snapshot = store.snapshot()
        descriptors, _, _ = load_snapshot(store, snapshot, with_maps=False)
    finally:
        store.close()
    expected = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    assert snapshot.paths == expected
    shards = {p.name for p in (index_dir / SHARDS).iterdir()}
    assert not any(name.endswith(".partial") for name in shards) and shards == set(snapshot.shards)
    clean_dir = tmp_path / "clean"
    update_index(clean_dir, folder, None, ExtractionSettings(size=SIZE, n_classes=4), workers=0, progress=False)
    clean = IndexStore.open(clean_dir)
    try:
        clean_snapshot = clean.snapshot()
        clean_descriptors, _, _ = load_snapshot(clean, clean_snapshot, with_maps=False)
    finally:
        clean.close()
    assert clean_snapshot.paths == snapshot.paths
    assert np.abs(descriptors - clean_descriptors).max() < 1e-4


def _generation(index_dir: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index_dir / CATALOG}?mode=ro", uri=True) as connection:
            row = connection.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def test_a_watch_follows_every_change_survives_kill_9_and_resumes_polling(tmp_path):
    folder, index_dir, logs = tmp_path / "photos", tmp_path / "index", tmp_path / "logs1"
    for seed in range(3):
        _image(folder / f"start{seed}.jpg", seed)
    process = _start(folder, index_dir, logs, "--commit-every", "2")
    try:
        assert "file-system events" in (logs / "err").read_text()
        assert set(_catalog(index_dir)) == {"start0.jpg", "start1.jpg", "start2.jpg"}

        # Added, one of them written slowly in two halves: it is described once whole, not half-written.
        _image(folder / "added.jpg", 10)
        data = _image(tmp_path / "slow.jpg", 11).read_bytes()
        with open(folder / "slow.jpg", "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            time.sleep(0.4)
            file.write(data[len(data) // 2 :])
        (folder / "notes.txt").write_text("not an image name: ignored")
        _wait(lambda: {"added.jpg", "slow.jpg"} <= set(_catalog(index_dir)), "the added files", logs)
        catalog = _catalog(index_dir)
        assert catalog["slow.jpg"] == (FileState.of(folder / "slow.jpg"), "done") and "notes.txt" not in catalog

        # Modified: described again (the index records the new size and mtime).
        _image(folder / "start0.jpg", 20)
        _wait(lambda: _catalog(index_dir)["start0.jpg"][0] == FileState.of(folder / "start0.jpg"), "the change", logs)

        # Renamed and deleted.
        (folder / "start1.jpg").rename(folder / "renamed.jpg")
        (folder / "start2.jpg").unlink()
        _wait(lambda: set(_catalog(index_dir)) == {"start0.jpg", "added.jpg", "slow.jpg", "renamed.jpg"}, "rename", logs)

        # A folder moved in whole, then deleted.
        for seed in (30, 31):
            _image(tmp_path / "outside" / f"sub{seed}.jpg", seed)
        shutil.move(tmp_path / "outside", folder / "sub")
        _wait(lambda: {"sub/sub30.jpg", "sub/sub31.jpg"} <= set(_catalog(index_dir)), "the moved-in folder", logs)

        # A search meanwhile sees the last commit: the query's own file first, with score 1.
        result = subprocess.run(
            [sys.executable, "-m", "camretrieval.cli", "search", str(index_dir), str(folder / "renamed.jpg"),
             "--json", "--top", "3"],
            capture_output=True, text=True, timeout=TIMEOUT,
        )
        assert result.returncode == 0, result.stderr
        top = json.loads(result.stdout)[0]["results"][0]
        assert top["path"] == "renamed.jpg" and top["score"] == pytest.approx(1, abs=1e-4)

        shutil.rmtree(folder / "sub")
        _wait(lambda: not any(path.startswith("sub/") for path in _catalog(index_dir)), "the deleted folder", logs)

        # 48 images at once: a batch of 24 commits of 2. kill -9 once it committed the first: in the middle of it
        # (a batch short enough to finish between two looks at the catalog would not test that).
        before = _generation(index_dir)
        for seed in range(BATCH):
            _image(folder / f"img{seed:02d}.jpg", 100 + seed)
        _wait(lambda: _generation(index_dir) > before, "the first commit of the batch", logs)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    interrupted = _catalog(index_dir)
    assert 4 < len(interrupted) < 4 + BATCH and all(status == "done" for _, status in interrupted.values())
    store = IndexStore.open(index_dir)
    try:
        assert check_index(store) == []  # what was committed is whole
    finally:
        store.close()

    # Restarted, polling: it resumes, and catches up with a change made while it was not running.
    (folder / "img11.jpg").unlink()
    logs = tmp_path / "logs2"
    process = _start(folder, index_dir, logs, "--poll", "0.3", "--commit-every", "2")
    try:
        assert "polling every 0.3 s" in (logs / "err").read_text()
        assert len(_catalog(index_dir)) == 4 + BATCH - 1
        _image(folder / "late.jpg", 200)
        (folder / "img00.jpg").rename(folder / "img00-renamed.jpg")
        _wait(lambda: {"late.jpg", "img00-renamed.jpg"} <= set(_catalog(index_dir)), "changes seen by polling", logs)
        _wait(lambda: "img00.jpg" not in _catalog(index_dir), "a rename seen by polling", logs)
    except BaseException:
        process.kill()
        raise
    out = _stop(process, logs)
    assert out.splitlines()[-1].endswith(f"{4 + BATCH} images in {index_dir}")
    _assert_complete_and_exact(index_dir, folder, tmp_path)


def test_the_native_observer_falls_back_to_polling_when_it_cannot_start(tmp_path, monkeypatch):
    class NoInotify(watch.Observer):
        def start(self):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(watch, "Observer", NoInotify)
    changes = watch.FolderChanges(tmp_path)
    observer, how = watch.start_observer(tmp_path, changes, poll=None)
    try:
        assert isinstance(observer, PollingObserver)
        assert how == "polling every 2 s; native file-system events could not start (inotify watch limit reached)"
        _image(tmp_path / "new.jpg", 1)
        _wait(lambda: changes.pending() == 1, "the poll to see a new file", timeout=30)
    finally:
        observer.stop()
        observer.join()


def test_a_file_is_taken_once_its_size_and_mtime_have_settled(tmp_path):
    changes = watch.FolderChanges(tmp_path)
    growing = tmp_path / "growing.jpg"
    growing.write_bytes(b"x")
    for event in (FileCreatedEvent(str(growing)), FileCreatedEvent(str(tmp_path / ".hidden.jpg")),
                  FileCreatedEvent(str(tmp_path / "notes.txt"))):
        changes.on_any_event(event)
    assert changes.take_ready(0.3) == (set(), set(), False)  # first look: it starts settling
    for _ in range(4):  # still being written: never ready
        time.sleep(0.2)
        with open(growing, "ab") as file:
            file.write(b"x")
        assert changes.take_ready(0.3)[0] == set()
    time.sleep(0.35)
    assert changes.take_ready(0.3)[0] == {"growing.jpg"}  # hidden and non-image names were never pending
    assert changes.pending() == 0
    # An event resets the clock even when size and mtime look the same.
    changes.on_any_event(FileModifiedEvent(str(growing)))
    assert changes.take_ready(0.0)[0] == set() and changes.take_ready(0.0)[0] == {"growing.jpg"}


def test_a_watch_from_an_empty_folder_in_process_stops_when_asked_and_argument_errors(tmp_path, capsys):
    """An empty folder is an empty index that fills as images arrive; watch_folder returns when ``stop`` is set;
    --poll without --watch and --watch with Ray are refused before any work."""
    folder, index_dir = tmp_path / "photos", tmp_path / "index"
    folder.mkdir()
    stop = threading.Event()
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(summary=watch.watch_folder(
            index_dir, folder, None, ExtractionSettings(size=SIZE, n_classes=4), workers=0, progress=False,
            poll=0.2, stop=stop,
        )),
        daemon=True,
    )
    thread.start()
    try:
        _wait(lambda: _generation(index_dir) > 0, "the first pass")
        assert _catalog(index_dir) == {}  # an empty index, searchable (no images yet)
        _image(folder / "a.jpg", 1)
        _wait(lambda: "a.jpg" in _catalog(index_dir), "the first image")
        with IndexStore.writing(index_dir):  # another writer holds the lock: the batch waits for it
            _image(folder / "b.jpg", 2)
            time.sleep(2.5)
            assert "b.jpg" not in _catalog(index_dir)
        _wait(lambda: "b.jpg" in _catalog(index_dir), "the batch that waited for the lock")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    summary = result["summary"]
    assert (summary.added, summary.batches, summary.total, summary.interrupted_batch) == (2, 2, 2, False)

    assert main(["index", str(folder), str(tmp_path / "i2"), "--poll", "1"]) == 2
    assert "--poll sets how often --watch lists the folder: add --watch" in capsys.readouterr().err
    assert main(["index", str(folder), str(tmp_path / "i2"), "--watch", "--engine", "ray"]) == 2
    assert "leave out --engine ray" in capsys.readouterr().err
    assert main(["index", str(folder), str(tmp_path / "i2"), "--watch", "--poll", "0"]) == 2
    assert "must be more than 0 seconds" in capsys.readouterr().err
    assert not (tmp_path / "i2").exists()
