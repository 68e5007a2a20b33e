"""Checking an index folder against its catalog, cheaply: that every file the catalog points to is there, whole,
and of the shape the catalog says (``.npy`` headers and sizes; nothing is loaded), and that the approximate index
is readable. ``camretrieval check`` reports it without writing; ``camretrieval index`` repairs what it finds by
describing again, from the images on disk, the images whose shard is damaged (:func:`repair`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camretrieval.storage.catalog import ANN, IndexStore
from camretrieval.storage.maps import LAYERS, maps_file_names
from camretrieval.storage.shards import DESCRIPTORS


@dataclass
class Damage:
    """One problem: the ``shard`` it is in (None for the approximate index), what is wrong, and how many images it
    affects."""

    shard: str | None
    problem: str
    images: int

    def __str__(self) -> str:
        where = f"shard {self.shard}" if self.shard else ANN
        return f"{where}: {self.problem} ({self.images} images)"


def npy_shape(path: Path) -> tuple[int, ...]:
    """The shape of an ``.npy`` file, mapped, not read: a missing, truncated or malformed file raises OSError or
    ValueError (a memory map longer than its file cannot be made)."""
    return tuple(int(s) for s in np.load(path, mmap_mode="r", allow_pickle=False).shape)


def check_index(store: IndexStore) -> list[Damage]:
    """Every problem of the files the catalog of ``store`` points to (empty: the index is sound)."""
    meta = store.meta()
    rows = store.connection.execute(
        "SELECT shard, COUNT(*), MAX(row) FROM images WHERE status = 'done' GROUP BY shard"
    ).fetchall()
    damages = []
    for shard, count, last_row in rows:
        problem = _shard_problem(store.shard_path(shard), last_row + 1, meta)
        if problem:
            damages.append(Damage(shard, problem, count))
    ann = meta.get("ann")
    if ann and ann.get("generation") == meta.get("generation"):
        path = store.directory / ANN
        try:
            size = path.stat().st_size
            if ann.get("bytes") is not None and size != ann["bytes"]:
                raise ValueError(f"{size} bytes, {ann['bytes']} written")
            if size == 0:
                raise ValueError("empty")
        except (OSError, ValueError) as error:
            damages.append(Damage(None, f"missing or damaged ({error})", store.count_done()))
    return damages


def _shard_problem(folder: Path, rows: int, meta: dict) -> str | None:
    """What is wrong with one shard that must hold at least ``rows`` images, or None."""
    try:
        shape = npy_shape(folder / DESCRIPTORS)
        if len(shape) != 2 or shape[0] < rows or (meta.get("dim") and shape[1] != meta["dim"]):
            return f"{DESCRIPTORS} holds shape {shape}, the catalog needs {rows} rows of {meta.get('dim')}"
        if meta.get("maps"):
            layers = LAYERS[: 2 if meta["maps"].get("separate_cam_layer") else 1]
            for layer in layers:
                cells_name, table_name, positives_name = maps_file_names(layer)
                npy_shape(folder / cells_name)
                if npy_shape(folder / table_name)[0] < rows or npy_shape(folder / positives_name)[0] < rows:
                    return f"the maps of {layer} describe fewer images than the catalog names"
    except (OSError, ValueError) as error:
        return f"missing or damaged file ({error})"
    return None


def repair(store: IndexStore, damages: list[Damage]) -> int:
    """Make the catalog forget what ``damages`` affect, so that the images of a damaged shard count as new (the
    writer describes them again from the images on disk) and a damaged approximate index is rebuilt. Returns how many
    images will be described again. Needs the writer lock (:meth:`IndexStore.writing`)."""
    shards = [damage.shard for damage in damages if damage.shard]
    return store.forget_shards(shards, drop_ann=any(damage.shard is None for damage in damages))
