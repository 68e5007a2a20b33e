"""An index that follows its folder (``camretrieval index DIR IDX --watch``).

:func:`watch_folder` brings the index up to date with the whole folder once (removing what left it), then waits for
file-system events (watchdog: inotify on Linux; polling where native events cannot start, or with ``poll``). A file
is taken once its size and modification time have stayed the same for ``settle`` seconds (a file being copied is
not described half-written), and what is ready is applied in one batch through :func:`update_index`, the one write
path, limited to those files: new and changed ones are described and committed every ``commit_every`` images,
vanished ones removed (a rename is both). Searching sees the last commit all along. SIGINT or SIGTERM abandon the
batch in progress (what it committed stays; the rest is described at the next start) and return.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from camretrieval.constants import DEFAULT_COMMIT_EVERY
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.describer import Describer
from camretrieval.extraction.images import IMAGE_EXTENSIONS, find_images
from camretrieval.extraction.settings import ExtractionSettings
from camretrieval.method.whitening import PCAWhitening
from camretrieval.storage.catalog import LOCK, FileState, IndexFileError, IndexStore
from camretrieval.storage.writer import UpdateReport, update_index

DEFAULT_SETTLE_SECONDS = 1.0  # a file is taken once its size and mtime have not changed for this long
FALLBACK_POLL_SECONDS = 2.0  # the polling interval when native events cannot start and none was given
# What the watcher listens to: reads of the images (opened, closed without writing) would wake it for nothing.
_EVENTS = [
    FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileDeletedEvent, FileMovedEvent,
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
]


@dataclass
class WatchSummary:
    """What a :func:`watch_folder` run did, the first full pass included."""

    batches: int = 0  # batches that changed something
    added: int = 0
    updated: int = 0
    removed: int = 0
    unusable: int = 0
    total: int = 0  # images in the index when it stopped
    interrupted_batch: bool = False  # stopped in the middle of a batch (its uncommitted images: at the next start)


class FolderChanges(FileSystemEventHandler):
    """Collects, from watchdog's thread, what changed under ``root``: image files (relative POSIX paths), folders
    (created, deleted or moved: everything under them is looked at) and whether the whole folder must be listed
    again (the root itself changed, or events were lost). :meth:`take_ready` hands out what has settled."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.wakeup = threading.Event()
        self._lock = threading.Lock()
        self._files: dict[str, tuple[FileState | None, float] | None] = {}  # None: not looked at since its last event
        self._folders: dict[str, float] = {}  # folder -> time of its last event
        self._rescan = False

    def _relative(self, path: str | bytes) -> str | None:
        relative = os.path.relpath(os.fsdecode(path), self.root)
        if relative == "." or relative.startswith(".." + os.sep) or relative == "..":
            return "." if relative == "." else None
        return Path(relative).as_posix()

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [event.src_path] + ([event.dest_path] if getattr(event, "dest_path", "") else [])
        now = time.monotonic()
        with self._lock:
            for path in paths:
                relative = self._relative(path)
                if relative is None or any(part.startswith(".") for part in relative.split("/") if part != "."):
                    continue  # outside the folder, or hidden (never indexed)
                if relative == ".":
                    self._rescan = True
                elif event.is_directory:
                    self._folders[relative] = now
                elif os.path.splitext(relative)[1].lower() in IMAGE_EXTENSIONS:
                    self._files[relative] = None
        self.wakeup.set()

    def request_rescan(self) -> None:
        with self._lock:
            self._rescan = True
        self.wakeup.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._files) + len(self._folders) + self._rescan

    def take_ready(self, settle: float) -> tuple[set[str], set[str], bool]:
        """The files whose state (size, mtime, or absence) has not changed for ``settle`` seconds, the folders without
        events for as long, and whether to list everything; taken out of what is pending."""
        now = time.monotonic()
        with self._lock:
            candidates = dict(self._files)
        observed = {path: _state(self.root / path) for path in candidates}  # stat outside the lock
        ready: set[str] = set()
        with self._lock:
            for path, state in observed.items():
                seen = self._files[path]  # still there: only this method takes paths out
                if seen is None or seen[0] != state:  # a new event since, or a new state: it starts settling now
                    self._files[path] = (state, now)
                elif now - seen[1] >= settle:
                    ready.add(path)
                    del self._files[path]
            folders = {folder for folder, last in self._folders.items() if now - last >= settle}
            for folder in folders:
                del self._folders[folder]
            rescan, self._rescan = self._rescan, False
        return ready, folders, rescan

    def put_back(self, files: set[str], folders: set[str], rescan: bool) -> None:
        """Pending again (a batch that could not run yet)."""
        now = time.monotonic()
        with self._lock:
            for path in files:
                self._files.setdefault(path, None)
            for folder in folders:
                self._folders.setdefault(folder, now)
            self._rescan |= rescan


def _state(path: Path) -> FileState | None:
    try:
        return FileState.of(path)
    except OSError:
        return None


class _OverflowListener(logging.Handler):
    """Asks for a full listing when watchdog logs that the kernel's event queue overflowed (events were lost)."""

    def __init__(self, changes: FolderChanges) -> None:
        super().__init__(logging.WARNING)
        self.changes = changes

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.changes.request_rescan()


def start_observer(root: Path, handler: FileSystemEventHandler, poll: float | None) -> tuple[BaseObserver, str]:
    """A started watchdog observer of ``root`` (recursive) and a few words saying how it watches: native events,
    or polling every ``poll`` seconds when given or when native events cannot start (the inotify limits reached,
    ...). Polling lists the whole folder at each interval, and sees changes made by other machines on a network
    file system, which native events do not."""
    note = ""
    if poll is None:
        observer = Observer()
        try:
            observer.schedule(handler, os.fspath(root), recursive=True, event_filter=_EVENTS)
            observer.start()
            return observer, f"file-system events ({type(observer).__name__.removesuffix('Observer').lower()})"
        except OSError as error:
            note = f"; native file-system events could not start ({error.strerror or error})"
            poll = FALLBACK_POLL_SECONDS
    observer = PollingObserver(timeout=poll)
    observer.schedule(handler, os.fspath(root), recursive=True, event_filter=_EVENTS)
    observer.start()
    return observer, f"polling every {poll:g} s{note}"


def _writer_lock_busy(index_dir: Path) -> bool:
    """Whether another process holds the index's writer lock now (a ``camretrieval index`` or ``remove``)."""
    try:
        with open(index_dir / LOCK, "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, once (in the main thread only: elsewhere, nothing changes). A
    signal the process was started ignoring (SIGINT for a job started with ``&`` by a script) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt

    previous = {
        number: signal.signal(number, interrupt)
        for number in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(number) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def batch_line(report: UpdateReport) -> str:
    """One progress line: what a batch did, how long it took, and the index's size after it."""
    unusable = f", {len(report.failures)} unusable" if report.failures else ""
    return (
        f"{time.strftime('%H:%M:%S')} {report.added} added, {report.updated} updated, {report.removed} removed"
        f"{unusable} in {report.seconds:.1f} s: {report.total} images"
    )


def watch_folder(
    index_dir: str | Path,
    image_root: str | Path,
    whitening: PCAWhitening | None,
    settings: ExtractionSettings,
    keep_maps: bool | None = None,
    batch_size: int | None = None,
    workers: int = 2,
    device: str = "cpu",
    progress: bool = True,
    commit_every: int = DEFAULT_COMMIT_EVERY,
    ann: str | None = None,
    precision: str = "float32",
    float16: bool | None = None,
    poll: float | None = None,
    settle: float = DEFAULT_SETTLE_SECONDS,
    stop: threading.Event | None = None,
) -> WatchSummary:
    """Keep the index in ``index_dir`` following the images under ``image_root`` until SIGINT, SIGTERM or ``stop``
    (see the module docstring); the options are :func:`update_index`'s. Prints a line per batch that changed
    something (stdout) and returns what it did."""
    index_dir, image_root = Path(index_dir), Path(image_root)
    if not image_root.is_dir():
        raise CamRetrievalError(f"{image_root} is not a folder of images")
    if poll is not None and poll <= 0:
        raise CamRetrievalError(f"the polling interval must be more than 0 seconds, got {poll:g}")
    stop = stop or threading.Event()
    summary = WatchSummary()
    root = image_root.resolve()
    changes = FolderChanges(root)
    listener = _OverflowListener(changes)
    loggers = [logging.getLogger("watchdog.observers.inotify_c"), logging.getLogger("watchdog.observers.inotify")]
    options = {
        "keep_maps": keep_maps, "batch_size": batch_size, "workers": workers, "device": device,
        "commit_every": commit_every, "precision": precision, "remove_missing": True,
    }
    observer = None
    in_batch = waiting = False
    with _signals_interrupt():
        try:
            describer = Describer.from_settings(settings, whitening, device, precision)
            settings = describer.settings  # its layers filled in: what update_index checks a describer against
            options["describer"] = describer
            # Watching starts before the first pass: a change made during it is seen.
            observer, how = start_observer(root, changes, poll)
            for logger in loggers:
                logger.addHandler(listener)
            print(f"watching {image_root} ({how}); Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)
            in_batch = True
            first = update_index(
                index_dir, image_root, whitening, settings, progress=progress, ann=ann, float16=float16, **options
            )
            in_batch = False
            _count(summary, first, always=True)
            while not stop.is_set():
                changes.wakeup.wait(timeout=max(0.05, min(0.25, settle / 2)) if changes.pending() else 0.5)
                changes.wakeup.clear()
                if not root.is_dir():
                    raise CamRetrievalError(
                        f"{image_root} is no longer a folder: stopped watching ({_total(index_dir)} images in "
                        f"{index_dir})"
                    )
                if not observer.is_alive():
                    raise CamRetrievalError(f"watching {image_root} stopped unexpectedly: run the same command again")
                files, folders, rescan = changes.take_ready(settle)
                if not (files or folders or rescan):
                    continue
                only = None if rescan else files | _under_folders(index_dir, root, folders)
                if only is not None and not only:  # folders that held no images
                    continue
                in_batch = True
                try:
                    report = update_index(index_dir, image_root, whitening, settings, progress=False, only=only, **options)
                except IndexFileError:
                    if not _writer_lock_busy(index_dir):
                        raise
                    in_batch = False
                    if not waiting:
                        print("another process is writing to the index: waiting for it", file=sys.stderr, flush=True)
                    waiting = True
                    changes.put_back(files, folders, rescan)
                    stop.wait(1.0)
                    continue
                in_batch = waiting = False
                _count(summary, report)
        except KeyboardInterrupt:
            summary.interrupted_batch = in_batch
        finally:
            for logger in loggers:
                logger.removeHandler(listener)
            if observer is not None:
                observer.stop()
                if observer.is_alive():
                    observer.join(timeout=5)
    summary.total = _total(index_dir)
    return summary


def _count(summary: WatchSummary, report: UpdateReport, always: bool = False) -> None:
    """Add a batch's report to the summary and print its line (when it changed something, or ``always``)."""
    for failure in report.failures:
        print(f"skipped {failure.path}: {failure.reason}", file=sys.stderr, flush=True)
    changed = report.added + report.updated + report.removed + len(report.failures)
    if changed or always:
        print(batch_line(report), flush=True)
    summary.batches += bool(changed)
    summary.added += report.added
    summary.updated += report.updated
    summary.removed += report.removed
    summary.unusable += len(report.failures)


def _under_folders(index_dir: Path, root: Path, folders: set[str]) -> set[str]:
    """Every image file under these folders (relative to ``root``), on disk or in the index (a folder deleted or
    moved away: its indexed images are gone)."""
    if not folders:
        return set()
    prefixes = tuple(folder + "/" for folder in folders)
    found = set()
    for folder in folders:
        if (root / folder).is_dir():
            found.update(f"{folder}/{path}" for path in find_images(root / folder))
    if IndexStore.exists(index_dir):
        store = IndexStore.open(index_dir)
        try:
            found.update(path for path in store.known_files() if path.startswith(prefixes))
        finally:
            store.close()
    return found


def _total(index_dir: Path) -> int:
    """How many images the index holds (0 when there is none yet)."""
    if not IndexStore.exists(index_dir):
        return 0
    store = IndexStore.open(index_dir)
    try:
        return store.count_done()
    finally:
        store.close()
