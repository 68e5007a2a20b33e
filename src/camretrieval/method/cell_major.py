"""The paper's Eq. 1-4 on cell-major maps, the layout in which feature maps are stored at index time (one row of K
channels per cell; :mod:`camretrieval.storage.maps`): the class vectors of any classes for a batch of same-shape
images (online aggregation, METHOD.md section 3), and of many rectangular regions at once (re-ranking, section 5).

In this layout CAMs and class vectors are plain matrix products with the rows:

    CAMs = A (cells x K') @ W[classes].T (K' x N_c)        class vectors = CAMs.T (N_c x cells) @ X (cells x K)

and, since most values of a ReLU layer are 0 (95% for efficientnet_lite0's head), the same two products on a sparse
X (:class:`SparseCellMaps`, :func:`sparse_online_class_vectors`) read a twentieth of the values.

Every function computes exactly what :func:`camretrieval.method.pooling.class_weighted_vectors` computes on the
B x K x H x W maps of a forward pass (and the tests check it against that definition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from camretrieval.constants import DEFAULT_RERANK_CLASSES  # noqa: F401 - N_re, re-exported (defined without torch)
from camretrieval.method.cams import class_activation_maps, normalize_cams, resize_cams, scale_by_peak
from camretrieval.method.feature_maps import FeatureMaps, crop_maps
from camretrieval.method.pooling import channel_weights, channel_weights_from_fractions, class_vectors
from camretrieval.method.regions import CellBox

if TYPE_CHECKING:
    from scipy.sparse import csr_array


def cell_major_cams(cam_activations: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1 on cell-major maps: A (B x h x w x K') and W[classes] (N x K') -> raw CAMs B x N x h x w."""
    batch, height, width, channels = cam_activations.shape
    cams = cam_activations.reshape(batch, height * width, channels) @ class_weights.T
    return cams.transpose(1, 2).reshape(batch, -1, height, width)


def cell_channel_weights(cells: torch.Tensor) -> torch.Tensor:
    """CroW channel weights (Eq. 2-3) of cell-major maps B x n x K -> B x K: :func:`camretrieval.method.pooling.channel_weights`
    itself, on a B x K x n x 1 view (no copy), so that OnA uses the very definition OfA used."""
    return channel_weights(cells.transpose(1, 2).unsqueeze(-1))


def online_class_vectors(
    features: torch.Tensor,
    cam_activations: torch.Tensor,
    weight: torch.Tensor,
    classes: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """The class vectors of the given ``classes`` (N, best first) for a batch of same-shape images, from cell-major
    maps: features B x H x W x K, CAM activations B x h x w x K' (the same tensor when one layer), W: C x K'.
    ``positives`` (B x K), the stored count of positive cells per channel, saves counting them (Eq. 2).
    Returns B x N x K, each l2-normalised: Eq. 1-4 exactly as :func:`camretrieval.extraction.describer.class_weighted_vectors`
    computes them for an image's own classes."""
    batch, height, width, channels = features.shape
    cams = normalize_cams(cell_major_cams(cam_activations, weight[classes]))
    cams = resize_cams(cams, (height, width))  # only when the CAM layer has another resolution
    cells = features.reshape(batch, height * width, channels)
    if positives is None:
        weights = cell_channel_weights(cells)
    else:  # count / cells is the mean of 0/1 values channel_weights computes: the same float32 numbers
        weights = channel_weights_from_fractions(positives.to(cells.dtype) / (height * width))
    pooled = cams.reshape(batch, -1, height * width) @ cells  # Eq. 4: sum_ij X_k(i, j) CAM_c(i, j)
    return F.normalize(pooled * weights.unsqueeze(1), dim=-1)


@dataclass
class SparseCellMaps:
    """A batch of B images of one map shape H x W, stored sparse: ``channel_rows`` (SciPy CSR, float32, B*K x B*n with
    n = H*W) is block-diagonal, its block b the transpose X_b^T of image b's cell-major maps (row b*K + k: channel k
    of image b over that image's n cells); ``positives`` (B x K): Eq. 2's counts of positive cells per channel."""

    channel_rows: "csr_array"
    height: int
    width: int
    positives: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.positives.shape[0])

    @property
    def channels(self) -> int:
        return int(self.positives.shape[1])


def sparse_online_class_vectors(maps: SparseCellMaps, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """:func:`online_class_vectors` on sparse maps whose CAM layer is the feature layer (A = X), on the CPU: the same
    Eq. 1-4, with the two products reading only the non-zero values. Returns B x N x K, each l2-normalised."""
    batch, channels, cells = maps.batch, maps.channels, maps.height * maps.width
    class_weights = weight[classes].detach().float().cpu().numpy()  # N x K
    # Eq. 1 for every cell of every image at once: X_stack (B*n x B*K, block-diagonal) @ [W_c^T; ...; W_c^T].
    raw = maps.channel_rows.T @ np.tile(class_weights.T, (batch, 1))  # B*n x N
    raw = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32)).reshape(batch, cells, -1).transpose(1, 2)
    cams = normalize_cams(raw.reshape(batch, -1, maps.height, maps.width))
    # Eq. 4: sum_ij X_k(i, j) CAM_c(i, j), as X^T (block-diagonal) @ the CAMs of every cell.
    stacked = cams.reshape(batch, -1, cells).transpose(1, 2).reshape(batch * cells, -1).contiguous().numpy()
    pooled = torch.from_numpy(np.asarray(maps.channel_rows @ stacked, dtype=np.float32))
    pooled = pooled.reshape(batch, channels, -1).transpose(1, 2)  # B x N x K
    weights = channel_weights_from_fractions(maps.positives.to(torch.float32) / cells)
    return F.normalize(pooled * weights.unsqueeze(1), dim=-1)


def region_masks(boxes: Sequence[Sequence[CellBox]], height: int, width: int) -> torch.Tensor:
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
    cams = scale_by_peak(raw, peak) * inside  # B x R x N x n: normalised with the region's peak, 0 outside it
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
    (:func:`camretrieval.extraction.describer.crop_maps`): for a CAM layer with another grid than the features, and as the
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
