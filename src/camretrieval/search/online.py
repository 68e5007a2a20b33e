"""Online aggregation (OnA, METHOD.md section 3) from the maps stored at index time.

OnA describes every database image with the QUERY's top-N_c classes instead of its own: for each image, the CAMs of
those classes (Eq. 1, normalised: max 1, negatives 0), the class vectors ``f^c = l2(CW * sum_ij X CAM_c)`` (Eq. 2-4),
each PCA-whitened and l2-normalised, summed, l2-normalised; then the cosine similarity with the query's descriptor
(aggregated from its own top-N_c classes, which are these). The paper's way needed the class vectors of all 1000
classes stored per image; here the maps X (and A) are stored once (:mod:`camretrieval.storage.maps`) and any class's
vectors are two matrix products away (:func:`camretrieval.method.cell_major.online_class_vectors`).

Images with the same map shape are computed together (batched matrix products, no padding, so neither the CroW
weights nor the maximum of a CAM can see a cell that is not the image's). On the CPU, when the CAM layer is the
feature layer, the maps are read sparse (:func:`camretrieval.method.cell_major.sparse_online_class_vectors`): the
zeros of a ReLU layer (95% of the values) are never written out nor multiplied, which makes OnA over 1000 images
about twice as fast (``benchmarks/refinement_scale.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from camretrieval.method.aggregation import aggregate
from camretrieval.method.cams import check_class_indices
from camretrieval.method.cell_major import online_class_vectors, sparse_online_class_vectors
from camretrieval.method.whitening import PCAWhitening
from camretrieval.storage.maps import MapStore

# Images computed together. Small enough that their float32 maps (16 x 266 cells x 1280 channels = 22 MB at 448 px)
# stay in the processor's cache between the float16 conversion and the two matrix products that read them.
DEFAULT_BATCH = 16
# Read sparse, 64 images' non-zero values take about 4 MB.
SPARSE_BATCH = 64


@torch.inference_mode()
def online_descriptors(
    store: MapStore,
    images: Sequence[int] | np.ndarray,
    classes: torch.Tensor | Sequence[int],
    weight: torch.Tensor,
    whitening: PCAWhitening | None,
    batch_size: int | None = None,
) -> np.ndarray:
    """OnA descriptors D_I of the stored ``images`` (database indices) for the query's ``classes``: len(images) x dim
    float32, l2-normalised, in the order of ``images``. The database itself is only read. ``batch_size``: images
    computed together (default :data:`SPARSE_BATCH` read sparse, :data:`DEFAULT_BATCH` dense)."""
    images = np.asarray(images, dtype=np.int64)
    classes = check_class_indices(classes, weight.shape[0]).to(weight.device)
    if store.sparse_readable and weight.device.type == "cpu":
        batches = (
            (batch_images, sparse_online_class_vectors(maps, weight, classes))
            for batch_images, maps in store.sparse_batches(images, batch_size or SPARSE_BATCH)
        )
    else:
        batches = (
            (batch.images, online_class_vectors(batch.features, batch.cam_activations, weight, classes, batch.positives))
            for batch in store.batches(images, batch_size or DEFAULT_BATCH, weight.device)  # the next batch decodes meanwhile
        )
    out: np.ndarray | None = None
    position = {int(image): i for i, image in enumerate(images)}
    for batch_images, vectors in batches:
        descriptors = aggregate(vectors, whitening)
        if out is None:
            out = np.empty((len(images), descriptors.shape[1]), dtype=np.float32)
        out[[position[int(i)] for i in batch_images]] = descriptors.float().cpu().numpy()
    if out is None:
        dim = whitening.dim_ if whitening is not None else store.features.channels
        return np.zeros((0, dim), dtype=np.float32)
    return out
