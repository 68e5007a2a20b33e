"""Index-time storage of every database image's maps, so that query-time refinement (METHOD.md sections 3 and 5:
online aggregation, re-ranking with CAM regions) never decodes or forwards a database image.

What is stored is what one forward pass gives the descriptor (:class:`~camretrieval.extraction.backbones.FeatureMaps`): the
feature layer's maps X, and the CAM layer's activations A only when that layer differs from the feature layer
(efficientnet_lite*, resnet50 and densenet161 use one layer for both; VGG-16-CAM does not). From X and A any class's
CAM (Eq. 1), any region's crop and any class vector (Eq. 2-4) can be recomputed exactly as at index time.

The values are the activations rounded to float16 (11 significant bits: relative error at most 2^-11 per value,
signs kept, values beyond 65504 clipped): OnA descriptors from the stored maps differ from those of fresh float32
maps by at most 1.7e-5 (scores 8e-6) on clutter-dev at 448 px. Two formats hold them, chosen per shard folder (the
files present say which: an index may hold both while it is being upgraded):

- **format 2** (written since issue 14), per layer ``<layer>_maps.blocks``: a 16-byte file header (``CAMRMAPS``,
  format, channels K), then one compressed block per image (:mod:`camretrieval.storage.map_codec`: the non-zero
  float16 values and their positions, zstd; lossless, 37 kB on average for a 448 px image with efficientnet_lite0,
  19x smaller than format 1), and ``<layer>_maps_blocks.npy`` (int64, N x 3: the byte offset of each image's block,
  H, W; in descriptor order). One image's maps decode on their own; the counts of positive cells per channel
  (Eq. 2's Q_k times H x W) come out of the decoding, exactly.
- **format 1** (indexes written before), per layer ``<layer>_maps.npy`` (float16, all images' cells x K,
  cell-major, memory-mapped), ``<layer>_maps_table.npy`` (int64, N x 3: first row, H, W) and
  ``<layer>_maps_positive.npy`` (the positive counts, no longer read: they are counted from the cells). 2 bytes x
  K x cells per image: 681 kB at 448 px. Still read; ``camretrieval index`` re-encodes such shards into format 2
  (:func:`upgrade_shard_maps`, lossless: the same float16 values).

Either way the reader gives float32 tensors, cell-major (one row of K channels per cell: CAMs and class vectors are
then plain matrix products with the rows), of images of one map shape at a time (:meth:`MapStore.batches`, which
decodes the next batch on a second thread while the caller computes on this one), or, for online aggregation on the
CPU, only their non-zero values as one block-diagonal sparse matrix per batch (:meth:`MapStore.sparse_batches`).
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from camretrieval.errors import CamRetrievalError
from camretrieval.method.cell_major import SparseCellMaps
from camretrieval.storage.files import fsync_directory, write_atomically
from camretrieval.storage.map_codec import (
    DecodedBlock,
    MapsDamagedError,
    channel_major,
    decode_block,
    decode_into,
    encode_block,
    positive_counts,
    read_header,
)

MAPS_FORMAT = 2  # what is written
MAPS_DTYPE = np.dtype("<f2")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# Format 1: the .npy header is written once as a placeholder and again, with the final number of rows, when the file
# is complete: a fixed length (a multiple of 64, as the format recommends) lets the second write overwrite the first.
_HEADER_LENGTH = 128
# Format 2: the blocks file's header: magic, format, channels.
_BLOCKS_HEADER = struct.Struct("<8sII")
_BLOCKS_MAGIC = b"CAMRMAPS"
LAYERS = ("features", "cam_activations")

__all__ = [
    "LAYERS", "MAPS_FORMAT", "BlockCells", "DenseCells", "EncodedMaps", "LoadedMaps", "MapStore", "MapStoreWriter",
    "MapsDamagedError", "MapsNotStoredError", "RaggedMaps", "encode_maps", "maps_file_names", "maps_files", "shard_maps_format",
    "upgrade_shard_maps",
]


def count_positives(cells: np.ndarray) -> np.ndarray:
    """Per channel, the number of cells (rows of ``cells``, n x K) where it is positive: Eq. 2's numerator."""
    return np.count_nonzero(np.asarray(cells) > 0, axis=0).astype(np.int32)


class MapsNotStoredError(CamRetrievalError):
    """The index holds no maps, so online aggregation and re-ranking cannot be computed from it."""


def maps_missing_message(what: str) -> str:
    return (
        f"{what} needs the feature maps of the database images, and this index was built without them "
        "(camretrieval index --no-maps, Index.build(keep_maps=False), or a baseline pooling). Build one with them in a "
        "new folder: camretrieval index IMAGES_DIR NEW_INDEX_DIR [--pca PCA_FILE] (without --no-maps)"
    )


def require_maps(maps: "MapStore | None", what: str) -> "MapStore":
    """The stored maps ``what`` (e.g. "online aggregation") needs, or an error saying how to rebuild the index."""
    if maps is None:
        raise MapsNotStoredError(maps_missing_message(what))
    return maps


def maps_file_names(layer: str) -> tuple[str, str, str]:
    """Format 1's (cells file, table file, positive-counts file) of a layer (``"features"`` or ``"cam_activations"``)."""
    return f"{layer}_maps.npy", f"{layer}_maps_table.npy", f"{layer}_maps_positive.npy"


def maps_files(layer: str, maps_format: int) -> tuple[str, ...]:
    """The files of a layer in a shard folder: format 2 (blocks, table) or format 1 (cells, table, positive counts)."""
    if maps_format == 2:
        return f"{layer}_maps.blocks", f"{layer}_maps_blocks.npy"
    if maps_format == 1:
        return maps_file_names(layer)
    raise CamRetrievalError(f"unknown maps format {maps_format}: this camretrieval reads formats 1 and 2")


def shard_maps_format(directory: str | Path) -> int | None:
    """The maps format of a shard folder (2 when its blocks file is there, else 1 when its float16 file is), or
    None when it holds no maps. Format 2's table is written before its blocks file, so seeing the blocks file means
    the shard's format 2 files are complete (an upgrade may then delete the format 1 files)."""
    directory = Path(directory)
    if (directory / maps_files("features", 2)[0]).is_file():
        return 2
    if (directory / maps_files("features", 1)[0]).is_file():
        return 1
    return None


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly :data:`_HEADER_LENGTH` bytes for float16 data of ``shape``."""
    text = repr({"descr": MAPS_DTYPE.str, "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    prefix = np.lib.format.magic(1, 0) + (_HEADER_LENGTH - 10).to_bytes(2, "little")
    body = text.encode("latin1").ljust(_HEADER_LENGTH - 10 - 1) + b"\n"
    header = prefix + body
    if len(header) != _HEADER_LENGTH:
        raise CamRetrievalError(f"maps shape {shape} does not fit a {_HEADER_LENGTH}-byte .npy header")
    return header


class DenseCells:
    """Format 1: the float16 cells (rows x K, cell-major) of the images of a shard; an image is ``count`` rows from
    row ``start``."""

    maps_format = 1

    def __init__(self, cells: np.ndarray) -> None:
        if cells.ndim != 2:
            raise CamRetrievalError(f"maps cells of shape {cells.shape}")
        self.cells = cells
        self.channels = int(cells.shape[1])
        self.nbytes = int(cells.nbytes)

    def check(self, starts: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> None:
        if len(starts) and (starts.min() < 0 or (starts + heights * widths).max() > len(self.cells)):
            raise CamRetrievalError("the maps table points outside the maps files")

    def float16(self, start: int, height: int, width: int) -> np.ndarray:
        return self.cells[start : start + height * width]

    def read_into(self, start: int, height: int, width: int, out: np.ndarray) -> np.ndarray:
        """Write the image's maps into ``out`` (cells x K, float32) and return its positive counts per channel."""
        out[...] = self.float16(start, height, width)
        return count_positives(out)

    def channel_major(self, start: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The image's non-zero values (:func:`~camretrieval.storage.map_codec.channel_major`)."""
        bits = np.ascontiguousarray(self.float16(start, height, width)).reshape(-1).view(np.uint16)
        return channel_major(DecodedBlock(None, bits, None), height * width, self.channels)


class BlockCells:
    """Format 2: a shard's blocks file (memory-mapped bytes); an image is the block at byte ``start``."""

    maps_format = 2

    def __init__(self, data: np.ndarray, location: Path | None = None) -> None:
        self.data = data
        self.location = location
        if len(data) < _BLOCKS_HEADER.size:
            raise MapsDamagedError(f"{location or 'a maps blocks file'} is truncated ({len(data)} bytes)")
        magic, maps_format, channels = _BLOCKS_HEADER.unpack_from(data, 0)
        if magic != _BLOCKS_MAGIC or maps_format != 2:
            raise MapsDamagedError(f"{location or 'this file'} is not a camretrieval maps blocks file (format 2)")
        self.channels = int(channels)
        self.nbytes = int(len(data))

    def check(self, starts: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> None:
        if len(starts) and (starts.min() < _BLOCKS_HEADER.size or starts.max() >= len(self.data)):
            raise CamRetrievalError("the maps table points outside the maps files")

    def check_blocks(self, starts: np.ndarray) -> None:
        """Every block's header is there and its sections end within the file (no decoding)."""
        for start in np.asarray(starts).tolist():
            read_header(self.data, start)

    def verify_blocks(self, table: np.ndarray) -> None:
        """Every block (``table``: start, H, W per image) decodes: its sections' zstd checksums hold and its positions
        fit its maps. Raises :class:`MapsDamagedError` naming the first that does not."""
        for start, height, width in np.asarray(table).tolist():
            decode_block(self.data, start, height, width, self.channels)

    def _decode(self, start: int, height: int, width: int):
        try:
            return decode_block(self.data, start, height, width, self.channels)
        except MapsDamagedError as error:
            raise MapsDamagedError(
                f"the stored maps in {self.location or 'a maps blocks file'} are damaged ({error}): "
                "camretrieval index IMAGES_DIR INDEX_DIR --verify (with the options it was built with) finds the "
                "damaged shards, decoding every stored block, and describes their images again"
            ) from error

    def float16(self, start: int, height: int, width: int) -> np.ndarray:
        out = np.empty((height * width, self.channels), dtype=np.float16)
        decode_into(self._decode(start, height, width), out)
        return out

    def read_into(self, start: int, height: int, width: int, out: np.ndarray) -> np.ndarray:
        return decode_into(self._decode(start, height, width), out)

    def channel_major(self, start: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        return channel_major(self._decode(start, height, width), height * width, self.channels)


@dataclass
class RaggedMaps:
    """One layer's maps of N images: ``parts`` (one per shard of the index: :class:`DenseCells` or
    :class:`BlockCells`; a plain float16 array, cells x K, is taken as :class:`DenseCells`), ``table`` (N x 3 int64:
    where the image is in its part, height, width) and ``part`` (N: which part each image is in; all in part 0 when
    not given)."""

    parts: list
    table: np.ndarray
    part: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parts, (np.ndarray, DenseCells, BlockCells)):
            self.parts = [self.parts]
        self.parts = [DenseCells(p) if isinstance(p, np.ndarray) else p for p in self.parts]
        if self.part is None:
            self.part = np.zeros(len(self.table), dtype=np.int64)
        self.table = np.asarray(self.table, dtype=np.int64)
        if any(p.channels != self.parts[0].channels for p in self.parts):
            raise CamRetrievalError(f"maps parts of {[p.channels for p in self.parts]} channels")
        if self.table.ndim != 2 or self.table.shape[1] != 3 or self.part.shape != (len(self.table),):
            raise CamRetrievalError(f"a maps table of shape {self.table.shape} with {self.part.shape} part numbers")
        if len(self.table):
            if self.table[:, 1:].min() < 0 or self.part.min() < 0 or self.part.max() >= len(self.parts):
                raise CamRetrievalError("the maps table points outside the maps files")
            for number, cells in enumerate(self.parts):
                rows = self.table[self.part == number]
                cells.check(rows[:, 0], rows[:, 1], rows[:, 2])

    @classmethod
    def gather(cls, layers: Sequence["RaggedMaps"], which: np.ndarray, rows: np.ndarray) -> "RaggedMaps":
        """The maps of images taken from several single-part layers (one per shard): image i is image ``rows[i]``
        of ``layers[which[i]]``. Nothing is copied but the tables: the cells stay where they are."""
        which, rows = np.asarray(which, dtype=np.int64), np.asarray(rows, dtype=np.int64)
        table = np.zeros((len(rows), 3), dtype=np.int64)
        for number, layer in enumerate(layers):
            if len(layer.parts) != 1:
                raise CamRetrievalError("RaggedMaps.gather takes single-part layers")
            mine = which == number
            table[mine] = layer.table[rows[mine]]
        parts = [layer.parts[0] for layer in layers] or [np.zeros((0, 0), MAPS_DTYPE)]
        return cls(parts, table, which)

    @property
    def channels(self) -> int:
        return self.parts[0].channels

    @property
    def nbytes(self) -> int:
        return sum(cells.nbytes for cells in self.parts) + self.table.nbytes

    @property
    def formats(self) -> set[int]:
        return {cells.maps_format for cells in self.parts}

    def shape(self, image: int) -> tuple[int, int]:
        return int(self.table[image, 1]), int(self.table[image, 2])

    def image(self, image: int) -> np.ndarray:
        """The stored maps of one image, H x W x K float16 (format 1: a view of the file; format 2: decoded)."""
        start, height, width = (int(v) for v in self.table[image])
        cells = self.parts[int(self.part[image])].float16(start, height, width)
        return cells.reshape(height, width, self.channels)

    def read(self, images: Sequence[int] | np.ndarray, out: torch.Tensor) -> torch.Tensor:
        """Decode images that all have the same H x W into ``out`` (B x cells x K float32, contiguous, on the CPU);
        returns their counts of positive cells per channel (B x K int32, Eq. 2)."""
        images = np.asarray(images, dtype=np.int64)
        target = out.numpy()
        positives = np.empty((len(images), self.channels), dtype=np.int32)
        for row, image in enumerate(images.tolist()):
            start, height, width = (int(v) for v in self.table[image])
            positives[row] = self.parts[int(self.part[image])].read_into(start, height, width, target[row])
        return torch.from_numpy(positives)

    def _group_shape(self, images: np.ndarray) -> tuple[int, int]:
        heights, widths = self.table[images, 1], self.table[images, 2]
        if len(images) == 0 or (heights != heights[0]).any() or (widths != widths[0]).any():
            raise CamRetrievalError("RaggedMaps.load takes a non-empty group of images with the same map shape")
        return int(heights[0]), int(widths[0])

    def load_with_positives(
        self, images: Sequence[int] | np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps B x H x W x K float32, cell-major; positive counts B x K int32) of a same-shape group."""
        images = np.asarray(images, dtype=np.int64)
        height, width = self._group_shape(images)
        out = torch.empty(len(images), height * width, self.channels, dtype=torch.float32)
        with warnings.catch_warnings():  # torch warns that a memory map is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            positives = self.read(images, out)
        return out.reshape(len(images), height, width, -1).to(device), positives.to(device)

    def load(self, images: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """The maps of images that all have the same H x W, as one float32 tensor B x H x W x K (cell-major)."""
        return self.load_with_positives(images, device)[0]

    def load_sparse(self, images: Sequence[int] | np.ndarray) -> SparseCellMaps:
        """The maps of a same-shape group as one block-diagonal sparse matrix (:class:`SparseCellMaps`), on the CPU:
        only the non-zero values are written out."""
        from scipy.sparse import csr_array  # here: a plain search does not pay for importing SciPy

        images = np.asarray(images, dtype=np.int64)
        height, width = self._group_shape(images)
        cells, channels = height * width, self.channels
        found = [self.parts[int(self.part[image])].channel_major(int(self.table[image, 0]), height, width)
                 for image in images.tolist()]
        # Image b's value at channel k, cell i sits at row b*K + k, column b*n + i of the block-diagonal matrix.
        sizes = np.array([len(found_bits) for _, found_bits in found], dtype=np.int64)
        ends = np.cumsum(sizes)
        columns = np.empty(int(ends[-1]), dtype=np.int32)
        bits = np.empty(int(ends[-1]), dtype=np.uint16)
        per_row = np.empty((len(images), channels), dtype=np.int64)
        positives = np.empty((len(images), channels), dtype=np.int32)
        for row, ((positions, image_bits), end, size) in enumerate(zip(found, ends.tolist(), sizes.tolist())):
            channel = positions // cells
            columns[end - size : end] = positions - channel * cells + row * cells
            bits[end - size : end] = image_bits
            per_row[row] = np.bincount(channel, minlength=channels)
            positives[row] = positive_counts(channel, image_bits, channels)
        row_starts = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)  # as the columns: no copy
        values = bits.view(np.float16).astype(np.float32)
        matrix = csr_array((values, columns, row_starts), shape=(len(images) * channels, len(images) * cells))
        positives = torch.from_numpy(positives)
        return SparseCellMaps(matrix, height, width, positives)


@dataclass
class LoadedMaps:
    """A same-shape batch of stored maps, float32 and cell-major: ``features`` B x H x W x K, ``cam_activations``
    B x h x w x K' (the same tensor when the CAM layer is the feature layer), ``positives`` B x K int32 (the
    feature layer's counts of positive cells per channel, Eq. 2), for the database ``images``."""

    images: np.ndarray
    features: torch.Tensor
    cam_activations: torch.Tensor
    positives: torch.Tensor


class MapStore:
    """The stored maps of an index's images, in descriptor order (see the module docstring)."""

    def __init__(self, features: RaggedMaps, cam_activations: RaggedMaps | None = None, location: Path | None = None):
        if cam_activations is not None and len(cam_activations.table) != len(features.table):
            raise CamRetrievalError("the feature and CAM-layer maps describe different numbers of images")
        self.features = features
        self.cam_activations = cam_activations  # None: the CAM layer is the feature layer
        self.location = location  # the folder holding the files (an index folder or a spool folder)

    def __len__(self) -> int:
        return len(self.features.table)

    @property
    def separate_cam_layer(self) -> bool:
        return self.cam_activations is not None

    def cam_layer(self) -> RaggedMaps:
        return self.cam_activations if self.cam_activations is not None else self.features

    def nbytes(self) -> int:
        return self.features.nbytes + (self.cam_activations.nbytes if self.cam_activations is not None else 0)

    @classmethod
    def gather(cls, stores: Sequence["MapStore"], which: np.ndarray, rows: np.ndarray) -> "MapStore":
        """The maps of images taken from several stores (one per shard): image i is image ``rows[i]`` of
        ``stores[which[i]]``."""
        features = RaggedMaps.gather([store.features for store in stores], which, rows)
        separate = bool(stores) and stores[0].separate_cam_layer
        activations = RaggedMaps.gather([store.cam_activations for store in stores], which, rows) if separate else None
        return cls(features, activations)

    def image_tensors(self, image: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One image's stored maps as the backbone gives them (K x H x W, float32; the CAM layer's None when it is
        the feature layer): what :class:`MapStoreWriter` takes, so that stored maps are written again unchanged."""
        layers = [self.features] + ([self.cam_activations] if self.cam_activations is not None else [])
        tensors = [torch.from_numpy(np.array(maps.image(image), dtype=np.float32)).permute(2, 0, 1) for maps in layers]
        return tensors[0], (tensors[1] if len(tensors) > 1 else None)

    def shape_groups(self, images: Sequence[int] | np.ndarray, max_batch: int = 64) -> list[np.ndarray]:
        """``images`` split into batches of at most ``max_batch`` whose maps (of both layers) have the same shape,
        so that they are computed together without padding. Each batch keeps the order of ``images``."""
        images = np.asarray(images, dtype=np.int64)
        keys = self.features.table[images, 1:]
        if self.cam_activations is not None:
            keys = np.concatenate([keys, self.cam_activations.table[images, 1:]], axis=1)
        groups: dict[tuple[int, ...], list[int]] = {}
        for position, key in enumerate(map(tuple, keys.tolist())):
            groups.setdefault(key, []).append(position)
        batches = []
        for positions in groups.values():
            for start in range(0, len(positions), max(1, max_batch)):
                batches.append(images[positions[start : start + max_batch]])
        return batches

    def load_batch(self, images: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> LoadedMaps:
        """The maps of a same-shape group (:meth:`shape_groups`), decoded."""
        images = np.asarray(images, dtype=np.int64)
        features, positives = self.features.load_with_positives(images, device)
        activations = features if self.cam_activations is None else self.cam_activations.load(images, device)
        return LoadedMaps(images, features, activations, positives)

    def load(self, images: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(features B x H x W x K, CAM activations B x h x w x K') of a same-shape group, float32. Without a
        separate CAM layer both are the same tensor."""
        loaded = self.load_batch(images, device)
        return loaded.features, loaded.cam_activations

    def batches(
        self, images: Sequence[int] | np.ndarray, max_batch: int, device: torch.device | str = "cpu"
    ) -> Iterator[LoadedMaps]:
        """The maps of ``images``, decoded in same-shape batches of at most ``max_batch`` (:meth:`shape_groups`):
        the next batch is decoded on a second thread while the caller computes with this one (zstd and NumPy
        release the GIL), so that decoding costs little more than the arithmetic."""
        yield from _prefetched(self.shape_groups(images, max_batch), lambda group: self.load_batch(group, device))

    @property
    def sparse_readable(self) -> bool:
        """Whether :meth:`sparse_batches` serves this store: the CAM layer is the feature layer (A = X)."""
        return self.cam_activations is None

    def sparse_batches(self, images: Sequence[int] | np.ndarray, max_batch: int) -> Iterator[tuple[np.ndarray, SparseCellMaps]]:
        """(images, their maps as :class:`SparseCellMaps`) in same-shape batches, decoded ahead as :meth:`batches`."""
        if not self.sparse_readable:
            raise CamRetrievalError("sparse maps are read only where the CAM layer is the feature layer")
        groups = self.shape_groups(images, max_batch)
        yield from zip(groups, _prefetched(groups, self.features.load_sparse))

    @property
    def formats(self) -> set[int]:
        """The maps formats of the store's shards."""
        return self.features.formats

    # --- files ---

    @classmethod
    def open(cls, directory: str | Path, separate_cam_layer: bool, count: int | None = None) -> "MapStore":
        """Open the maps of a shard of an index, memory-mapped (never unpickled), in the format its files say.
        A file missing raises FileNotFoundError (a writer may have just replaced it: look again)."""
        directory = Path(directory)
        maps_format = shard_maps_format(directory)
        if maps_format is None:
            raise FileNotFoundError(f"no maps files in {directory}")
        layers = []
        for layer in LAYERS[: 2 if separate_cam_layer else 1]:
            names = maps_files(layer, maps_format)
            try:
                if maps_format == 2:
                    cells = BlockCells(np.memmap(directory / names[0], dtype=np.uint8, mode="r"), directory / names[0])
                else:
                    cells = np.load(directory / names[0], mmap_mode="r", allow_pickle=False)
                    if cells.dtype != MAPS_DTYPE:
                        raise MapsNotStoredError(f"{directory / names[0]} is not a camretrieval maps file: rebuild the index")
                    cells = DenseCells(cells)
                table = np.load(directory / names[1], allow_pickle=False)
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as error:
                raise MapsNotStoredError(f"the stored maps in {directory} are missing or damaged ({error}): rebuild the index") from error
            if table.dtype != np.int64:
                raise MapsNotStoredError(f"{directory / names[1]} is not a camretrieval maps table: rebuild the index")
            try:
                layers.append(RaggedMaps([cells], table))
            except CamRetrievalError as error:
                raise MapsNotStoredError(f"the stored maps in {directory} are inconsistent ({error}): rebuild the index") from error
        store = cls(layers[0], layers[1] if separate_cam_layer else None, directory)
        if count is not None and len(store) != count:
            raise MapsNotStoredError(
                f"the stored maps in {directory} describe {len(store)} images, the index {count}: rebuild the index"
            )
        return store


def _prefetched(groups: list[np.ndarray], load) -> Iterator:
    """``load(group)`` of each group in order, the next one computed on a second thread while the caller works."""
    if not groups:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="camretrieval-decode") as pool:
        pending = pool.submit(load, groups[0])
        for following in groups[1:] + [None]:
            loaded = pending.result()
            if following is not None:
                pending = pool.submit(load, following)
            yield loaded


def stored_cells(maps: torch.Tensor) -> np.ndarray:
    """One image's maps (K x H x W, any float dtype/device) as stored: H*W x K float16, cell-major, values beyond
    float16's range clipped to it."""
    channels, height, width = maps.shape
    cells = maps.detach().permute(1, 2, 0).reshape(height * width, channels).float()
    return cells.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16).cpu().numpy()


@dataclass(frozen=True)
class EncodedMaps:
    """One layer's maps of one image as a format 2 block (:func:`encode_maps`), ready for :meth:`MapStoreWriter.add`."""

    block: bytes
    height: int
    width: int
    channels: int


def encode_maps(maps: torch.Tensor) -> EncodedMaps:
    """One image's maps (K x H x W) as a format 2 block: pure, so that the processes that compute the maps can encode
    them too (38 kB instead of 1.4 MB of float32 to pass on)."""
    channels, height, width = maps.shape
    return EncodedMaps(encode_block(stored_cells(maps), height, width), height, width, channels)


class MapStoreWriter:
    """Streams the maps of images into the files of a shard folder as they are extracted (an index of many images
    does not fit in memory), in any order; :meth:`finish` completes the files, the table in descriptor order, and
    returns the :class:`MapStore` that reads them. ``maps_format`` 2 (compressed blocks) unless told 1 (the float16
    files of indexes written before; kept to test that such indexes still work).

    >>> writer = MapStoreWriter(n_images=len(paths), separate_cam_layer=False, directory=shard_folder)
    >>> writer.add(image_index, maps.features[i], None)   # K x H x W tensors, as the backbone returns them
    >>> store = writer.finish(order=done)                  # the image indices kept, in descriptor order
    """

    def __init__(self, n_images: int, separate_cam_layer: bool, directory: str | Path, maps_format: int = MAPS_FORMAT) -> None:
        self.directory = Path(directory)
        self.layers = LAYERS[: 2 if separate_cam_layer else 1]
        self.maps_format = maps_format
        self._names = {layer: maps_files(layer, maps_format) for layer in self.layers}
        self._files = {}
        self._written = {layer: 0 for layer in self.layers}  # format 1: rows; format 2: bytes
        self._channels: dict[str, int | None] = {layer: None for layer in self.layers}
        self._tables = {layer: np.full((n_images, 3), -1, dtype=np.int64) for layer in self.layers}
        self._positives: dict[str, np.ndarray | None] = {layer: None for layer in self.layers}
        for layer in self.layers:
            file = open(self._spool(layer), "wb")
            placeholder = _HEADER_LENGTH if maps_format == 1 else _BLOCKS_HEADER.size
            file.write(b"\0" * placeholder)  # replaced by the real header in finish()
            self._written[layer] = 0 if maps_format == 1 else placeholder
            self._files[layer] = file

    def _spool(self, layer: str) -> Path:
        return self.directory / (self._names[layer][0] + ".spool")

    def add(
        self, image: int, features: "torch.Tensor | EncodedMaps", cam_activations: "torch.Tensor | EncodedMaps | None" = None
    ) -> None:
        """Append one image's maps: K x H x W tensors (any float dtype/device), or their blocks made beforehand by
        :func:`encode_maps` (format 2: for instance in the processes that computed them)."""
        for layer, maps in zip(self.layers, (features, cam_activations)):
            if maps is None:
                raise CamRetrievalError("this store keeps the CAM layer's maps: pass them")
            if isinstance(maps, EncodedMaps):
                if self.maps_format != 2:
                    raise CamRetrievalError("encoded maps (format 2) go into a format 2 store")
                self._append(layer, image, maps.block, maps.height, maps.width, maps.channels)
            else:
                height, width = maps.shape[1:]
                self.add_cells(layer, image, stored_cells(maps), height, width)

    def add_cells(self, layer: str, image: int, cells: np.ndarray, height: int, width: int) -> None:
        """Append one layer's maps of one image as stored: ``cells`` (H*W x K float16, cell-major)."""
        cells = np.ascontiguousarray(cells, dtype=MAPS_DTYPE)
        channels = cells.shape[1]
        if self.maps_format == 1:
            self._append(layer, image, cells.tobytes(), height, width, channels)
            if self._positives[layer] is None:
                self._positives[layer] = np.zeros((len(self._tables[layer]), channels), dtype=np.int32)
            self._positives[layer][image] = count_positives(cells)
        else:
            self._append(layer, image, encode_block(cells, height, width), height, width, channels)

    def _append(self, layer: str, image: int, data: bytes, height: int, width: int, channels: int) -> None:
        if self._channels[layer] is None:
            self._channels[layer] = channels
        elif self._channels[layer] != channels:
            raise CamRetrievalError(f"{layer}: {channels} channels after {self._channels[layer]}")
        if self._tables[layer][image, 0] >= 0:
            raise CamRetrievalError(f"the maps of image {image} were already added")
        size = height * width if self.maps_format == 1 else len(data)
        self._files[layer].write(data)
        self._tables[layer][image] = (self._written[layer], height, width)
        self._written[layer] += size

    def finish(self, order: Sequence[int]) -> MapStore:
        """Complete the files (the header, the table and, format 1, the positive counts, each written durably); the
        store's image i is image ``order[i]`` of the calls to :meth:`add`. The table is written before the cells
        or blocks file gets its name (see :func:`shard_maps_format`)."""
        order = np.asarray(order, dtype=np.int64)
        for layer in self.layers:
            file = self._files[layer]
            channels = self._channels[layer] or 0
            file.seek(0)
            if self.maps_format == 1:
                file.write(_npy_header((self._written[layer], channels)))
            else:
                file.write(_BLOCKS_HEADER.pack(_BLOCKS_MAGIC, 2, channels))
            file.flush()
            os.fsync(file.fileno())
            file.close()
            table = self._tables[layer][order]
            if len(table) and table[:, 0].min() < 0:
                raise CamRetrievalError("finish() was given an image whose maps were never added")
            names = self._names[layer]
            write_atomically(self.directory / names[1], lambda f, t=table: np.save(f, t))
            if self.maps_format == 1:
                positives = self._positives[layer]
                positives = positives[order] if positives is not None else np.zeros((len(order), channels), np.int32)
                write_atomically(self.directory / names[2], lambda f, p=positives: np.save(f, p))
        for layer in reversed(self.layers):  # the features' cells file last: its name says the shard's maps are complete
            os.replace(self._spool(layer), self.directory / self._names[layer][0])
        return MapStore.open(self.directory, len(self.layers) > 1, len(order))

    def abort(self) -> None:
        for layer, file in self._files.items():
            file.close()
            self._spool(layer).unlink(missing_ok=True)


def upgrade_shard_maps(directory: str | Path, separate_cam_layer: bool) -> bool:
    """Re-encode a shard folder's format 1 maps into format 2, losslessly (the same float16 values), then delete the
    format 1 files. Returns whether there was anything to do. A reader sees either format's complete files (format
    2's blocks file is named last) and one that opened the old files keeps reading them; the caller holds the
    index's writer lock."""
    directory = Path(directory)
    if shard_maps_format(directory) != 1:
        return False
    old = MapStore.open(directory, separate_cam_layer)
    writer = MapStoreWriter(len(old), separate_cam_layer, directory, maps_format=2)
    try:
        layers = [old.features] + ([old.cam_activations] if old.cam_activations is not None else [])
        for image in range(len(old)):
            for layer, maps in zip(writer.layers, layers):
                height, width = maps.shape(image)
                writer.add_cells(layer, image, maps.image(image).reshape(height * width, -1), height, width)
        writer.finish(range(len(old)))
    except BaseException:
        writer.abort()
        raise
    fsync_directory(directory)
    for layer in writer.layers:
        for name in maps_files(layer, 1):
            (directory / name).unlink(missing_ok=True)
    fsync_directory(directory)
    return True
