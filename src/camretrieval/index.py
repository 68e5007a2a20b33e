"""An index of a folder of images: descriptors, their paths, the settings that made them, and a FAISS index.

On disk, an index folder holds (none of them a pickle):

- ``index.json``: format version, extraction settings, number of classes, the indexed folder, counts;
- ``paths.json``: image paths relative to the indexed folder, in descriptor order;
- ``descriptors.npy``: N x dim float32, l2-normalised;
- ``whitening.npz``: the PCA-whitening the descriptors were made with (queries need it too), absent when none;
- ``faiss.index``: an exact inner-product FAISS index (cosine similarity, as the descriptors are l2-normalised).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from .backbones import load_backbone
from .descriptor import DEFAULT_BACKBONE, DEFAULT_CLASSES, DEFAULT_POOLING, DEFAULT_SIZE, Describer, FileFailure
from .errors import CamRetrievalError
from .images import find_images
from .regions import Box
from .whitening import PCAWhitening

FORMAT = "camretrieval-index"
FORMAT_VERSION = 1


class IndexFileError(CamRetrievalError):
    """An index folder that is missing, incomplete, or from an incompatible version."""


@dataclass
class SearchHit:
    path: str  # relative to the indexed folder
    score: float  # cosine similarity


class Index:
    """Descriptors of a collection and exact inner-product search over them.

    Build one with :meth:`build` (or ``camretrieval index``), reopen it with :meth:`open`, and search it with query
    images (:meth:`search`) or query descriptors (:meth:`search_descriptors`).
    """

    def __init__(
        self,
        descriptors: np.ndarray,
        paths: Sequence[str],
        whitening: PCAWhitening | None,
        settings: dict,
        image_root: str | Path | None = None,
        faiss_index: faiss.Index | None = None,
    ) -> None:
        descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
        if descriptors.ndim != 2 or len(descriptors) != len(paths):
            raise ValueError(f"{len(paths)} paths but descriptors of shape {descriptors.shape}")
        self.descriptors = descriptors
        self.paths = list(paths)
        self.whitening = whitening
        self.settings = dict(settings)
        self.image_root = Path(image_root) if image_root is not None else None
        if faiss_index is None:
            faiss_index = faiss.IndexFlatIP(descriptors.shape[1])
            faiss_index.add(descriptors)
        self.faiss_index = faiss_index
        self._describer: Describer | None = None
        self.device = "cpu"

    def __len__(self) -> int:
        return len(self.paths)

    # --- building ---

    @classmethod
    def build(
        cls,
        image_root: str | Path,
        whitening: PCAWhitening | None,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | Path | None = None,
        feature_layer: str | None = None,
        size: int = DEFAULT_SIZE,
        n_classes: int = DEFAULT_CLASSES,
        batch_size: int = 16,
        workers: int = 2,
        device: str = "cpu",
        progress: bool = True,
        pooling: str = DEFAULT_POOLING,
    ) -> tuple["Index", list[FileFailure]]:
        """Describe every image under ``image_root`` (recursively). Returns the index and the files skipped.

        ``whitening`` None makes unwhitened descriptors (the "raw" baselines); ``pooling`` picks a baseline
        instead of the class-weighted descriptor (see ``camretrieval.descriptor.POOLINGS``)."""
        image_root = Path(image_root)
        paths = find_images(image_root)
        if not paths:
            raise CamRetrievalError(f"no images (jpg, jpeg, png, webp, bmp, tif, tiff) under {image_root}")
        weights = str(Path(weights).resolve()) if weights else None
        describer = Describer(
            load_backbone(backbone, weights=weights, feature_layer=feature_layer),
            size,
            n_classes,
            whitening,
            device,
            pooling,
        )
        descriptors, done, failures = describer.describe_files(paths, image_root, batch_size, workers, progress)
        if not done:
            raise CamRetrievalError(f"none of the {len(paths)} images under {image_root} could be read")
        settings = describer.settings.to_dict() | {"n_classes": n_classes, "weights": weights}
        index = cls(descriptors, [paths[i] for i in done], whitening, settings, image_root.resolve())
        index._describer = describer
        return index, failures

    # --- files ---

    def save(self, index_dir: str | Path) -> None:
        index_dir = Path(index_dir)
        index_dir.mkdir(parents=True, exist_ok=True)
        header = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "settings": self.settings,
            "image_root": str(self.image_root) if self.image_root else None,
            "count": len(self),
            "dim": int(self.descriptors.shape[1]),
            "whitened": self.whitening is not None,
        }
        # Write each file beside its final name, then rename: a crash never leaves a half-written file in place.
        _write_atomically(index_dir / "descriptors.npy", lambda f: np.save(f, self.descriptors))
        _write_atomically(index_dir / "paths.json", lambda f: f.write(json.dumps(self.paths).encode()))
        if self.whitening is not None:
            _write_atomically(index_dir / "whitening.npz", self.whitening.save)
        _write_atomically(index_dir / "faiss.index", lambda f: f.write(faiss.serialize_index(self.faiss_index).tobytes()))
        _write_atomically(index_dir / "index.json", lambda f: f.write(json.dumps(header, indent=2).encode()))

    @classmethod
    def open(cls, index_dir: str | Path, device: str = "cpu") -> "Index":
        """Open a saved index; queries will be described on ``device``."""
        index_dir = Path(index_dir)
        header_file = index_dir / "index.json"
        if not header_file.is_file():
            raise IndexFileError(
                f"no camretrieval index at {index_dir} (index.json missing): build one with "
                f"camretrieval index IMAGES_DIR {index_dir} --pca PCA_FILE"
            )
        try:
            header = json.loads(header_file.read_text())
        except (OSError, ValueError) as error:
            raise IndexFileError(f"{header_file} is unreadable ({error}): rebuild the index") from error
        if header.get("format") != FORMAT:
            raise IndexFileError(f"{index_dir} is not a camretrieval index")
        if header.get("version") != FORMAT_VERSION:
            raise IndexFileError(
                f"{index_dir} was written in index format {header.get('version')}; this camretrieval reads "
                f"format {FORMAT_VERSION}: rebuild it with camretrieval index"
            )
        try:
            descriptors = np.load(index_dir / "descriptors.npy", allow_pickle=False)
            paths = json.loads((index_dir / "paths.json").read_text())
            whitening = PCAWhitening.load(index_dir / "whitening.npz") if header.get("whitened", True) else None
            faiss_index = faiss.deserialize_index(np.fromfile(index_dir / "faiss.index", dtype=np.uint8))
        except (OSError, ValueError, RuntimeError, CamRetrievalError) as error:
            raise IndexFileError(f"the index at {index_dir} is incomplete or damaged ({error}): rebuild it") from error
        shape = (header["count"], header["dim"])
        if len(paths) != shape[0] or descriptors.shape != shape or (faiss_index.ntotal, faiss_index.d) != shape:
            raise IndexFileError(f"the index at {index_dir} is inconsistent (counts differ): rebuild it")
        index = cls(descriptors, paths, whitening, header["settings"], header.get("image_root"), faiss_index)
        index.device = device
        return index

    # --- search ---

    @property
    def describer(self) -> Describer:
        """The query describer, with the backbone and settings the index was built with (loaded on first use)."""
        if self._describer is None:
            s = self.settings
            backbone = load_backbone(s["backbone"], weights=s.get("weights"), feature_layer=s["feature_layer"])
            self._describer = Describer(
                backbone, s["size"], s["n_classes"], self.whitening, self.device, s.get("pooling", DEFAULT_POOLING)
            )
        return self._describer

    def search_descriptors(self, queries: np.ndarray, top: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine-similarity search: (scores Q x k, database indices Q x k), best first."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        top = min(top, len(self))
        return self.faiss_index.search(queries, top)

    def search(
        self,
        images: Sequence[str | Path | Image.Image],
        boxes: Sequence[Box | None] | None = None,
        top: int = 10,
    ) -> list[list[SearchHit]]:
        """Search with query images (each optionally with a box in its original pixels), best hits first."""
        scores, ids = self.search_descriptors(self.describer.describe(images, boxes), top)
        return [
            [SearchHit(self.paths[i], float(score)) for score, i in zip(row_scores, row_ids) if i >= 0]
            for row_scores, row_ids in zip(scores, ids)
        ]


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
