"""Online aggregation (OnA, METHOD.md section 3) from the maps stored at index time.

OnA describes every database image with the QUERY's top-N_c classes instead of its own: for each image, the CAMs of
those classes (Eq. 1, normalised: max 1, negatives 0), the class vectors ``f^c = l2(CW * sum_ij X CAM_c)`` (Eq. 2-4),
each PCA-whitened and l2-normalised, summed, l2-normalised; then the cosine similarity with the query's descriptor
(aggregated from its own top-N_c classes, which are these). The paper's way needed the class vectors of all 1000
classes stored per image; here the maps X (and A) are stored once (:mod:`camretrieval.mapstore`) and any class's
vectors are two matrix products away:

    CAMs = A (cells x K') @ W[classes].T (K' x N_c)        class vectors = CAMs.T (N_c x cells) @ X (cells x K)

Images with the same map shape are computed together (batched matrix products, no padding, so neither the CroW
weights nor the maximum of a CAM can see a cell that is not the image's).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .aggregation import aggregate
from .cams import normalize_cams, resize_cams
from .errors import CamRetrievalError
from .mapstore import MapStore
from .pooling import channel_weights
from .whitening import PCAWhitening

# Images computed together. Small enough that their float32 maps (16 x 266 cells x 1280 channels = 22 MB at 448 px)
# stay in the processor's cache between the float16 conversion and the two matrix products that read them.
DEFAULT_BATCH = 16


def cell_major_cams(cam_activations: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Eq. 1 on cell-major maps: A (B x h x w x K') and W[classes] (N x K') -> raw CAMs B x N x h x w."""
    batch, height, width, channels = cam_activations.shape
    cams = cam_activations.reshape(batch, height * width, channels) @ class_weights.T
    return cams.transpose(1, 2).reshape(batch, -1, height, width)


def cell_channel_weights(cells: torch.Tensor) -> torch.Tensor:
    """CroW channel weights (Eq. 2-3) of cell-major maps B x n x K -> B x K: :func:`camretrieval.pooling.channel_weights`
    itself, on a B x K x n x 1 view (no copy), so that OnA uses the very definition OfA used."""
    return channel_weights(cells.transpose(1, 2).unsqueeze(-1))


def channel_weights_from_fractions(fractions: torch.Tensor) -> torch.Tensor:
    """Eq. 3 from the fractions of positive entries Q_k (Eq. 2), ... x K -> ... x K: ``log(sum_n Q_n / Q_k)``, 0
    where Q_k = 0. The same expression as :func:`camretrieval.pooling.channel_weights` (re-ranking computes Q of many
    regions at once with a matrix product, so it needs Eq. 3 on its own)."""
    total = fractions.sum(dim=-1, keepdim=True)
    active = fractions > 0
    ratio = total / torch.where(active, fractions, torch.ones_like(fractions))
    return torch.where(active, torch.log(ratio), torch.zeros_like(fractions))


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
    Returns B x N x K, each l2-normalised: Eq. 1-4 exactly as :func:`camretrieval.descriptor.class_weighted_vectors`
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


def check_classes(classes: torch.Tensor | Sequence[int], n_classes_total: int) -> torch.Tensor:
    classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if classes.numel() == 0:
        raise CamRetrievalError("online aggregation needs at least one class")
    if int(classes.min()) < 0 or int(classes.max()) >= n_classes_total:
        raise CamRetrievalError(f"classes must be indices of the classifier's {n_classes_total} classes")
    return classes


@torch.inference_mode()
def online_descriptors(
    store: MapStore,
    images: Sequence[int] | np.ndarray,
    classes: torch.Tensor | Sequence[int],
    weight: torch.Tensor,
    whitening: PCAWhitening | None,
    batch_size: int = DEFAULT_BATCH,
) -> np.ndarray:
    """OnA descriptors D_I of the stored ``images`` (database indices) for the query's ``classes``: len(images) x dim
    float32, l2-normalised, in the order of ``images``. The database itself is only read."""
    images = np.asarray(images, dtype=np.int64)
    classes = check_classes(classes, weight.shape[0]).to(weight.device)
    out: np.ndarray | None = None
    position = {int(image): i for i, image in enumerate(images)}
    for group in store.shape_groups(images, batch_size):
        features, activations = store.load(group, weight.device)
        positives = torch.from_numpy(store.features.positives[group]).to(weight.device)
        descriptors = aggregate(online_class_vectors(features, activations, weight, classes, positives), whitening)
        if out is None:
            out = np.empty((len(images), descriptors.shape[1]), dtype=np.float32)
        out[[position[int(i)] for i in group]] = descriptors.float().cpu().numpy()
    if out is None:
        dim = whitening.dim if whitening is not None else store.features.channels
        return np.zeros((0, dim), dtype=np.float32)
    return out
