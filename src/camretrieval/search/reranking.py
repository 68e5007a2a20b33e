"""Re-ranking with CAM regions (METHOD.md section 5), from the maps stored at index time.

For each of the top-R candidates: the CAMs of the QUERY's top-N_re classes (N_re = 6) on the candidate's stored
CAM-layer activations; the heatmap = mean of the normalised CAMs of the query's top-2 classes; for each threshold
(1, 10, 20, 30 and 40% of its maximum: all five, where the original code forgot the last) the bounding box of the
largest connected component, boxes under the minimum size skipped (:func:`camretrieval.method.regions.batch_region_proposals`);
each box's region described as a query region is (:func:`camretrieval.method.feature_maps.crop_maps`: the cells covering the box, CAMs
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

from camretrieval.method.aggregation import aggregate
from camretrieval.method.cams import check_class_indices, normalize_cams
from camretrieval.method.cell_major import (
    DEFAULT_RERANK_CLASSES,
    cell_major_cams,
    cropped_region_class_vectors,
    masked_region_class_vectors,
    region_masks,
)
from camretrieval.method.regions import (
    DEFAULT_MIN_SIZE,
    PROPOSAL_CLASSES,
    PROPOSAL_THRESHOLDS,
    CellBox,
    batch_region_proposals,
    proposal_heatmap,
)
from camretrieval.method.whitening import PCAWhitening
from camretrieval.search.online import DEFAULT_BATCH
from camretrieval.storage.maps import MapStore

__all__ = ["DEFAULT_RERANK_CLASSES", "RegionScores", "region_scores", "rerank_order"]


@dataclass
class RegionScores:
    """Re-ranking scores of candidates: ``scores`` (R,), the descriptor of each one's best region (R x dim), and
    that region as a box of CAM-layer cells (col1, row1, col2, row2), or None where the whole image was used."""

    scores: np.ndarray
    descriptors: np.ndarray
    boxes: list[CellBox | None]


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
    whole CAM cells, as :func:`camretrieval.explain.proposals.propose_regions`). ``crop`` forces the per-region cropping
    path (the definition) even where the batched masked path applies."""
    candidates = np.asarray(candidates, dtype=np.int64)
    classes = check_class_indices(classes, weight.shape[0]).to(weight.device)
    class_weights = weight[classes]
    query = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(-1).to(weight.device)
    min_cells = max(1, math.ceil(min_size / strides[1]))
    scores = np.empty(len(candidates), dtype=np.float32)
    descriptors = np.empty((len(candidates), query.numel()), dtype=np.float32)
    best_boxes: list[CellBox | None] = [None] * len(candidates)
    position = {int(c): i for i, c in enumerate(candidates)}
    for batch in store.batches(candidates, batch_size, weight.device):  # the next batch decodes meanwhile
        group, features, activations = batch.images, batch.features, batch.cam_activations
        # The heatmap: mean of the whole-image normalised CAMs of the query's top classes (Eq. 1, section 5).
        raw_cams = cell_major_cams(activations, class_weights)
        heatmaps = proposal_heatmap(normalize_cams(raw_cams), heatmap_classes)
        proposals = batch_region_proposals(heatmaps, thresholds, min_cells)
        height, width = activations.shape[1:3]
        # No usable region: the whole image, described the same way.
        boxes = [image_boxes or [(0, 0, width, height)] for image_boxes in proposals]
        if features.shape[1:3] == activations.shape[1:3] and not crop:
            masks = region_masks(boxes, height, width).to(weight.device)
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
