"""Index-time storage of every database image's maps, so that query-time refinement (METHOD.md sections 3 and 5:
online aggregation, re-ranking with CAM regions) never decodes or forwards a database image.

What is stored is what one forward pass gives the descriptor (:class:`~camretrieval.extraction.backbones.FeatureMaps`): the
feature layer's maps X, and the CAM layer's activations A only when that layer differs from the feature layer
(efficientnet_lite*, resnet50 and densenet161 use one layer for both; VGG-16-CAM does not). From X and A any class's
CAM (Eq. 1), any region's crop and any class vector (Eq. 2-4) can be recomputed exactly as at index time.

Layout of one layer, in each shard folder of an index (:mod:`camretrieval.storage.catalog`), plain ``.npy`` files read with
``allow_pickle=False``:

- ``<layer>_maps.npy``: float16, shape (total cells, K): every image's H x W cells in row-major order, one row of
  K channels per cell ("cell-major": CAMs and class vectors are then plain matrix products with the rows);
- ``<layer>_maps_table.npy``: int64, shape (N images, 3): (offset of the image's first row, H, W), in descriptor
  order. Images have different sizes, so the cells are ragged; the table says where each image's block is;
- ``<layer>_maps_positive.npy``: int32, shape (N images, K): in how many of the image's cells channel k is positive
  (counted on the stored float16 values). That is Eq. 2's Q_k times H x W, so the CroW channel weights of a whole
  image (Eq. 3), which online aggregation needs for every image and every query, cost nothing at query time: counting
  them is a full pass over the maps, as long as the CAM arithmetic itself for a few classes.

float16 keeps 11 significant bits (relative error at most 2^-11 = 0.05% per value), halves the file against
float32, and keeps the sign of every activation, so CroW's Q_k (Eq. 2) is unchanged except for positive values
under 6e-8 that round to 0. Values beyond float16's range (65504) are clipped to it. With efficientnet_lite0, 95%
of the head's activations are exactly 0 or 6 (ReLU6), which float16 holds exactly: OnA descriptors from the stored
maps differ from those of fresh float32 maps by at most 1.7e-5 (scores by 8e-6) on clutter-dev at 448 px. The maps
file is opened memory-mapped: searching reads only the images it needs, through the page cache.

Size: 2 bytes x K x cells per image, e.g. 681 kB for a 4:3 image at 448 px with efficientnet_lite0 (14 x 19 cells x
1280 channels), 722 kB on average on clutter-dev; plus 16 bytes of table and 4K bytes of counts. 5k images: 3.4 GB.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from camretrieval.errors import CamRetrievalError
from camretrieval.storage.files import write_atomically

MAPS_DTYPE = np.dtype("<f2")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# The .npy header is written once as a placeholder and again, with the final number of rows, when the file is
# complete: a fixed length (a multiple of 64, as the format recommends) lets the second write overwrite the first.
_HEADER_LENGTH = 128
LAYERS = ("features", "cam_activations")


def count_positives(cells: np.ndarray) -> np.ndarray:
    """Per channel, the number of cells (rows of ``cells``, n x K) where it is positive: Eq. 2's numerator."""
    return np.count_nonzero(np.asarray(cells) > 0, axis=0).astype(np.int32)


class MapsNotStoredError(CamRetrievalError):
    """The index holds no maps, so online aggregation and re-ranking cannot be computed from it."""


def maps_missing_message(what: str) -> str:
    return (
        f"{what} needs the feature maps of the database images, and this index was built without them "
        "(camretrieval index --no-maps, Index.build(keep_maps=False), or a baseline pooling). Rebuild it with: "
        "camretrieval index IMAGES_DIR INDEX_DIR --pca PCA_FILE (without --no-maps)"
    )


def require_maps(maps: "MapStore | None", what: str) -> "MapStore":
    """The stored maps ``what`` (e.g. "online aggregation") needs, or an error saying how to rebuild the index."""
    if maps is None:
        raise MapsNotStoredError(maps_missing_message(what))
    return maps


def maps_file_names(layer: str) -> tuple[str, str, str]:
    """(cells file, table file, positive-counts file) of a layer (``"features"`` or ``"cam_activations"``)."""
    return f"{layer}_maps.npy", f"{layer}_maps_table.npy", f"{layer}_maps_positive.npy"


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A version 1.0 ``.npy`` header of exactly :data:`_HEADER_LENGTH` bytes for float16 data of ``shape``."""
    text = repr({"descr": MAPS_DTYPE.str, "fortran_order": False, "shape": tuple(int(s) for s in shape)})
    prefix = np.lib.format.magic(1, 0) + (_HEADER_LENGTH - 10).to_bytes(2, "little")
    body = text.encode("latin1").ljust(_HEADER_LENGTH - 10 - 1) + b"\n"
    header = prefix + body
    if len(header) != _HEADER_LENGTH:
        raise CamRetrievalError(f"maps shape {shape} does not fit a {_HEADER_LENGTH}-byte .npy header")
    return header


@dataclass
class RaggedMaps:
    """One layer's maps of N images: ``parts`` (arrays of cells x K, float16, usually memory-mapped: one per shard of
    the index), ``table`` (N x 3 int64: the image's first row in its part, height, width), ``part`` (N: which part
    each image is in; all in part 0 when not given) and ``positives`` (N x K int32: the number of cells where each
    channel is positive; computed from the cells when not given)."""

    parts: list[np.ndarray]
    table: np.ndarray
    positives: np.ndarray | None = None
    part: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parts, np.ndarray):
            self.parts = [self.parts]
        if self.part is None:
            self.part = np.zeros(len(self.table), dtype=np.int64)
        if any(cells.ndim != 2 or cells.shape[1] != self.parts[0].shape[1] for cells in self.parts):
            raise CamRetrievalError(f"maps parts of shapes {[cells.shape for cells in self.parts]}")
        if self.table.ndim != 2 or self.table.shape[1] != 3 or self.part.shape != (len(self.table),):
            raise CamRetrievalError(f"a maps table of shape {self.table.shape} with {self.part.shape} part numbers")
        if self.positives is None:
            self.positives = np.stack([count_positives(self.image(i).reshape(-1, self.channels)) for i in range(len(self.table))]) \
                if len(self.table) else np.zeros((0, self.channels), dtype=np.int32)
        if self.positives.shape != (len(self.table), self.channels):
            raise CamRetrievalError(f"positive counts of shape {self.positives.shape} for {len(self.table)} images")
        if len(self.table):
            ends = self.table[:, 0] + self.table[:, 1] * self.table[:, 2]
            sizes = np.array([len(cells) for cells in self.parts])
            if self.table.min() < 0 or self.part.min() < 0 or self.part.max() >= len(sizes) or (ends > sizes[self.part]).any():
                raise CamRetrievalError("the maps table points outside the maps files")

    @classmethod
    def gather(cls, layers: Sequence["RaggedMaps"], which: np.ndarray, rows: np.ndarray) -> "RaggedMaps":
        """The maps of images taken from several single-part layers (one per shard): image i is image ``rows[i]``
        of ``layers[which[i]]``. Nothing is copied but the tables: the cells stay where they are."""
        which, rows = np.asarray(which, dtype=np.int64), np.asarray(rows, dtype=np.int64)
        channels = layers[0].channels if layers else 0
        table = np.zeros((len(rows), 3), dtype=np.int64)
        positives = np.zeros((len(rows), channels), dtype=np.int32)
        for number, layer in enumerate(layers):
            if len(layer.parts) != 1:
                raise CamRetrievalError("RaggedMaps.gather takes single-part layers")
            mine = which == number
            table[mine] = layer.table[rows[mine]]
            positives[mine] = layer.positives[rows[mine]]
        parts = [layer.parts[0] for layer in layers] or [np.zeros((0, channels), MAPS_DTYPE)]
        return cls(parts, table, positives, which)

    @property
    def channels(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(cells.nbytes for cells in self.parts) + self.table.nbytes

    def shape(self, image: int) -> tuple[int, int]:
        return int(self.table[image, 1]), int(self.table[image, 2])

    def _cells(self, image: int, count: int) -> np.ndarray:
        offset = int(self.table[image, 0])
        return self.parts[int(self.part[image])][offset : offset + count]

    def image(self, image: int) -> np.ndarray:
        """The stored maps of one image, H x W x K float16 (a view of the file)."""
        height, width = self.shape(image)
        return self._cells(image, height * width).reshape(height, width, self.channels)

    def load(self, images: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """The maps of images that all have the same H x W, as one float32 tensor B x H x W x K (cell-major)."""
        images = np.asarray(images, dtype=np.int64)
        heights, widths = self.table[images, 1], self.table[images, 2]
        if len(images) == 0 or (heights != heights[0]).any() or (widths != widths[0]).any():
            raise CamRetrievalError("RaggedMaps.load takes a non-empty group of images with the same map shape")
        height, width = int(heights[0]), int(widths[0])
        out = torch.empty(len(images), height * width, self.channels, dtype=torch.float32)
        with warnings.catch_warnings():  # torch warns that the memory map is read-only; it is only read
            warnings.simplefilter("ignore", UserWarning)
            for row, image in enumerate(images.tolist()):
                # One pass per image: float16 -> float32 during the copy out of the page cache.
                out[row].copy_(torch.from_numpy(self._cells(image, height * width)))
        return out.reshape(len(images), height, width, -1).to(device)


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

    def load(self, images: Sequence[int] | np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(features B x H x W x K, CAM activations B x h x w x K') of a same-shape group, float32. Without a
        separate CAM layer both are the same tensor."""
        features = self.features.load(images, device)
        if self.cam_activations is None:
            return features, features
        return features, self.cam_activations.load(images, device)

    # --- files ---

    @classmethod
    def open(cls, directory: str | Path, separate_cam_layer: bool, count: int | None = None) -> "MapStore":
        """Open the maps of a shard of an index, memory-mapped (never unpickled)."""
        directory = Path(directory)
        layers = []
        for layer in LAYERS[: 2 if separate_cam_layer else 1]:
            cells_name, table_name, positives_name = maps_file_names(layer)
            try:
                cells = np.load(directory / cells_name, mmap_mode="r", allow_pickle=False)
                table = np.load(directory / table_name, allow_pickle=False)
                positives = np.load(directory / positives_name, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise MapsNotStoredError(f"the stored maps in {directory} are missing or damaged ({error}): rebuild the index") from error
            if cells.dtype != MAPS_DTYPE or table.dtype != np.int64 or positives.dtype != np.int32:
                raise MapsNotStoredError(f"{directory / cells_name} is not a camretrieval maps file: rebuild the index")
            try:
                layers.append(RaggedMaps(cells, table, positives))
            except CamRetrievalError as error:
                raise MapsNotStoredError(f"the stored maps in {directory} are inconsistent ({error}): rebuild the index") from error
        store = cls(layers[0], layers[1] if separate_cam_layer else None, directory)
        if count is not None and len(store) != count:
            raise MapsNotStoredError(
                f"the stored maps in {directory} describe {len(store)} images, the index {count}: rebuild the index"
            )
        return store


class MapStoreWriter:
    """Streams the maps of images into the files of a shard folder as they are extracted (an index of many images
    does not fit in memory), in any order; :meth:`finish` completes the files, the table in descriptor order, and
    returns the :class:`MapStore` that reads them.

    >>> writer = MapStoreWriter(n_images=len(paths), separate_cam_layer=False, directory=shard_folder)
    >>> writer.add(image_index, maps.features[i], None)   # K x H x W tensors, as the backbone returns them
    >>> store = writer.finish(order=done)                  # the image indices kept, in descriptor order
    """

    def __init__(self, n_images: int, separate_cam_layer: bool, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.layers = LAYERS[: 2 if separate_cam_layer else 1]
        self._files = {}
        self._rows = {layer: 0 for layer in self.layers}
        self._channels: dict[str, int | None] = {layer: None for layer in self.layers}
        self._tables = {layer: np.full((n_images, 3), -1, dtype=np.int64) for layer in self.layers}
        self._positives: dict[str, np.ndarray | None] = {layer: None for layer in self.layers}
        for layer in self.layers:
            path = self.directory / (maps_file_names(layer)[0] + ".spool")
            file = open(path, "wb")
            file.write(b"\0" * _HEADER_LENGTH)  # replaced by the real header in finish()
            self._files[layer] = file

    def add(self, image: int, features: torch.Tensor, cam_activations: torch.Tensor | None = None) -> None:
        """Append one image's maps (K x H x W each, any float dtype/device)."""
        for layer, maps in zip(self.layers, (features, cam_activations)):
            if maps is None:
                raise CamRetrievalError("this store keeps the CAM layer's maps: pass them")
            channels, height, width = maps.shape
            if self._channels[layer] is None:
                self._channels[layer] = channels
            elif self._channels[layer] != channels:
                raise CamRetrievalError(f"{layer}: {channels} channels after {self._channels[layer]}")
            if self._tables[layer][image, 0] >= 0:
                raise CamRetrievalError(f"the maps of image {image} were already added")
            cells = maps.detach().permute(1, 2, 0).reshape(height * width, channels).float()
            cells = cells.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16).cpu().numpy()
            self._files[layer].write(cells.astype(MAPS_DTYPE, copy=False).tobytes())
            self._tables[layer][image] = (self._rows[layer], height, width)
            if self._positives[layer] is None:
                self._positives[layer] = np.zeros((len(self._tables[layer]), channels), dtype=np.int32)
            self._positives[layer][image] = count_positives(cells)
            self._rows[layer] += height * width

    def finish(self, order: Sequence[int]) -> MapStore:
        """Complete the files (the cells' header, the table and the positive counts, each written durably); the
        store's image i is image ``order[i]`` of the calls to :meth:`add`."""
        order = np.asarray(order, dtype=np.int64)
        layers = []
        for layer in self.layers:
            file = self._files[layer]
            channels = self._channels[layer] or 0
            file.seek(0)
            file.write(_npy_header((self._rows[layer], channels)))
            file.flush()
            os.fsync(file.fileno())
            file.close()
            table = self._tables[layer][order]
            if len(table) and table[:, 0].min() < 0:
                raise CamRetrievalError("finish() was given an image whose maps were never added")
            positives = self._positives[layer]
            positives = positives[order] if positives is not None else np.zeros((len(order), channels), np.int32)
            cells_name, table_name, positives_name = maps_file_names(layer)
            os.replace(self.directory / (cells_name + ".spool"), self.directory / cells_name)
            write_atomically(self.directory / table_name, lambda f, t=table: np.save(f, t))
            write_atomically(self.directory / positives_name, lambda f, p=positives: np.save(f, p))
            cells = np.load(self.directory / cells_name, mmap_mode="r", allow_pickle=False)
            layers.append(RaggedMaps(cells, table, positives))
        return MapStore(layers[0], layers[1] if len(layers) > 1 else None, self.directory)

    def abort(self) -> None:
        for layer, file in self._files.items():
            file.close()
            (self.directory / (maps_file_names(layer)[0] + ".spool")).unlink(missing_ok=True)
