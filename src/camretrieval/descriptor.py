"""The class-weighted descriptor, end to end: image -> features and CAMs -> class vectors -> D_I.

:func:`class_weighted_vectors` composes METHOD.md sections 1-2 on a batch of feature maps; :class:`Describer` adds
image loading, resizing, query boxes, batching over files in DataLoader workers, and the aggregation of section 3.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from .aggregation import aggregate
from .backbones import Backbone, FeatureMaps, load_backbone
from .cams import class_activation_maps, class_logits, normalize_cams, resize_cams, top_classes
from .errors import CamRetrievalError
from .images import ImageFileDataset, check_image_size, collate_loaded, load_image, preprocess
from .pooling import class_vectors
from .regions import Box, box_to_cells, scale_box, validate_box
from .whitening import PCAWhitening, WhiteningFileError

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_SIZE = 448
DEFAULT_CLASSES = 64


@dataclass(frozen=True)
class ExtractionSettings:
    """What determines the class vectors of an image; a whitening learned with other settings does not apply."""

    backbone: str
    feature_layer: str
    cam_layer: str
    size: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClassVectors:
    """Class vectors f^c of a batch (B x N_c x K, each l2-normalised) and the classes they belong to (B x N_c)."""

    vectors: torch.Tensor
    classes: torch.Tensor


def class_weighted_vectors(maps: FeatureMaps, weight: torch.Tensor, bias: torch.Tensor | None, n_classes: int) -> ClassVectors:
    """METHOD.md sections 1-2 on a batch: top-N_c classes, their CAMs (Eq. 1, normalised), and Eq. 2-4."""
    classes = top_classes(class_logits(maps.cam_activations, weight, bias), n_classes)
    cams = normalize_cams(class_activation_maps(maps.cam_activations, weight, classes))
    cams = resize_cams(cams, tuple(maps.features.shape[-2:]))
    return ClassVectors(class_vectors(maps.features, cams), classes)


def crop_maps(maps: FeatureMaps, box: Box, strides: tuple[int, int]) -> FeatureMaps:
    """The maps of a query region: features and CAM activations each cropped to the cells covering ``box`` (in the
    pixels of the network's input); ``strides`` are the output strides of the feature and CAM layers."""

    def crop(tensor: torch.Tensor, stride: int) -> torch.Tensor:
        col1, row1, col2, row2 = box_to_cells(box, stride, (tensor.shape[-1], tensor.shape[-2]))
        return tensor[..., row1:row2, col1:col2]

    return FeatureMaps(crop(maps.features, strides[0]), crop(maps.cam_activations, strides[1]))


@dataclass
class FileFailure:
    path: str
    reason: str


class Describer:
    """Turns images into class-weighted descriptors D_I (or, without whitening, into class vectors).

    >>> describer = Describer(load_backbone("efficientnet_lite0"), size=512, whitening=PCAWhitening.load("pca.npz"))
    >>> descriptors = describer.describe(["a.jpg", "b.jpg"])          # N x 512, l2-normalised
    >>> query = describer.describe(["q.jpg"], boxes=[(10, 20, 200, 300)])
    """

    def __init__(
        self,
        backbone: Backbone,
        size: int = DEFAULT_SIZE,
        n_classes: int = DEFAULT_CLASSES,
        whitening: PCAWhitening | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if size < backbone.stride:
            raise CamRetrievalError(f"--size {size} is smaller than one feature cell ({backbone.stride} px)")
        if n_classes < 1:
            raise CamRetrievalError(f"the number of classes must be at least 1, got {n_classes}")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.size = size
        self.n_classes = n_classes
        self.settings = ExtractionSettings(backbone.name, backbone.feature_layer, backbone.cam_layer, size)
        self.whitening = whitening
        if whitening is not None:
            check_whitening(whitening, self.settings)

    # --- tensors ---

    @torch.inference_mode()
    def feature_maps(self, images: torch.Tensor) -> FeatureMaps:
        return self.backbone(images.to(self.device))

    def class_vectors(self, maps: FeatureMaps, n_classes: int | None = None) -> ClassVectors:
        with torch.inference_mode():
            return class_weighted_vectors(
                maps, self.backbone.classifier_weight, self.backbone.classifier_bias, n_classes or self.n_classes
            )

    def aggregate(self, vectors: ClassVectors) -> torch.Tensor:
        if self.whitening is None:
            raise CamRetrievalError("descriptors need a PCA-whitening: pass whitening=PCAWhitening.load(...)")
        with torch.inference_mode():
            return aggregate(vectors.vectors, self.whitening)

    # --- images in memory or on disk ---

    def load(self, image: str | Path | Image.Image) -> Image.Image:
        picture = load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
        check_image_size(*picture.size, self.backbone.stride)
        return picture

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.size, self.backbone.mean, self.backbone.std)

    def image_class_vectors(
        self, image: str | Path | Image.Image, box: Box | None = None, n_classes: int | None = None
    ) -> ClassVectors:
        """Class vectors of one image, or of its region ``box`` (original pixels), whose classes then come from
        the region itself: the logits of the region's pooled CAM activations."""
        picture = self.load(image)
        tensor = self.preprocess(picture)
        maps = self.feature_maps(tensor.unsqueeze(0))
        if box is not None:
            resized_box = scale_box(validate_box(box, *picture.size), picture.size, (tensor.shape[2], tensor.shape[1]))
            strides = self.backbone.layer_strides
            maps = crop_maps(maps, resized_box, (strides[self.backbone.feature_layer], strides[self.backbone.cam_layer]))
        return self.class_vectors(maps, n_classes)

    def describe(
        self, images: Sequence[str | Path | Image.Image], boxes: Sequence[Box | None] | None = None
    ) -> np.ndarray:
        """Descriptors D_I of a few images (query-style: one at a time, boxes allowed). N x dim float32."""
        boxes = boxes if boxes is not None else [None] * len(images)
        if len(boxes) != len(images):
            raise CamRetrievalError(f"{len(images)} images but {len(boxes)} boxes")
        rows = [self.aggregate(self.image_class_vectors(image, box)) for image, box in zip(images, boxes)]
        return torch.cat(rows).cpu().numpy().astype(np.float32)

    # --- folders ---

    def describe_files(
        self,
        paths: Sequence[str | Path],
        root: str | Path | None = None,
        batch_size: int = 16,
        workers: int = 2,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[int], list[FileFailure]]:
        """Descriptors of many files (relative to ``root`` when given), decoded in DataLoader workers. Returns
        (descriptors N_ok x dim, the indices into ``paths`` that succeeded, the failures)."""
        compute = lambda maps: self.aggregate(self.class_vectors(maps))  # noqa: E731
        return self._map_files(paths, root, compute, batch_size, workers, progress)

    def class_vectors_of_files(
        self,
        paths: Sequence[str | Path],
        n_classes: int,
        root: str | Path | None = None,
        batch_size: int = 16,
        workers: int = 2,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[int], list[FileFailure]]:
        """The top-``n_classes`` class vectors of many files (N_ok x n_classes x K), as PCA-whitening is fit on."""
        compute = lambda maps: self.class_vectors(maps, n_classes).vectors  # noqa: E731
        return self._map_files(paths, root, compute, batch_size, workers, progress)

    def _map_files(
        self,
        paths: Sequence[str | Path],
        root: str | Path | None,
        compute: Callable[[FeatureMaps], torch.Tensor],
        batch_size: int,
        workers: int,
        progress: bool,
    ) -> tuple[np.ndarray, list[int], list[FileFailure]]:
        rows: list[np.ndarray] = []
        done: list[int] = []
        failures: list[FileFailure] = []
        for indices, result in self._iterate_files(paths, root, compute, batch_size, workers, progress, failures):
            rows.append(result.cpu().numpy())
            done.extend(indices)
        order = np.argsort(done, kind="stable")
        stacked = np.concatenate(rows)[order] if rows else np.zeros((0,), np.float32)
        return stacked.astype(np.float32), [done[i] for i in order], failures

    def _iterate_files(
        self,
        paths: Sequence[str | Path],
        root: str | Path | None,
        compute: Callable[[FeatureMaps], torch.Tensor],
        batch_size: int,
        workers: int,
        progress: bool,
        failures: list[FileFailure],
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Decode files in workers, run same-shape images together (never padded: padding would change the
        features), and yield (indices, result rows). Unusable files are reported and skipped."""
        backbone = self.backbone
        dataset = ImageFileDataset(paths, self.size, backbone.mean, backbone.std, backbone.stride, root)
        loader = DataLoader(
            dataset,
            batch_size=max(batch_size, 1),
            num_workers=workers,
            collate_fn=collate_loaded,
            persistent_workers=False,
        )
        bar = tqdm(total=len(dataset), unit="img", disable=not progress, file=sys.stderr, smoothing=0.1)
        try:
            for batch in loader:
                by_shape: dict[tuple[int, ...], list] = {}
                for item in batch:
                    if item.tensor is None:
                        failures.append(FileFailure(str(paths[item.index]), item.error or "unreadable"))
                        bar.write(f"skipped {paths[item.index]}: {item.error}", file=sys.stderr)
                    else:
                        by_shape.setdefault(tuple(item.tensor.shape), []).append(item)
                for group in by_shape.values():
                    images = torch.stack([item.tensor for item in group])
                    yield [item.index for item in group], compute(self.feature_maps(images))
                bar.update(len(batch))
        finally:
            bar.close()


def check_whitening(whitening: PCAWhitening, settings: ExtractionSettings) -> None:
    """A whitening applies only to class vectors extracted with the settings it was learned with."""
    learned = whitening.settings
    mismatches = [
        f"{key}: learned with {learned.get(key)!r}, used with {value!r}"
        for key, value in settings.to_dict().items()
        if learned.get(key) != value
    ]
    if mismatches:
        raise WhiteningFileError(
            "the PCA-whitening was learned with other settings (" + "; ".join(mismatches) + "). "
            "Use the same settings, or learn a new one with camretrieval fit-pca"
        )


def fit_whitening(
    describer: Describer,
    paths: Sequence[str | Path],
    root: str | Path | None = None,
    dim: int = 512,
    n_pca: int = 1,
    batch_size: int = 16,
    workers: int = 2,
    progress: bool = True,
) -> tuple[PCAWhitening, list[FileFailure]]:
    """Learn PCA-whitening on the top-``n_pca`` class vectors of every image (METHOD.md section 3)."""
    vectors, _, failures = describer.class_vectors_of_files(paths, n_pca, root, batch_size, workers, progress)
    if len(vectors) == 0:
        raise CamRetrievalError("no usable images to learn the PCA-whitening from")
    settings = describer.settings.to_dict() | {"n_pca": n_pca, "n_images": len(vectors), "weights": describer.backbone.weights}
    whitening = PCAWhitening(dim, settings).fit(vectors.reshape(-1, vectors.shape[-1]))
    return whitening, failures
