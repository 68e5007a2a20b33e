"""The class-weighted descriptor, end to end: image -> features and CAMs -> class vectors -> D_I.

:func:`class_weighted_vectors` composes METHOD.md sections 1-2 on a batch of feature maps; :func:`pooled_vectors`
puts the baselines of the paper's tables beside it (``pooling``); :class:`Describer` adds image loading, resizing,
query boxes, batching over files in DataLoader workers, and the aggregation of section 3.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from .aggregation import aggregate
from .backbones import Backbone, FeatureMaps
from .cams import class_activation_maps, class_logits, normalize_cams, resize_cams, top_classes
from .classlist import ClassList, check_class_indices
from .errors import CamRetrievalError
from .images import ImageFileDataset, check_image_size, collate_loaded, load_image, preprocess, shape_order
from .pooling import channel_weights, class_vectors, crow_pooling, gem_pooling, max_pooling, regional_max_pooling, sum_pooling
from .regions import Box, box_to_cells, scale_box, validate_box
from .whitening import PCAWhitening, WhiteningFileError

DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_SIZE = 448
DEFAULT_CLASSES = 64
DEFAULT_POOLING = "cam"
# The backbone's forward pass: float32, or autocast to bfloat16 / float16 (for GPUs: about twice the images per
# second; the CAM arithmetic stays float32).
PRECISIONS = ("float32", "bfloat16", "float16")

# How an image's maps become the vectors that are whitened, l2-normalised and summed into D_I (section 3).
POOLINGS = {
    "cam": "class-weighted: one vector per top class (Eq. 4), the paper's method",
    "sum": "sum pooling of the raw features (SPoC without centre prior, the paper's 'raw')",
    "sum-cw": "sum pooling times the CroW channel weights (the paper's 'raw + CroW')",
    "crow": "CroW: spatial and channel weights",
    "mac": "MAC: max pooling",
    "gem": "GeM: generalised mean, p = 3",
    "rmac": "R-MAC: max pooling of a 3-level grid of regions, each region whitened",
}


@dataclass(frozen=True)
class ExtractionSettings:
    """What determines the class vectors of an image; a whitening learned with other settings does not apply."""

    backbone: str
    feature_layer: str
    cam_layer: str
    size: int
    pooling: str = DEFAULT_POOLING
    class_list: tuple[int, ...] | None = None  # a fixed list of classes aggregated for every image (section 4.3)

    def __post_init__(self) -> None:
        if self.class_list is not None:
            object.__setattr__(self, "class_list", tuple(int(c) for c in self.class_list))

    def to_dict(self) -> dict:
        """The settings as JSON-ready values; ``class_list`` only when there is one (each image's own classes)."""
        settings = asdict(self)
        if self.class_list is None:
            del settings["class_list"]
        else:
            settings["class_list"] = list(self.class_list)
        return settings


@dataclass
class PooledVectors:
    """The vectors a batch of images is aggregated from (B x N x K, each l2-normalised): the class vectors f^c of
    the top N = N_c classes (pooling "cam", ``classes`` B x N_c), or for a baseline one vector per image or per
    R-MAC region (``classes`` None)."""

    vectors: torch.Tensor
    classes: torch.Tensor | None = None


def class_weighted_vectors(
    maps: FeatureMaps,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_classes: int,
    class_list: torch.Tensor | Sequence[int] | None = None,
) -> PooledVectors:
    """METHOD.md sections 1-2 on a batch: top-N_c classes, their CAMs (Eq. 1, normalised), and Eq. 2-4. With a
    ``class_list`` (section 4.3, :mod:`camretrieval.classlist`), every image's classes are that list's first
    ``n_classes`` instead of its own top classes."""
    if class_list is None:
        classes = top_classes(class_logits(maps.cam_activations, weight, bias), n_classes)
    else:
        listed = torch.as_tensor(class_list, dtype=torch.long, device=weight.device)[:n_classes]
        classes = listed.expand(maps.cam_activations.shape[0], -1)
    cams = normalize_cams(class_activation_maps(maps.cam_activations, weight, classes))
    cams = resize_cams(cams, tuple(maps.features.shape[-2:]))
    return PooledVectors(class_vectors(maps.features, cams), classes)


_BASELINES = {"sum": sum_pooling, "sum-cw": lambda x: sum_pooling(x) * channel_weights(x), "crow": crow_pooling,
              "mac": max_pooling, "gem": gem_pooling}


def pooled_vectors(
    maps: FeatureMaps,
    pooling: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_classes: int,
    class_list: torch.Tensor | Sequence[int] | None = None,
) -> PooledVectors:
    """The vectors of ``pooling`` (see :data:`POOLINGS`) on a batch of maps; ``n_classes`` and ``class_list`` only
    matter for "cam"."""
    if pooling == "cam":
        return class_weighted_vectors(maps, weight, bias, n_classes, class_list)
    if pooling == "rmac":
        return PooledVectors(F.normalize(regional_max_pooling(maps.features), dim=-1))
    if pooling not in _BASELINES:
        raise CamRetrievalError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    return PooledVectors(F.normalize(_BASELINES[pooling](maps.features), dim=-1).unsqueeze(1))


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
    """Turns images into descriptors D_I: class-weighted (pooling "cam") or a baseline pooling; unwhitened without a
    whitening (the "raw" rows of the paper).

    ``class_list`` (a :class:`camretrieval.classlist.ClassList` or class indices, section 4.3): every image is
    aggregated over exactly those classes instead of its own top N_c (N_c is then the list's length; asked for
    fewer classes, the list's first ones are used). It is part of the extraction settings; a whitening learned with
    a class list brings it (default), and refuses any other.

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
        pooling: str = DEFAULT_POOLING,
        class_list: "ClassList | Sequence[int] | None" = None,
        precision: str = "float32",
    ) -> None:
        if pooling not in POOLINGS:
            raise CamRetrievalError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if size < backbone.stride:
            raise CamRetrievalError(f"--size {size} is smaller than one feature cell ({backbone.stride} px)")
        if n_classes < 1:
            raise CamRetrievalError(f"the number of classes must be at least 1, got {n_classes}")
        if precision not in PRECISIONS:
            raise CamRetrievalError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        # Channels-last ("NHWC") lets the convolutions use their fastest kernels on CPU and on GPU tensor cores.
        self.backbone = backbone.to(self.device).to(memory_format=torch.channels_last).eval()
        self.precision = precision
        self.size = size
        self.pooling = pooling
        self.class_list: torch.Tensor | None = None
        if class_list is None and whitening is not None and whitening.settings.get("class_list"):
            class_list = whitening.settings["class_list"]  # a whitening learned with a list applies to that list only
        if class_list is not None:
            if pooling != "cam":
                raise CamRetrievalError(f"a class list applies to the class-weighted pooling (cam), not {pooling!r}")
            indices = class_list.check(backbone).classes if isinstance(class_list, ClassList) else tuple(class_list)
            check_class_indices(indices, backbone.classifier_weight.shape[0])
            self.class_list = torch.tensor(indices, dtype=torch.long, device=self.device)
            n_classes = len(indices)
        self.n_classes = n_classes
        listed = tuple(self.class_list.tolist()) if self.class_list is not None else None
        self.settings = ExtractionSettings(backbone.name, backbone.feature_layer, backbone.cam_layer, size, pooling, listed)
        self.whitening = whitening
        if whitening is not None:
            check_whitening(whitening, self.settings)

    # --- tensors ---

    @torch.inference_mode()
    def feature_maps(self, images: torch.Tensor) -> FeatureMaps:
        """The backbone's forward pass (in ``precision``, by autocast); the maps come back float32, on which the
        CAM arithmetic (Eq. 1-4) is done."""
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        if self.precision == "float32":
            return self.backbone(images)
        with torch.autocast(self.device.type, dtype=getattr(torch, self.precision)):
            maps = self.backbone(images)
        return FeatureMaps(maps.features.float(), maps.cam_activations.float())

    def pooled_vectors(self, maps: FeatureMaps, n_classes: int | None = None) -> PooledVectors:
        """The vectors of this describer's pooling: class vectors of the top ``n_classes`` (default N_c), or of the
        class list's first ``n_classes`` (default: all of it)."""
        with torch.inference_mode():
            return pooled_vectors(
                maps,
                self.pooling,
                self.backbone.classifier_weight,
                self.backbone.classifier_bias,
                n_classes or self.n_classes,
                self.class_list,
            )

    def aggregate(self, vectors: PooledVectors) -> torch.Tensor:
        """D_I of each image (section 3); without a whitening, the l2-normalised sum of the vectors as they are."""
        with torch.inference_mode():
            return aggregate(vectors.vectors, self.whitening)

    # --- images in memory or on disk ---

    def load(self, image: str | Path | Image.Image) -> Image.Image:
        picture = load_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
        check_image_size(*picture.size, self.backbone.stride)
        return picture

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.size, self.backbone.mean, self.backbone.std)

    def image_vectors(
        self, image: str | Path | Image.Image, box: Box | None = None, n_classes: int | None = None
    ) -> PooledVectors:
        """Pooled vectors of one image, or of its region ``box`` (original pixels), whose classes then come from
        the region itself: the logits of the region's pooled CAM activations."""
        return self.pooled_vectors(self.image_maps(image, box), n_classes)

    def image_maps(self, image: str | Path | Image.Image, box: Box | None = None) -> FeatureMaps:
        """The feature and CAM-layer maps of one image (batch of 1), cropped to the cells of ``box`` (original
        pixels, mapped through the resize: METHOD.md section 4) when given."""
        picture = self.load(image)
        tensor = self.preprocess(picture)
        maps = self.feature_maps(tensor.unsqueeze(0))
        if box is not None:
            resized_box = scale_box(validate_box(box, *picture.size), picture.size, (tensor.shape[2], tensor.shape[1]))
            strides = self.backbone.layer_strides
            maps = crop_maps(maps, resized_box, (strides[self.backbone.feature_layer], strides[self.backbone.cam_layer]))
        return maps

    def describe(
        self, images: Sequence[str | Path | Image.Image], boxes: Sequence[Box | None] | None = None
    ) -> np.ndarray:
        """Descriptors D_I of a few images (query-style: one at a time, boxes allowed). N x dim float32."""
        boxes = boxes if boxes is not None else [None] * len(images)
        if len(boxes) != len(images):
            raise CamRetrievalError(f"{len(images)} images but {len(boxes)} boxes")
        rows = [self.aggregate(self.image_vectors(image, box)) for image, box in zip(images, boxes)]
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
        compute = lambda maps: self.aggregate(self.pooled_vectors(maps))  # noqa: E731
        return self._map_files(paths, root, compute, batch_size, workers, progress)

    def vectors_of_files(
        self,
        paths: Sequence[str | Path],
        n_classes: int,
        root: str | Path | None = None,
        batch_size: int = 16,
        workers: int = 2,
        progress: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, list[FileFailure]]:
        """The pooled vectors of many files, as PCA-whitening is fit on: the top-``n_classes`` class vectors (or
        each R-MAC region, or one per image). Returns (vectors M x K, the index in ``paths`` of each vector's image,
        failures), by image in path order."""
        vectors, owners = [], []
        failures: list[FileFailure] = []
        compute = lambda maps: self.pooled_vectors(maps, n_classes).vectors  # noqa: E731
        for indices, result in self._iterate_files(paths, root, compute, batch_size, workers, progress, failures):
            for index, rows in zip(indices, result.cpu().numpy()):
                vectors.append(rows)
                owners.append(np.full(len(rows), index))
        if not vectors:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), failures
        order = np.argsort([int(o[0]) for o in owners], kind="stable")
        return (
            np.concatenate([vectors[i] for i in order]).astype(np.float32),
            np.concatenate([owners[i] for i in order]),
            failures,
        )

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
        """Decode files in workers, in order of their resized shape (:func:`~camretrieval.images.shape_order`), run
        same-shape images together (never padded: padding would change the features), and yield (indices, result
        rows). Unusable files are reported and skipped."""
        backbone = self.backbone
        dataset = ImageFileDataset(paths, self.size, backbone.mean, backbone.std, backbone.stride, root)
        loader = DataLoader(
            dataset,
            sampler=shape_order(dataset.paths, root, self.size),
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
    used = settings.to_dict() | {"class_list": settings.to_dict().get("class_list")}
    mismatches = [
        f"{key}: learned with {_setting_text(key, learned.get(key))}, used with {_setting_text(key, value)}"
        for key, value in used.items()
        if learned.get(key) != value
    ]
    if mismatches:
        raise WhiteningFileError(
            "the PCA-whitening was learned with other settings (" + "; ".join(mismatches) + "). "
            "Use the same settings, or learn a new one with camretrieval fit-pca"
        )


def _setting_text(key: str, value: object) -> str:
    if key == "class_list":
        return f"a fixed list of {len(value)} classes" if value else "each image's own top classes"
    return repr(value)


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
    """Learn PCA-whitening on the top-``n_pca`` class vectors of every image (METHOD.md section 3; with a class list,
    the vectors of its first ``n_pca`` classes, as the descriptor aggregates them), or for a baseline pooling on its
    vectors (every region for R-MAC)."""
    vectors, owners, failures = describer.vectors_of_files(paths, n_pca, root, batch_size, workers, progress)
    if len(vectors) == 0:
        raise CamRetrievalError("no usable images to learn the PCA-whitening from")
    whitening = PCAWhitening(dim, whitening_settings(describer.settings, describer.backbone, n_pca, len(np.unique(owners))))
    return whitening.fit(vectors), failures


def whitening_settings(settings: ExtractionSettings, backbone: Backbone, n_pca: int, n_images: int) -> dict:
    """What a PCA-whitening file records: the extraction settings it applies to, and how it was learned."""
    return settings.to_dict() | {"n_pca": n_pca, "n_images": n_images, "weights": backbone.weights}
