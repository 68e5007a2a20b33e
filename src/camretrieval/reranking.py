"""Re-ranking with CAM regions (METHOD.md section 5), from the maps stored at index time.

For each of the top-R candidates: the CAMs of the QUERY's top-N_re classes (N_re = 6) on the candidate's stored
CAM-layer activations; the heatmap = mean of the normalised CAMs of the query's top-2 classes; for each threshold
(1, 10, 20, 30 and 40% of its maximum: all five, where the original code forgot the last) the bounding box of the
largest connected component, boxes under the minimum size skipped (:func:`camretrieval.regions.batch_region_proposals`);
each box's region described as a query region is (``descriptor.crop_maps``: the cells covering the box, CAMs
normalised within the region, CroW channel weights of the region, Eq. 1-4) with the N_re query classes, whitened and
aggregated; the candidate's score is its best region's cosine similarity with the query.

The query side is the query's descriptor aggregated over the same N_re classes (its region's top-N_re class vectors).
That is what the authors' code does ("when re-ranking, descriptor for the query computed with less CAMs"), and it is
the only comparison of like with like: a region descriptor sums N_re class vectors, so it is compared with a query
descriptor that sums the query's vectors of the same N_re classes (as OnA compares same-class aggregations).

A candidate with no usable proposal (its heatmap has no positive cell, or every box is under the minimum size) is
scored by its whole image, described the same way with the N_re classes. The original code scored such a candidate
-10, dropping it to the bottom of the top-R.

Nothing here writes to the database: the original overwrote the database rows of the re-ranked images with their
region descriptors, which contaminated every later query. Region descriptors are returned to the caller instead
(query expansion uses them for this query only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .aggregation import aggregate
from .backbones import FeatureMaps
from .cams import class_activation_maps, normalize_cams, resize_cams
from .descriptor import crop_maps
from .mapstore import MapStore
from .online import DEFAULT_BATCH, cell_major_cams, channel_weights_from_fractions, check_classes
from .pooling import class_vectors
from .proposals import DEFAULT_MIN_SIZE
from .regions import PROPOSAL_CLASSES, PROPOSAL_THRESHOLDS, CellBox, batch_region_proposals, proposal_heatmap
from .whitening import PCAWhitening

DEFAULT_RERANK_CLASSES = 6  # N_re of the paper


@dataclass
class RegionScores:
    """Re-ranking scores of candidates: ``scores`` (R,), the descriptor of each one's best region (R x dim), and
    that region as a box of CAM-layer cells (col1, row1, col2, row2), or None where the whole image was used."""

    scores: np.ndarray
    descriptors: np.ndarray
    boxes: list[CellBox | None]


def _region_masks(boxes: Sequence[Sequence[CellBox]], height: int, width: int) -> torch.Tensor:
    """B x R x (H*W) boolean masks of each image's boxes (R = the most boxes of any image; missing ones empty)."""
    slots = max(1, max(len(b) for b in boxes))
    masks = torch.zeros(len(boxes), slots, height, width, dtype=torch.bool)
    for image, image_boxes in enumerate(boxes):
        for slot, (col1, row1, col2, row2) in enumerate(image_boxes):
            masks[image, slot, row1:row2, col1:col2] = True
    return masks.reshape(len(boxes), slots, height * width)


def masked_region_class_vectors(
    features: torch.Tensor,
    cam_activations: torch.Tensor,
    class_weights: torch.Tensor,
    masks: torch.Tensor,
    raw_cams: torch.Tensor | None = None,
) -> torch.Tensor:
    """Class vectors of many rectangular regions at once, when the CAM layer has the features' grid.

    features B x H x W x K, cam_activations B x H x W x K', class_weights N x K' (W[classes]), masks B x R x (H*W);
    ``raw_cams``: the unnormalised CAMs (B x N x H x W) when already computed (Eq. 1).
    Returns B x R x N x K: for each region, exactly what cropping its cells and computing Eq. 1-4 on the crop gives
    (CAMs normalised by their maximum within the region, CroW weights from the region's cells), as matrix products
    over the whole map with the region's 0/1 mask: a cell outside the region gets weight 0 in every sum, and the
    -inf it gets before the maximum keeps it out of the CAM's peak. An empty mask gives zero vectors.
    """
    batch, height, width, channels = features.shape
    cells = features.reshape(batch, height * width, channels)
    if raw_cams is None:
        raw_cams = cell_major_cams(cam_activations, class_weights)
    raw = raw_cams.reshape(batch, 1, -1, height * width)  # B x 1 x N x n
    inside = masks.unsqueeze(2)  # B x R x 1 x n
    peak = raw.masked_fill(~inside, float("-inf")).amax(dim=3, keepdim=True)  # B x R x N x 1
    # normalize_cams' expression, with the region's peak: divide by a positive maximum, clamp negatives to 0.
    scaled = (raw / torch.where(peak > 0, peak, torch.ones_like(peak))).clamp(min=0)
    cams = torch.where((peak > 0) & inside, scaled, torch.zeros_like(scaled))  # B x R x N x n
    pooled = (cams.reshape(batch, -1, height * width) @ cells).reshape(batch, masks.shape[1], -1, channels)
    # Eq. 2 per region: the fraction of the region's cells where channel k is positive.
    region_mask = masks.to(cells.dtype)
    fractions = (region_mask @ (cells > 0).to(cells.dtype)) / region_mask.sum(dim=2, keepdim=True).clamp(min=1)
    return F.normalize(pooled * channel_weights_from_fractions(fractions).unsqueeze(2), dim=-1)


def cropped_region_class_vectors(
    features: torch.Tensor,
    cam_activations: torch.Tensor,
    weight: torch.Tensor,
    classes: torch.Tensor,
    cell_box: CellBox,
    cam_stride: int,
    strides: tuple[int, int],
) -> torch.Tensor:
    """Class vectors (N x K) of one region of one image, by cropping its maps as a query region is cropped
    (:func:`camretrieval.descriptor.crop_maps`): for a CAM layer with another grid than the features, and as the
    plain definition the batched :func:`masked_region_class_vectors` is tested against.

    features H x W x K and cam_activations h x w x K' (cell-major, one image); ``cell_box`` in CAM-layer cells.
    """
    col1, row1, col2, row2 = cell_box
    box = (col1 * cam_stride, row1 * cam_stride, col2 * cam_stride, row2 * cam_stride)  # network-input pixels
    maps = FeatureMaps(features.permute(2, 0, 1).unsqueeze(0), cam_activations.permute(2, 0, 1).unsqueeze(0))
    region = crop_maps(maps, box, strides)
    cams = normalize_cams(class_activation_maps(region.cam_activations, weight, classes.unsqueeze(0)))
    cams = resize_cams(cams, tuple(region.features.shape[-2:]))
    return class_vectors(region.features, cams)[0]


@torch.inference_mode()
def region_scores(
    store: MapStore,
    candidates: Sequence[int] | np.ndarray,
    classes: torch.Tensor | Sequence[int],
    query: np.ndarray | torch.Tensor,
    weight: torch.Tensor,
    whitening: PCAWhitening | None,
    strides: tuple[int, int],
    thresholds: Sequence[float] = PROPOSAL_THRESHOLDS,
    min_size: float = DEFAULT_MIN_SIZE,
    heatmap_classes: int = PROPOSAL_CLASSES,
    batch_size: int = DEFAULT_BATCH,
    crop: bool = False,
) -> RegionScores:
    """Score each candidate (database index) by its best CAM region against ``query`` (the query's descriptor
    aggregated over ``classes``, its top N_re, best first). ``strides``: output strides of the (feature, CAM)
    layers; ``min_size``: boxes narrower or lower than this many network-input pixels are skipped (rounded up to
    whole CAM cells, as :func:`camretrieval.proposals.propose_regions`). ``crop`` forces the per-region cropping
    path (the definition) even where the batched masked path applies."""
    candidates = np.asarray(candidates, dtype=np.int64)
    classes = check_classes(classes, weight.shape[0]).to(weight.device)
    class_weights = weight[classes]
    query = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(-1).to(weight.device)
    min_cells = max(1, math.ceil(min_size / strides[1]))
    scores = np.empty(len(candidates), dtype=np.float32)
    descriptors = np.empty((len(candidates), query.numel()), dtype=np.float32)
    best_boxes: list[CellBox | None] = [None] * len(candidates)
    position = {int(c): i for i, c in enumerate(candidates)}
    for group in store.shape_groups(candidates, batch_size):
        features, activations = store.load(group, weight.device)
        # The heatmap: mean of the whole-image normalised CAMs of the query's top classes (Eq. 1, section 5).
        raw_cams = cell_major_cams(activations, class_weights)
        heatmaps = proposal_heatmap(normalize_cams(raw_cams), heatmap_classes)
        proposals = batch_region_proposals(heatmaps, thresholds, min_cells)
        height, width = activations.shape[1:3]
        # No usable region: the whole image, described the same way.
        boxes = [image_boxes or [(0, 0, width, height)] for image_boxes in proposals]
        if features.shape[1:3] == activations.shape[1:3] and not crop:
            masks = _region_masks(boxes, height, width).to(weight.device)
            vectors = masked_region_class_vectors(features, activations, class_weights, masks, raw_cams)
            region_descriptors = aggregate(vectors.flatten(0, 1), whitening).reshape(len(group), masks.shape[1], -1)
            valid = masks.any(dim=2)
        else:
            slots = max(len(b) for b in boxes)
            region_descriptors = torch.zeros(len(group), slots, query.numel(), device=weight.device)
            valid = torch.zeros(len(group), slots, dtype=torch.bool, device=weight.device)
            for i, image_boxes in enumerate(boxes):
                for slot, cell_box in enumerate(image_boxes):
                    vectors = cropped_region_class_vectors(
                        features[i], activations[i], weight, classes, cell_box, strides[1], strides
                    )
                    region_descriptors[i, slot] = aggregate(vectors.unsqueeze(0), whitening)[0]
                    valid[i, slot] = True
        region_similarity = (region_descriptors @ query).masked_fill(~valid, float("-inf"))
        best = region_similarity.argmax(dim=1)
        for i, image in enumerate(group):
            row = position[int(image)]
            slot = int(best[i])
            scores[row] = float(region_similarity[i, slot])
            descriptors[row] = region_descriptors[i, slot].float().cpu().numpy()
            best_boxes[row] = tuple(boxes[i][slot]) if proposals[i] else None
    return RegionScores(scores, descriptors, best_boxes)


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Positions of the re-scored candidates in their new order: best score first, ties kept in the old order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
