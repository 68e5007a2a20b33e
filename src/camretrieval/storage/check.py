"""Checking an index folder against its catalog, cheaply: that every file the catalog points to is there, whole,
and of the shape the catalog says (``.npy`` headers and sizes; nothing is loaded), and that the approximate index
is readable. ``camretrieval check`` reports it without writing; ``camretrieval index`` repairs what it finds by
describing again, from the images on disk, the images whose shard is damaged (:func:`repair`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camretrieval.storage.catalog import ANN, IndexStore
from camretrieval.storage.map_codec import MapsDamagedError
from camretrieval.storage.maps import LAYERS, BlockCells, maps_files, shard_maps_format, upgrade_shard_maps
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


def check_index(store: IndexStore, verify_maps: bool = False) -> list[Damage]:
    """Every problem of the files the catalog of ``store`` points to (empty: the index is sound). ``verify_maps``:
    also decode every stored block of maps (``index --verify``), which finds bytes damaged
    inside a block; without it only their headers and lengths are checked."""
    meta = store.meta()
    rows = store.connection.execute(
        "SELECT shard, COUNT(*), MAX(row) FROM images WHERE status = 'done' GROUP BY shard"
    ).fetchall()
    damages = []
    for shard, count, last_row in rows:
        problem = _shard_problem(store.shard_path(shard), last_row + 1, meta, verify_maps)
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


def _shard_problem(folder: Path, rows: int, meta: dict, verify_maps: bool = False) -> str | None:
    """What is wrong with one shard that must hold at least ``rows`` images, or None."""
    try:
        shape = npy_shape(folder / DESCRIPTORS)
        if len(shape) != 2 or shape[0] < rows or (meta.get("dim") and shape[1] != meta["dim"]):
            return f"{DESCRIPTORS} holds shape {shape}, the catalog needs {rows} rows of {meta.get('dim')}"
        if meta.get("maps"):
            problem = _maps_problem(folder, rows, bool(meta["maps"].get("separate_cam_layer")), verify_maps)
            if problem:
                return problem
    except (OSError, ValueError) as error:
        return f"missing or damaged file ({error})"
    return None


def _maps_problem(folder: Path, rows: int, separate_cam_layer: bool, verify_maps: bool = False) -> str | None:
    """What is wrong with a shard's maps files (either format), or None. Format 2: every block's header is read and
    its sections must end within the file; with ``verify_maps`` every block is also decoded (otherwise a damaged
    section is found, and named, when a search decodes it)."""
    maps_format = shard_maps_format(folder)
    if maps_format is None:
        return "its maps files are missing"
    for layer in LAYERS[: 2 if separate_cam_layer else 1]:
        names = maps_files(layer, maps_format)
        tables = [npy_shape(folder / name) for name in names[1:]]  # the table (and format 1's positive counts)
        if any(shape[0] < rows for shape in tables):
            return f"the maps of {layer} describe fewer images than the catalog names"
        if maps_format == 1:
            npy_shape(folder / names[0])
            continue
        try:
            blocks = BlockCells(np.memmap(folder / names[0], dtype=np.uint8, mode="r"), folder / names[0])
            table = np.load(folder / names[1], allow_pickle=False)
            blocks.check_blocks(table[:, 0])
            if verify_maps:
                blocks.verify_blocks(table)
        except MapsDamagedError as error:
            return f"damaged maps of {layer} ({error})"
    return None


def maps_formats(store: IndexStore) -> dict[int, list[str]]:
    """The shards of the index that hold maps, by maps format (1: float16, written before issue 14; 2: compressed)."""
    formats: dict[int, list[str]] = {}
    for (shard,) in store.connection.execute("SELECT DISTINCT shard FROM images WHERE status = 'done'").fetchall():
        maps_format = shard_maps_format(store.shard_path(shard))
        if maps_format is not None:
            formats.setdefault(maps_format, []).append(shard)
    return formats


def upgrade_maps(store: IndexStore, progress: bool = False) -> int:
    """Re-encode every format 1 shard of the index into format 2 (:func:`camretrieval.storage.maps.upgrade_shard_maps`:
    lossless, about 19x smaller). Needs the writer lock (:meth:`IndexStore.writing`). Returns the shards upgraded."""
    meta = store.meta()
    old = maps_formats(store).get(1, []) if meta.get("maps") else []
    if old and progress:
        print(f"re-encoding the maps of {len(old)} shards into the compressed format 2 (lossless)", file=sys.stderr)
    separate = bool(meta["maps"].get("separate_cam_layer")) if old else False
    return sum(upgrade_shard_maps(store.shard_path(shard), separate) for shard in old)


def repair(store: IndexStore, damages: list[Damage]) -> int:
    """Make the catalog forget what ``damages`` affect, so that the images of a damaged shard count as new (the
    writer describes them again from the images on disk) and a damaged approximate index is rebuilt. Returns how many
    images will be described again. Needs the writer lock (:meth:`IndexStore.writing`)."""
    shards = [damage.shard for damage in damages if damage.shard]
    return store.forget_shards(shards, drop_ann=any(damage.shard is None for damage in damages))
