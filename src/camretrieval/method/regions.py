"""Query regions: boxes in original image pixels, mapped onto feature maps (METHOD.md section 4), and the CAM
region proposals of re-ranking (METHOD.md section 5).

A box ``(x1, y1, x2, y2)`` is given in the pixels of the original image (after EXIF orientation), x to the right and
y down, as Oxford/Paris annotate their queries. The image is resized before the forward pass, so the box is first
scaled into the resized image, then divided by the layer's stride: the original code divided original-pixel boxes
by the stride, forgetting the resize (about 6% off on Oxford).

Region proposals go the other way: a heatmap of CAM cells is thresholded, the largest connected component of each
threshold gives a box of cells (:func:`region_proposals`), and :func:`cells_to_box` maps it back through the stride
and the resize into the original image's pixels. The image-level entry point, which runs the backbone, is
:func:`camretrieval.explain.proposals.propose_regions` (a separate module: this one is imported by ``descriptor``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from camretrieval.constants import box_numbers
from camretrieval.errors import CamRetrievalError
from camretrieval.method.cams import class_activation_maps, class_logits, normalize_cams, top_classes

Box = tuple[float, float, float, float]
# A box of feature cells (col1, row1, col2, row2): end-exclusive, so ``heatmap[row1:row2, col1:col2]`` is its cells.
CellBox = tuple[int, int, int, int]

# METHOD.md section 5: fractions of the heatmap's maximum. All five are used; the original code's loop stopped
# after the fourth (``nthres = 4``), so its 40% region was computed and never scored.
PROPOSAL_THRESHOLDS: tuple[float, ...] = (0.01, 0.1, 0.2, 0.3, 0.4)
# The number of top classes of the query whose CAMs are averaged into the heatmap (METHOD.md section 5).
PROPOSAL_CLASSES = 2
# Boxes narrower or lower than this many cells are skipped. The original code skipped boxes under 5 cells of VGG's
# stride 16 on 1024x720 inputs (80 px, 11% of the shorter side); at this project's 448 px and stride 32 that is
# 50 px, rounded up to whole cells: 2.
DEFAULT_MIN_CELLS = 2


class BoxError(CamRetrievalError):
    """A query box that is malformed, empty, or outside its image."""


def parse_box(text: str) -> Box:
    """``"x1,y1,x2,y2"`` (commas or spaces) -> a box of floats."""
    try:
        return box_numbers(text)
    except ValueError as error:
        raise BoxError(str(error)) from None


def validate_box(box: Box, width: int, height: int) -> Box:
    """Check a box against its image (width x height): empty or fully outside is an error; a box that goes over
    the border is clipped to the image."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        raise BoxError(f"box {box} has a non-finite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise BoxError(f"box {box} is empty: it needs x1 < x2 and y1 < y2 (pixels, x1,y1 top-left)")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise BoxError(f"box {box} lies outside the {width}x{height} image")
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """A box in an image of ``from_size`` (width, height) expressed in the same image resized to ``to_size``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x1, y1, x2, y2 = box
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def box_to_cells(box: Box, stride: int, grid_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The feature cells ``(col1, row1, col2, row2)`` (end-exclusive slices) that cover a box.

    ``box`` is in the pixels of the image the network saw (the resized one); a cell (i, j) of a layer of output
    stride s covers pixels ``[s*i, s*(i+1)) x [s*j, s*(j+1))``. Every cell the box touches is kept, at least one,
    within the ``grid_size`` (width, height) of the feature map.
    """
    x1, y1, x2, y2 = box
    grid_w, grid_h = grid_size
    col1 = min(max(math.floor(x1 / stride), 0), grid_w - 1)
    row1 = min(max(math.floor(y1 / stride), 0), grid_h - 1)
    col2 = max(min(math.ceil(x2 / stride), grid_w), col1 + 1)
    row2 = max(min(math.ceil(y2 / stride), grid_h), row1 + 1)
    return col1, row1, col2, row2


# --- Region proposals from CAM heatmaps (METHOD.md section 5) ---

# 8-connectivity in each plane, nothing across planes: the stacked masks of several thresholds (or images) are
# labelled by one call to ``ndimage.label`` without a component ever joining two of them.
_PLANE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PLANE_8_CONNECTIVITY[1] = True


def _heatmap_array(heatmap: torch.Tensor | np.ndarray, dims: int) -> np.ndarray:
    array = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if array.ndim != dims:
        raise CamRetrievalError(f"expected a heatmap of {dims} dimensions, got shape {tuple(array.shape)}")
    array = array.astype(np.float64, copy=False)
    if not np.isfinite(array).all():
        raise CamRetrievalError("the heatmap has NaN or infinite values")
    return array


def _check_thresholds(thresholds: Sequence[float]) -> np.ndarray:
    values = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    # A threshold <= 0 would keep cells with no evidence (a CAM is 0 where it is not positive); one above 1 keeps
    # nothing.
    if values.size == 0 or not np.all((values > 0) & (values <= 1)):
        raise CamRetrievalError(f"thresholds are fractions of the heatmap's maximum in (0, 1]; got {list(thresholds)}")
    return values


def _largest_component_boxes(masks: np.ndarray) -> list[CellBox | None]:
    """The bounding box of the largest 8-connected component of each boolean mask of ``masks`` (N x H x W), or None
    where a mask is empty. Largest = most cells; ties go to the component met first in raster order."""
    from scipy import ndimage  # here: a plain search (no region proposals) does not pay for importing SciPy

    labels, count = ndimage.label(masks, structure=_PLANE_8_CONNECTIVITY)
    boxes: list[CellBox | None] = [None] * masks.shape[0]
    if count == 0:
        return boxes
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(labels)  # per label: (plane, rows, cols) slices of its bounding box
    planes = np.fromiter((s[0].start for s in slices), dtype=np.int64, count=count)
    # Labels are numbered in raster order, so sorting by (plane, -size, label) puts each plane's winner first.
    order = np.lexsort((np.arange(count), -sizes, planes))
    _, first = np.unique(planes[order], return_index=True)
    for label_index in order[first]:
        plane, rows, cols = slices[label_index]
        boxes[plane.start] = (cols.start, rows.start, cols.stop, rows.stop)
    return boxes


def threshold_boxes(
    heatmap: torch.Tensor | np.ndarray, thresholds: Sequence[float] = PROPOSAL_THRESHOLDS
) -> list[CellBox | None]:
    """For each threshold t, the cell box of the largest connected component of ``heatmap >= t * max(heatmap)``
    (METHOD.md section 5), one entry per threshold in order: nothing filtered or merged, None where no cell passes
    (a heatmap whose maximum is not positive has no evidence anywhere, so every entry is None).

    Connectivity is 8 (diagonal neighbours join), as the original code, which took the largest *external contour*
    of ``cv2.findContours``: OpenCV's border following treats foreground pixels as 8-connected. Two differences,
    both deliberate: "largest" is the number of cells, where the original used ``cv2.contourArea`` (the polygon
    through the boundary cells' centres, which is 0 for any component one cell wide, so such components tied
    arbitrarily); and a cell passes at ``>=`` the threshold (the original: ``>``), so a threshold of 1 keeps the
    maximum itself rather than nothing.
    """
    values = _check_thresholds(thresholds)
    array = _heatmap_array(heatmap, 2)
    peak = array.max() if array.size else 0.0
    if not peak > 0:
        return [None] * values.size
    return _largest_component_boxes(array[None] >= values[:, None, None] * peak)


def region_proposals(
    heatmap: torch.Tensor | np.ndarray,
    thresholds: Sequence[float] = PROPOSAL_THRESHOLDS,
    min_cells: int = DEFAULT_MIN_CELLS,
) -> list[CellBox]:
    """Candidate regions of one image from its CAM heatmap (H x W), as cell boxes ``(col1, row1, col2, row2)``
    with end-exclusive col2/row2 (METHOD.md section 5).

    For every threshold (fractions of the heatmap's maximum, all five of the paper by default), the bounding box of
    the largest 8-connected component of the cells at or above it (see :func:`threshold_boxes`); boxes less than
    ``min_cells`` wide or high are skipped (the original code's rule, on both sides); a box already proposed by a
    lower threshold is not repeated. Thresholds are taken in the order given, and so are the boxes. A heatmap whose
    maximum is not positive proposes nothing.
    """
    if min_cells < 1:
        raise CamRetrievalError(f"min_cells must be at least 1, got {min_cells}")
    proposals: list[CellBox] = []
    for box in threshold_boxes(heatmap, thresholds):
        if box is None or box[2] - box[0] < min_cells or box[3] - box[1] < min_cells or box in proposals:
            continue
        proposals.append(box)
    return proposals


def batch_region_proposals(
    heatmaps: torch.Tensor | np.ndarray,
    thresholds: Sequence[float] = PROPOSAL_THRESHOLDS,
    min_cells: int = DEFAULT_MIN_CELLS,
) -> list[list[CellBox]]:
    """:func:`region_proposals` of each heatmap of a batch (B x H x W), with one connected-component labelling for
    the whole batch (every threshold of every image is its own plane)."""
    if min_cells < 1:
        raise CamRetrievalError(f"min_cells must be at least 1, got {min_cells}")
    values = _check_thresholds(thresholds)
    array = _heatmap_array(heatmaps, 3)
    n_images, n_thresholds = array.shape[0], values.size
    peaks = array.reshape(n_images, -1).max(axis=1) if array[0].size else np.zeros(n_images)
    # Where the maximum is not positive, an infinite cut-off keeps no cell: no proposals, as for one heatmap.
    cutoffs = np.where(peaks[:, None] > 0, values[None, :] * peaks[:, None], np.inf)
    masks = array[:, None] >= cutoffs[:, :, None, None]
    boxes = _largest_component_boxes(masks.reshape(n_images * n_thresholds, *array.shape[1:]))
    result: list[list[CellBox]] = []
    for image in range(n_images):
        proposals: list[CellBox] = []
        for box in boxes[image * n_thresholds : (image + 1) * n_thresholds]:
            if box is None or box[2] - box[0] < min_cells or box[3] - box[1] < min_cells or box in proposals:
                continue
            proposals.append(box)
        result.append(proposals)
    return result


def proposal_heatmap(cams: torch.Tensor, n: int = PROPOSAL_CLASSES) -> torch.Tensor:
    """The heatmap of METHOD.md section 5: the mean of the normalised CAMs of the top ``n`` classes.

    ``cams``: N_c x H x W (or B x N_c x H x W) normalised CAMs (:func:`camretrieval.method.cams.normalize_cams`), ordered
    best class first as :func:`camretrieval.method.cams.top_classes` gives them; with fewer than ``n`` maps, all are used.
    Returns H x W (or B x H x W). The original code averaged exactly its first two CAMs.
    """
    if n < 1:
        raise CamRetrievalError(f"the heatmap needs at least one class, got n={n}")
    if cams.dim() < 3 or cams.shape[-3] == 0:
        raise CamRetrievalError(f"expected CAMs N_c x H x W (N_c >= 1), got shape {tuple(cams.shape)}")
    return cams[..., :n, :, :].mean(dim=-3)


def cells_to_box(
    cells: CellBox, stride: int, resized_size: tuple[int, int], original_size: tuple[int, int]
) -> Box:
    """A cell box of a layer of output ``stride`` as a box in the ORIGINAL image's pixels: the inverse of the
    query-box mapping (:func:`scale_box` then :func:`box_to_cells`).

    Cell (i, j) covers pixels ``[s*i, s*(i+1)) x [s*j, s*(j+1))`` of the resized image (``resized_size``, width x
    height, as the network saw it); those pixels are scaled to ``original_size`` and clipped to the image, since the
    last row and column of cells may reach past the resized image's border (SAME padding rounds the grid up).
    Feeding the result back as a query box selects the same cells (each edge is moved
    :data:`_CELL_EDGE_NUDGE` px inward for that, see there).
    """
    col1, row1, col2, row2 = cells
    if not (0 <= col1 < col2 and 0 <= row1 < row2):
        raise BoxError(f"cell box {cells} is empty or negative: it needs 0 <= col1 < col2 and 0 <= row1 < row2")
    resized_box = (col1 * stride, row1 * stride, col2 * stride, row2 * stride)
    x1, y1, x2, y2 = validate_box(scale_box(resized_box, resized_size, original_size), *original_size)
    nudge = _CELL_EDGE_NUDGE
    return x1 + nudge, y1 + nudge, x2 - nudge, y2 - nudge


# An edge of a cell box lies exactly on a cell border; scaled to the original image and back it comes out a few
# ulps off (on about 1 in 5 real image sizes), and box_to_cells' floor/ceil then adds the neighbouring cell. Moving
# each edge this far inward (invisible: a millionth of a pixel, far above float64 noise at image coordinates, far
# below a cell) makes the round trip exact.
_CELL_EDGE_NUDGE = 1e-6


# --- Proposal heatmaps from a forward pass's CAM-layer activations ---

# Boxes under this many pixels of the network's input, in width or height, are skipped: 2 cells at stride 32 (see
# DEFAULT_MIN_CELLS above for how the original code's 5 cells of stride 16 at 720 px become this).
DEFAULT_MIN_SIZE = 64


def heatmaps_from_activations(
    cam_activations: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_classes: int = PROPOSAL_CLASSES,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposal heatmaps of a batch from its CAM-layer activations (B x K x h x w): (heatmaps B x h x w, the
    classes used B x n).

    Without ``classes``, each image's own top-``n_classes`` classes by logit (softmax ranks as the logits do);
    with ``classes`` (B x N or N, best first: the query's classes when re-ranking), the first ``n_classes`` of
    them. The CAMs are normalised per class (max 1, negatives 0) before averaging, as METHOD.md section 1.
    """
    if n_classes < 1:
        raise CamRetrievalError(f"the heatmap needs at least one class, got n_classes={n_classes}")
    if classes is None:
        classes = top_classes(class_logits(cam_activations, weight, bias), n_classes)
    else:
        classes = torch.as_tensor(classes, dtype=torch.long, device=cam_activations.device)
        if classes.dim() == 1:
            classes = classes.unsqueeze(0).expand(cam_activations.shape[0], -1)
        if classes.numel() == 0 or int(classes.min()) < 0 or int(classes.max()) >= weight.shape[0]:
            raise CamRetrievalError(f"classes must be indices of the {weight.shape[0]} classes of the classifier")
        classes = classes[:, :n_classes]
    cams = normalize_cams(class_activation_maps(cam_activations, weight, classes))
    return proposal_heatmap(cams, n=n_classes), classes
