"""An index folder as a durable store that grows and shrinks: a SQLite catalog and immutable shards.

Layout (nothing in it is a pickle):

- ``catalog.sqlite``: the source of truth, SQLite in WAL mode. ``meta`` holds the format version, the extraction
  settings, the indexed folder and a generation number that every commit increments; ``images`` has one row per
  file seen: its path relative to the indexed folder, its size and mtime when it was described, its status (``done``
  or ``failed``, with the error) and, when done, where its descriptor is (shard, row); ``shards`` lists the shards.
- ``whitening-<digest>.npz``: the PCA-whitening the descriptors were made with (queries need it), named in ``meta``;
  absent for raw descriptors.
- ``shards/<name>/``: what one commit described: ``descriptors.npy`` (n x dim, float32) and, unless the index keeps
  no maps, the maps files of :mod:`camretrieval.storage.maps` for query-time refinement. Written under
  ``shards/<name>.partial/``, renamed when complete, never modified afterwards.
- ``ann.faiss``: the approximate FAISS index when one was asked for (``meta`` says which generation it covers).
- ``writer.lock``: the lock (``flock``) that one writing process holds; the kernel releases it when that process
  ends, however it ends.

Crash safety: an image is done exactly when the transaction that names its shard has committed, and the shard is
complete on disk before that (files fsynced, folder renamed, parent fsynced). A process killed at any moment, SIGKILL
included, leaves at worst a ``.partial`` folder or a shard that no row names; readers never look at either, and the
next writer deletes them. Readers take their snapshot of the catalog in one read transaction, which in WAL mode never
waits for the writer, and then read only shards, which never change.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import sqlite3
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import faiss
import numpy as np

from camretrieval.errors import CamRetrievalError
from camretrieval.method.whitening import PCAWhitening
from camretrieval.storage.files import fsync_directory, write_atomically

FORMAT = "camretrieval-index"
FORMAT_VERSION = 2
CATALOG = "catalog.sqlite"
SHARDS = "shards"
LOCK = "writer.lock"
ANN = "ann.faiss"
# Starts the recorded error of a file that failed for a reason that may pass (missing, no permission): such a file
# is tried again at the next run even if it has not changed (known_files says "retry").
RETRY_MARK = "[retry] "

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, count INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    shard TEXT REFERENCES shards (name),
    row INTEGER,
    error TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_by_shard ON images (shard);
"""


class IndexFileError(CamRetrievalError):
    """An index folder that is missing, damaged, from an incompatible version, or busy with another writer."""


def path_to_sql(path: str) -> str | bytes:
    """A file name as the catalog stores it: text when it is valid UTF-8, else the bytes the file system has (a name
    that is not UTF-8 reaches Python as a str with surrogate escapes, which SQLite's text cannot hold)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def path_from_sql(value: str | bytes) -> str:
    """The file name :func:`path_to_sql` stored, as Python names that file (:func:`os.fsdecode`)."""
    return value if isinstance(value, str) else os.fsdecode(value)


def _printable(text: str) -> str:
    """Text SQLite can store: a file name's undecodable bytes (surrogate escapes) shown as escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def rebuild_hint(directory: Path) -> str:
    """The command that builds an index at ``directory`` ([--pca]: with the whitening it had, if any)."""
    return f"camretrieval index IMAGES_DIR {directory} [--pca PCA_FILE]"


def repair_hint(directory: Path) -> str:
    """The command that repairs a damaged index at ``directory`` (:func:`camretrieval.storage.check.check_index`)."""
    return (f"camretrieval index IMAGES_DIR {directory} --verify (with the options it was built with) finds the damaged "
            "shards, decoding every stored block, and describes their images again")


@dataclass(frozen=True)
class FileState:
    """What identifies a file's content cheaply: a changed size or modification time means describe it again."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileState":
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns)


@dataclass
class Snapshot:
    """The live images of a store at one moment, in path order, and where each one's descriptor is."""

    meta: dict
    paths: list[str]
    shards: list[str]  # the shards the images' rows are in
    shard_of: list[int]  # per image, its shard (an index into ``shards``)
    rows: list[int]  # per image, its row in that shard
    generation: int


class IndexStore:
    """The files of one index folder (see the module docstring). Open it with :meth:`open` to read, and with
    :meth:`writing` to change it."""

    def __init__(self, directory: Path, connection: sqlite3.Connection) -> None:
        self.directory = directory
        self.connection = connection
        self._lock_file = None

    # --- opening ---

    @staticmethod
    def exists(directory: str | Path) -> bool:
        return (Path(directory) / CATALOG).is_file()

    @classmethod
    def open(cls, directory: str | Path) -> "IndexStore":
        """Open an existing store to read it."""
        directory = Path(directory)
        if not cls.exists(directory):
            if (directory / "index.json").is_file():
                raise IndexFileError(
                    f"{directory} was written by an older camretrieval (index format 1); this one reads format "
                    f"{FORMAT_VERSION}: rebuild it with {rebuild_hint(directory)}"
                )
            raise IndexFileError(
                f"no camretrieval index at {directory} ({CATALOG} missing): build one with {rebuild_hint(directory)}"
            )
        store = cls(directory, _connect(directory / CATALOG, read_only=not _writable(directory)))
        store._check_format()
        return store

    @classmethod
    @contextmanager
    def writing(cls, directory: str | Path) -> Iterator["IndexStore"]:
        """The store, created if needed, with the writer lock held; refused at once if another process holds it.
        Leftovers of an interrupted writer (partial or unnamed shards) are deleted first."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise IndexFileError(f"{directory} is a file, not an index folder")
        if directory.is_dir() and not cls.exists(directory) and any(directory.iterdir()):
            if (directory / "index.json").is_file():
                raise IndexFileError(
                    f"{directory} holds an index of an older camretrieval (format 1), which cannot be updated: "
                    "delete that folder or index into a new one"
                )
            raise IndexFileError(f"{directory} is not empty and holds no camretrieval index: choose another folder")
        try:
            (directory / SHARDS).mkdir(parents=True, exist_ok=True)
            if not _writable(directory):
                raise PermissionError(f"{directory} is read-only")
            lock_file = _acquire_writer_lock(directory / LOCK)
        except OSError as error:  # a read-only file system or folder, a lock that is not a file, ...
            raise IndexFileError(
                f"cannot write to the index at {directory} ({error.strerror or error}): index into a folder you can "
                "write to (searching a read-only index works)"
            ) from error
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"process {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})")
        lock_file.flush()
        try:
            store = cls(directory, _connect(directory / CATALOG))
        except BaseException:
            lock_file.close()
            raise
        store._lock_file = lock_file
        try:
            store.connection.executescript(_SCHEMA)
            if store._meta_value("format") is None:
                store.set_meta({"format": FORMAT, "version": FORMAT_VERSION, "generation": 0})
            store._check_format()
            store.delete_unused_files()
            yield store
        except sqlite3.DatabaseError as error:  # a damaged page of the catalog, met anywhere while writing
            raise IndexFileError(
                f"the catalog of {directory} is damaged ({error}): it is the index's source of truth and cannot be "
                f"repaired; move {directory} away and run camretrieval index again to rebuild it"
            ) from error
        finally:
            store.connection.close()
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.close()  # releases the lock

    def close(self) -> None:
        self.connection.close()

    def _check_format(self) -> None:
        try:
            found = self._meta_value("format"), self._meta_value("version")
        except sqlite3.DatabaseError as error:
            raise IndexFileError(f"the catalog of {self.directory} is damaged ({error}): rebuild the index") from error
        if found[0] != FORMAT:
            raise IndexFileError(f"{self.directory} is not a camretrieval index")
        if found[1] != FORMAT_VERSION:
            raise IndexFileError(
                f"{self.directory} was written in index format {found[1]}; this camretrieval reads format "
                f"{FORMAT_VERSION}: rebuild it with {rebuild_hint(self.directory)}"
            )

    # --- meta ---

    def _meta_value(self, key: str):
        try:
            row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return None
            raise
        return json.loads(row[0]) if row else None

    def meta(self) -> dict:
        return {key: json.loads(value) for key, value in self.connection.execute("SELECT key, value FROM meta")}

    def set_meta(self, values: dict) -> None:
        with self.transaction():
            self.connection.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(key, json.dumps(value)) for key, value in values.items()],
            )

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error)."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self.connection
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    # --- reading ---

    def snapshot(self) -> Snapshot:
        """The live images and the meta data, read in one transaction (a consistent view while a writer commits)."""
        try:
            self.connection.execute("BEGIN")
            try:
                meta = self.meta()
                rows = self.connection.execute(
                    "SELECT path, shard, row FROM images WHERE status = 'done' ORDER BY path"
                ).fetchall()
            finally:
                self.connection.execute("COMMIT")
        except sqlite3.DatabaseError as error:
            raise IndexFileError(f"the catalog of {self.directory} is damaged ({error}): rebuild the index") from error
        shards: dict[str, int] = {}
        shard_of = [shards.setdefault(shard, len(shards)) for _, shard, _ in rows]
        return Snapshot(
            meta, [path_from_sql(path) for path, _, _ in rows], list(shards), shard_of, [row for *_, row in rows],
            meta["generation"],
        )

    def known_files(self) -> dict[str, tuple[FileState, str]]:
        """Every file the catalog knows: path -> (its state when described, status): "done", "failed" (it could not
        be decoded: skipped until it changes), or "retry" (it could not be read: tried again at the next run)."""
        rows = self.connection.execute(
            "SELECT path, size, mtime_ns, CASE WHEN status = 'failed' AND substr(error, 1, ?) = ? THEN 'retry' "
            "ELSE status END FROM images",
            (len(RETRY_MARK), RETRY_MARK),
        )
        return {path_from_sql(path): (FileState(size, mtime_ns), status) for path, size, mtime_ns, status in rows}

    def count_done(self) -> int:
        """How many images the index holds."""
        return self.connection.execute("SELECT COUNT(*) FROM images WHERE status = 'done'").fetchone()[0]

    def failures(self) -> list[tuple[str, str]]:
        rows = self.connection.execute("SELECT path, error FROM images WHERE status = 'failed' ORDER BY path")
        return [(path_from_sql(path), error) for path, error in rows]

    def shard_path(self, name: str) -> Path:
        return self.directory / SHARDS / name

    # --- writing (with the lock of :meth:`writing`) ---

    def commit(
        self,
        shard: str | None,
        done: Sequence[tuple[str, FileState, int]],
        failed: Sequence[tuple[str, FileState, str]] = (),
        meta: dict | None = None,
        replace: bool = False,
    ) -> None:
        """Record, in one transaction, images described into ``shard`` (path, state, row), files that failed, and
        ``meta`` values; ``replace``: forget every image recorded before."""
        now = time.time()
        with self.transaction() as connection:
            if replace:
                connection.execute("DELETE FROM images")
            if meta:
                connection.executemany(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                    [(key, json.dumps(value)) for key, value in meta.items()],
                )
            if shard is not None:
                connection.execute("INSERT INTO shards (name, count, created) VALUES (?, ?, ?)", (shard, len(done), now))
            connection.executemany(
                "INSERT OR REPLACE INTO images (path, size, mtime_ns, status, shard, row, error, updated) "
                "VALUES (?, ?, ?, 'done', ?, ?, NULL, ?)",
                [(path_to_sql(path), state.size, state.mtime_ns, shard, row, now) for path, state, row in done],
            )
            connection.executemany(
                "INSERT OR REPLACE INTO images (path, size, mtime_ns, status, shard, row, error, updated) "
                "VALUES (?, ?, ?, 'failed', NULL, NULL, ?, ?)",
                [(path_to_sql(path), state.size, state.mtime_ns, _printable(error), now) for path, state, error in failed],
            )
            self._bump_generation(connection)

    def save_whitening(self, whitening: PCAWhitening | None) -> str | None:
        """Write a whitening file for a commit to name (``whitening-<digest>.npz``: a file in use is never
        overwritten); returns its name, None without whitening."""
        if whitening is None:
            return None
        buffer = io.BytesIO()
        whitening.save(buffer)
        data = buffer.getvalue()
        name = f"whitening-{hashlib.sha256(data).hexdigest()[:16]}.npz"
        if not (self.directory / name).is_file():
            write_atomically(self.directory / name, lambda file: file.write(data))
            fsync_directory(self.directory)
        return name

    def remove(self, paths: Sequence[str]) -> int:
        """Forget images (and failures); returns how many the catalog had. Their shards' rows become unused."""
        with self.transaction() as connection:
            removed = 0
            for path in paths:
                removed += connection.execute("DELETE FROM images WHERE path = ?", (path_to_sql(path),)).rowcount
            if removed:
                self._bump_generation(connection)
        return removed

    def forget_shards(self, shards: Sequence[str], drop_ann: bool = False) -> int:
        """Forget, in one transaction, the images described into ``shards`` (they count as new at the next run) and,
        with ``drop_ann``, the approximate index (rebuilt at the next run). Returns how many images were forgotten."""
        with self.transaction() as connection:
            forgotten = sum(
                connection.execute("DELETE FROM images WHERE shard = ?", (shard,)).rowcount for shard in shards
            )
            if drop_ann:
                connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ann', 'null')")
            self._bump_generation(connection)
        return forgotten

    def _bump_generation(self, connection: sqlite3.Connection) -> None:
        connection.execute(
            "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'generation'"
        )

    def delete_unused_files(self) -> list[str]:
        """Delete what no commit uses: leftovers of an interrupted writer (``.partial`` folders, shards written but
        never committed, whitening files never named), shards whose every image was removed or described again, and
        an approximate index of another generation."""
        with self.transaction() as connection:
            connection.execute("DELETE FROM shards WHERE name NOT IN (SELECT DISTINCT shard FROM images WHERE shard IS NOT NULL)")
            named = {name for (name,) in connection.execute("SELECT name FROM shards")}
        meta = self.meta()
        deleted = []
        for folder in sorted((self.directory / SHARDS).iterdir()):
            if folder.name not in named:
                shutil.rmtree(folder, ignore_errors=True) if folder.is_dir() else folder.unlink(missing_ok=True)
                deleted.append(folder.name)
        for file in self.directory.glob("whitening-*.npz*"):
            if file.name != meta.get("whitening"):
                file.unlink(missing_ok=True)
                deleted.append(file.name)
        ann = meta.get("ann")
        if ann is None or ann.get("generation") != meta["generation"]:
            for file in self.directory.glob(ANN + "*"):
                file.unlink(missing_ok=True)
                deleted.append(file.name)
        return deleted

    # --- the approximate index ---

    def save_ann(self, index: faiss.Index, settings: dict) -> None:
        """Store an approximate FAISS index of the current generation's descriptors (in snapshot order)."""
        data = faiss.serialize_index(index)
        write_atomically(self.directory / ANN, lambda file: file.write(data.tobytes()))
        fsync_directory(self.directory)
        with self.transaction() as connection:
            generation = json.loads(connection.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
            connection.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('ann', ?)",
                (json.dumps(settings | {"generation": generation, "bytes": int(data.nbytes)}),),
            )

    def load_ann(self, snapshot: Snapshot) -> faiss.Index | None:
        """The approximate index, when one was built for exactly this snapshot's generation; None otherwise (no
        approximate index asked for, or one left behind by an interrupted run: search is then exact, and says so)."""
        ann = snapshot.meta.get("ann")
        if not ann:
            return None
        if ann.get("generation") != snapshot.generation:
            warnings.warn(
                f"the approximate index of {self.directory} is older than its catalog (an interrupted run?): "
                f"searching exactly; rerun camretrieval index on it to rebuild the approximate index",
                stacklevel=3,
            )
            return None
        try:
            index = faiss.deserialize_index(np.fromfile(self.directory / ANN, dtype=np.uint8))
        except (OSError, RuntimeError) as error:
            raise IndexFileError(f"{self.directory / ANN} is unreadable ({error}): rerun camretrieval index") from error
        if index.ntotal != len(snapshot.paths):
            raise IndexFileError(f"{self.directory / ANN} does not match the catalog: rerun camretrieval index")
        return index


def _acquire_writer_lock(path: Path, orphan_wait: float = 30.0):
    """The writer lock (an exclusive ``flock``), or an error naming the process that holds it.

    DataLoader worker processes inherit the lock with the writer's open files (fork). When a writer is killed they
    notice within seconds and exit, releasing it: while the recorded holder is dead, wait for them (at most
    ``orphan_wait`` seconds) instead of refusing a rerun that follows a ``kill -9`` at once."""
    lock_file = open(path, "a+")
    deadline = time.monotonic() + orphan_wait
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock_file
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip()
            if not _holder_alive(holder) and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            lock_file.close()
            raise IndexFileError(
                f"{path.parent} is being written by {holder or 'another process'}: only one camretrieval index or "
                "remove may write to an index at a time; wait for it to finish (searching the index meanwhile is fine)"
            ) from None


def _holder_alive(holder: str) -> bool:
    """Whether the process named in the lock file ("process PID (since ...)") still runs; True when unknown."""
    try:
        os.kill(int(holder.split()[1]), 0)
    except (IndexError, ValueError):
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _writable(directory: Path) -> bool:
    """Whether this process may create files in ``directory`` (False on a read-only file system)."""
    return os.access(directory, os.W_OK | os.X_OK)


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    """The catalog's connection. ``read_only``: an index in a folder this process cannot write to (a read-only file
    system), where no writer can exist: opened read-only, and immutable when SQLite cannot read its write-ahead log
    there (it would have to create its index file), so a sound index stays searchable."""
    try:
        if read_only:
            uri = f"file:{quote(str(path.resolve()))}?mode=ro"
            try:
                connection = sqlite3.connect(uri, uri=True, isolation_level=None)
                connection.execute("SELECT COUNT(*) FROM meta").fetchone()
                return connection
            except sqlite3.OperationalError:
                return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)
        connection = sqlite3.connect(path, timeout=60, isolation_level=None)  # transactions are explicit
        connection.execute("PRAGMA journal_mode = WAL")  # readers never wait for the writer, nor it for them
        connection.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
    except sqlite3.DatabaseError as error:
        raise IndexFileError(f"{path} is not a readable catalog ({error}): rebuild the index") from error
    return connection
