"""The describer: images -> one forward pass -> pooled vectors -> D_I (METHOD.md sections 1-4).

:class:`Describer` composes the paper's maths (:mod:`camretrieval.method`) with image loading, resizing, query boxes,
batching over files in DataLoader workers, and the aggregation of section 3. :meth:`Describer.iterate_files` is the
one way many files are described in batches: the descriptors of a collection (:meth:`Describer.describe_files`), the
vectors a whitening or a class list is learned from (:mod:`camretrieval.extraction.fitting`), the index writer and
the evaluation all run on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.backbones import Backbone, load_backbone
from camretrieval.extraction.calibration import ForwardSpeed, fastest_forward, forward_processes_possible
from camretrieval.extraction.images import (
    ImageFileDataset,
    LoadedImage,
    check_image_size,
    collate_loaded,
    load_image,
    preprocess,
    shape_order,
)
from camretrieval.extraction.settings import (
    DEFAULT_CLASSES,
    DEFAULT_POOLING,
    DEFAULT_SIZE,
    PRECISIONS,
    ExtractionSettings,
)
from camretrieval.method.aggregation import aggregate
from camretrieval.method.class_list import ClassList, check_class_indices
from camretrieval.method.feature_maps import FeatureMaps, crop_maps
from camretrieval.method.pooling import POOLINGS, PooledVectors, pooled_vectors
from camretrieval.method.regions import Box, scale_box, validate_box
from camretrieval.method.whitening import PCAWhitening, WhiteningFileError


@dataclass
class FileFailure:
    """A file that could not be described, and why; ``retry``: the reason may pass (missing, no permission)."""

    path: str
    reason: str
    retry: bool = False


class Describer:
    """Turns images into descriptors D_I: class-weighted (pooling "cam") or a baseline pooling; unwhitened without a
    whitening (the "raw" rows of the paper).

    ``class_list`` (a :class:`camretrieval.method.class_list.ClassList` or class indices, section 4.3): every image is
    aggregated over exactly those classes instead of its own top N_c (N_c is then the list's length; asked for
    fewer classes, the list's first ones are used). It is part of the extraction settings; a whitening learned with
    a class list brings it (default), and refuses any other.

    >>> describer = Describer(load_backbone("efficientnet_lite0"), size=512, whitening=PCAWhitening.load("pca.npz"))
    >>> descriptors = describer.describe(["a.jpg", "b.jpg"])          # N x 512, l2-normalised
    >>> query = describer.describe(["q.jpg"], boxes=[(10, 20, 200, 300)])

    ``settings`` (:class:`~camretrieval.extraction.settings.ExtractionSettings`) records what it computes; ``weights``
    is only recorded there (the weights file the backbone was loaded from; None: packaged weights).
    """

    @classmethod
    def from_settings(
        cls,
        settings: ExtractionSettings,
        whitening: PCAWhitening | None = None,
        device: str | torch.device = "cpu",
        precision: str = "float32",
    ) -> "Describer":
        """The describer of ``settings``, its backbone loaded with its weights (what the index writer, each Ray
        worker, an opened index and the evaluation use)."""
        backbone = load_backbone(settings.backbone, weights=settings.weights, feature_layer=settings.feature_layer)
        return cls(
            backbone, settings.size, settings.n_classes, whitening, device, settings.pooling, settings.class_list,
            precision, weights=settings.weights, scales=settings.scales,
        )

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
        weights: str | None = None,
        scales: Sequence[float] = (1.0,),
    ) -> None:
        if pooling not in POOLINGS:
            raise CamRetrievalError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if size < backbone.stride:
            raise CamRetrievalError(f"--size {size} is smaller than one feature cell ({backbone.stride} px)")
        if n_classes < 1:
            raise CamRetrievalError(f"the number of classes must be at least 1, got {n_classes}")
        if precision not in PRECISIONS:
            raise CamRetrievalError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
        self.device = _usable_device(device)
        # Channels-last ("NHWC") lets the convolutions use their fastest kernels on CPU and on GPU tensor cores; a
        # calibration (:meth:`fastest_forward`) may choose otherwise for this machine.
        self.memory_format = torch.channels_last
        self.backbone = backbone.to(self.device).to(memory_format=self.memory_format).eval()
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
        self.settings = ExtractionSettings(
            backbone.name, backbone.feature_layer, backbone.cam_layer, size, pooling, listed, n_classes, weights,
            tuple(scales),
        )
        self.scales = self.settings.scales
        if min(self.scales) * size < backbone.stride:
            raise CamRetrievalError(
                f"scale {min(self.scales):g} of --size {size} is {min(self.scales) * size:.0f} px, smaller than one "
                f"feature cell ({backbone.stride} px): use larger --scales"
            )
        self.whitening = whitening
        if whitening is not None:
            check_whitening(whitening, self.settings)

    # --- tensors ---

    @torch.inference_mode()
    def feature_maps(self, images: torch.Tensor) -> FeatureMaps:
        """The backbone's forward pass (in ``precision``, by autocast); the maps come back float32, on which the
        CAM arithmetic (Eq. 1-4) is done. Multi-scale (``scales``): the images are also resized to each other
        scale (bilinear, antialiased) and forwarded; those maps are the result's ``other_scales``."""
        images = images.to(self.device).contiguous(memory_format=self.memory_format)
        maps = self._forward(images)
        height, width = images.shape[-2:]
        stride = self.backbone.stride
        others = []
        for scale in self.scales[1:]:
            size = (max(stride, round(height * scale)), max(stride, round(width * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
            other = self._forward(scaled.contiguous(memory_format=self.memory_format))
            other.input_scale = size[1] / width
            others.append(other)
        maps.other_scales = tuple(others)
        return maps

    def _forward(self, images: torch.Tensor) -> FeatureMaps:
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

    def fastest_forward(self, progress: bool = True) -> ForwardSpeed:
        """The fastest batch size and memory layout of this describer's forward pass on its device (measured once
        per machine and cached: :mod:`camretrieval.extraction.calibration`); the backbone is switched to that layout."""
        speed = fastest_forward(self.backbone, self.size, self.device, self.precision, progress)
        self.memory_format = speed.memory_format
        self.backbone.to(memory_format=self.memory_format)
        return speed

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

    def iterate_files(
        self,
        paths: Sequence[str | Path],
        root: str | Path | None = None,
        compute: Callable[[FeatureMaps], object] | None = None,
        batch_size: int | None = None,
        workers: int = 2,
        progress: bool = True,
        failures: list[FileFailure] | None = None,
    ) -> Iterator[tuple[list[int], object]]:
        """Describe many files (relative to ``root`` when given) in batches: the one way of extraction.

        Files are read in order of their resized shape (:func:`~camretrieval.extraction.images.shape_order`);
        same-shape images run through the backbone together (never padded: padding would change the features).
        Yields (indices into ``paths``, ``compute(maps)`` of those images' batch of
        :class:`~camretrieval.method.feature_maps.FeatureMaps`; default: their descriptors D_I). Unusable files are
        reported, appended to ``failures`` and skipped; a progress bar shows files done, rate and time left.

        ``batch_size`` None: the machine's fastest way (:meth:`fastest_forward`), which on a multi-core CPU may be
        one single-threaded process per core that decodes, forwards and computes its own images; ``compute`` then
        runs in those processes and must return what it computes (state it keeps stays there). Otherwise, and with
        a given ``batch_size``, files are decoded in ``workers`` DataLoader processes (0: in this one) and the
        forward pass runs here."""
        if compute is None:
            compute = self.descriptors_of_maps
        processes = 0
        if batch_size is None:
            speed = self.fastest_forward(progress)
            batch_size = speed.batch_size
            if speed.processes > 1 and workers > 0 and forward_processes_possible(self.device):
                processes = speed.processes
        failures = failures if failures is not None else []
        backbone = self.backbone
        files = ImageFileDataset(paths, self.size, backbone.mean, backbone.std, backbone.stride, root)
        loader = DataLoader(
            _DescribedFiles(self, files, compute) if processes else files,
            sampler=shape_order(files.paths, root, self.size),
            batch_size=max(batch_size, 1),
            num_workers=processes or workers,
            collate_fn=collate_loaded,
            persistent_workers=False,
        )
        bar = tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr, smoothing=0.1)
        try:
            for batch in loader:
                failed, described = batch if processes else self._describe_loaded(batch, compute)
                for item in failed:
                    failures.append(FileFailure(str(paths[item.index]), item.error or "unreadable", item.retry))
                    bar.write(f"skipped {paths[item.index]}: {item.error}", file=sys.stderr)
                yield from described
                bar.update(len(failed) + sum(len(indices) for indices, _ in described))
        finally:
            bar.close()

    def _describe_loaded(
        self, batch: list[LoadedImage], compute: Callable[[FeatureMaps], object]
    ) -> tuple[list[LoadedImage], list[tuple[list[int], object]]]:
        """A batch of decoded files: (those that failed, [(indices, ``compute(maps)``) of each shape's group])."""
        by_shape: dict[tuple[int, ...], list[LoadedImage]] = {}
        for item in batch:
            if item.tensor is not None:
                by_shape.setdefault(tuple(item.tensor.shape), []).append(item)
        described = [
            ([item.index for item in group], compute(self.feature_maps(torch.stack([item.tensor for item in group]))))
            for group in by_shape.values()
        ]
        return [item for item in batch if item.tensor is None], described

    def descriptors_of_maps(self, maps: FeatureMaps) -> torch.Tensor:
        """D_I of a batch of maps: this describer's pooling, then the aggregation (section 3)."""
        return self.aggregate(self.pooled_vectors(maps))

    def describe_files(
        self,
        paths: Sequence[str | Path],
        root: str | Path | None = None,
        batch_size: int | None = None,
        workers: int = 2,
        progress: bool = True,
    ) -> tuple[np.ndarray, list[int], list[FileFailure]]:
        """Descriptors of many files (:meth:`iterate_files`). Returns (descriptors N_ok x dim in path order, the
        indices into ``paths`` that succeeded, the failures)."""
        failures: list[FileFailure] = []
        done, rows = in_path_order(self.iterate_files(paths, root, None, batch_size, workers, progress, failures))
        descriptors = np.stack(rows).astype(np.float32) if rows else np.zeros((0,), np.float32)
        return descriptors, done, failures

    def vectors_of_files(
        self,
        paths: Sequence[str | Path],
        n_classes: int,
        root: str | Path | None = None,
        batch_size: int | None = None,
        workers: int = 2,
        progress: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, list[FileFailure]]:
        """The pooled vectors of many files, as PCA-whitening is fit on: the top-``n_classes`` class vectors (or
        each R-MAC region, or one per image). Returns (vectors M x K, the index in ``paths`` of each vector's image,
        failures), by image in path order."""
        failures: list[FileFailure] = []
        compute = lambda maps: self.pooled_vectors(maps, n_classes).vectors  # noqa: E731
        done, rows = in_path_order(self.iterate_files(paths, root, compute, batch_size, workers, progress, failures))
        if not rows:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), failures
        owners = np.concatenate([np.full(len(vectors), index) for index, vectors in zip(done, rows)])
        return np.concatenate(rows).astype(np.float32), owners, failures


class _DescribedFiles(Dataset):
    """Files decoded, forwarded and computed in one DataLoader worker (:meth:`Describer.iterate_files` with one
    single-threaded process per core): a batch of indices gives what :meth:`Describer._describe_loaded` returns."""

    def __init__(self, describer: Describer, files: ImageFileDataset, compute: Callable[[FeatureMaps], object]) -> None:
        self.describer, self.files, self.compute = describer, files, compute

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, indices: list[int]):
        return self.describer._describe_loaded([self.files[i] for i in indices], self.compute)


def _usable_device(device: str | torch.device) -> torch.device:
    """``device`` as torch names it, or an error saying why it cannot be used here."""
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise CamRetrievalError(f"unknown device {device!r} ({error}): use cpu, cuda or cuda:N") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise CamRetrievalError(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise CamRetrievalError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices here")
    return chosen


def in_path_order(batches: Iterator[tuple[list[int], torch.Tensor]]) -> tuple[list[int], list[np.ndarray]]:
    """Collect what :meth:`Describer.iterate_files` yields (in order of image shape) back into the order of the
    paths: (the indices of the files described, ascending; each one's result rows as a NumPy array)."""
    by_index: dict[int, np.ndarray] = {}
    for indices, result in batches:
        for index, rows in zip(indices, result.cpu().numpy()):
            by_index[index] = rows
    done = sorted(by_index)
    return done, [by_index[index] for index in done]


def check_whitening(whitening: PCAWhitening, settings: ExtractionSettings) -> None:
    """A whitening applies only to class vectors extracted with the settings it was learned with."""
    learned = whitening.settings
    used = settings.vector_settings()
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
