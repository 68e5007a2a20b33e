"""Durable writes: a file is written beside its final name and renamed (a crash never leaves a half-written file in
place), and the rename made durable by an fsync of its folder."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (POSIX: the entry lives in the folder's own data)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, write) -> None:
    """Write beside the final name, then rename: a crash never leaves a half-written file in place."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
