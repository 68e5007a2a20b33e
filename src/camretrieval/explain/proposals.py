"""CAM region proposals of whole images, in original pixels (METHOD.md section 5); their pictures are drawn by
:mod:`camretrieval.explain.drawing`.

:func:`propose_regions` runs a :class:`~camretrieval.extraction.describer.Describer`'s backbone once on an image:
the CAM layer's activations give the logits, the top classes, their normalised CAMs (Eq. 1), the heatmap (mean of
the top-2 CAMs, :func:`camretrieval.method.regions.heatmaps_from_activations`), one box per threshold
(:func:`camretrieval.method.regions.region_proposals`), and each box in the original image's pixels
(:func:`camretrieval.method.regions.cells_to_box`). Re-ranking uses the QUERY's classes on every database image:
pass them as ``classes``.

This module is separate from :mod:`camretrieval.method.regions` because it needs the Describer, and
:mod:`camretrieval.extraction.describer` imports ``regions``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.describer import Describer
from camretrieval.method.regions import (
    DEFAULT_MIN_SIZE,
    PROPOSAL_CLASSES,
    PROPOSAL_THRESHOLDS,
    Box,
    CellBox,
    cells_to_box,
    heatmaps_from_activations,
    region_proposals,
    threshold_boxes,
)


@dataclass
class RegionProposals:
    """Everything :func:`compute_region_proposals` worked out for one image (for drawing and debugging)."""

    image: Image.Image  # the original image, RGB, EXIF orientation applied
    resized_size: tuple[int, int]  # (width, height) the network saw
    stride: int  # output stride of the CAM layer
    classes: list[int]  # the classes whose CAMs were averaged, best first
    heatmap: np.ndarray  # grid_h x grid_w, in [0, 1]
    thresholds: tuple[float, ...]
    cell_boxes: list[CellBox] = field(default_factory=list)  # the proposals, in CAM cells
    boxes: list[Box] = field(default_factory=list)  # the same, in the original image's pixels
    # For each proposal, the thresholds that produced it (a box found again by a higher threshold is kept once).
    box_thresholds: list[tuple[float, ...]] = field(default_factory=list)


def compute_region_proposals(
    describer: Describer,
    image: str | Path | Image.Image,
    n_classes: int = PROPOSAL_CLASSES,
    thresholds: Sequence[float] = PROPOSAL_THRESHOLDS,
    min_size: float = DEFAULT_MIN_SIZE,
    classes: Sequence[int] | None = None,
) -> RegionProposals:
    """:func:`propose_regions`, keeping the intermediate results (heatmap, classes, cell boxes)."""
    if min_size < 0:
        raise CamRetrievalError(f"min_size is in pixels of the network's input and cannot be negative: {min_size}")
    picture = describer.load(image)
    tensor = describer.preprocess(picture)
    resized_size = (tensor.shape[2], tensor.shape[1])
    backbone = describer.backbone
    stride = backbone.layer_strides[backbone.cam_layer]
    with torch.inference_mode():
        activations = describer.feature_maps(tensor.unsqueeze(0)).cam_activations
        chosen = None if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
        heatmaps, used = heatmaps_from_activations(
            activations, backbone.classifier_weight, backbone.classifier_bias, n_classes, chosen
        )
    heatmap = heatmaps[0].float().cpu().numpy()
    min_cells = max(1, math.ceil(min_size / stride))
    cell_boxes = region_proposals(heatmap, thresholds, min_cells=min_cells)
    per_threshold = threshold_boxes(heatmap, thresholds)
    return RegionProposals(
        image=picture,
        resized_size=resized_size,
        stride=stride,
        classes=[int(c) for c in used[0].tolist()],
        heatmap=heatmap,
        thresholds=tuple(float(t) for t in thresholds),
        cell_boxes=cell_boxes,
        boxes=[cells_to_box(cells, stride, resized_size, picture.size) for cells in cell_boxes],
        box_thresholds=[
            tuple(float(t) for t, found in zip(thresholds, per_threshold) if found == cells) for cells in cell_boxes
        ],
    )


def propose_regions(
    describer: Describer,
    image: str | Path | Image.Image,
    n_classes: int = PROPOSAL_CLASSES,
    thresholds: Sequence[float] = PROPOSAL_THRESHOLDS,
    min_size: float = DEFAULT_MIN_SIZE,
    classes: Sequence[int] | None = None,
) -> list[Box]:
    """Candidate object regions of an image (a path or a PIL image), as boxes ``(x1, y1, x2, y2)`` in its
    ORIGINAL pixels (after EXIF orientation): METHOD.md section 5.

    One forward pass of the describer's backbone at its size; the CAMs of the top ``n_classes`` classes (by the
    classifier's logits; or the given ``classes``, best first, e.g. the query's when re-ranking) are normalised and
    averaged into a heatmap; for each threshold (fractions of its maximum, all five of the paper by default) the
    bounding box of the largest 8-connected component of cells; boxes under ``min_size`` pixels of the network's
    input (in width or height, rounded up to whole cells) skipped; duplicates dropped. Lower thresholds first, so
    the first box is usually the widest. An image with no positive evidence for its classes gives no boxes.
    The boxes can be passed back as query boxes (``Describer.describe(..., boxes=...)``): they select the same cells.
    """
    return compute_region_proposals(describer, image, n_classes, thresholds, min_size, classes).boxes


__all__ = [
    "RegionProposals",
    "compute_region_proposals",
    "propose_regions",
]
