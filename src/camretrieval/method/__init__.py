"""The paper's maths, as pure functions on batches of tensors (no files, no models, no images).

- :mod:`~camretrieval.method.cams`: Eq. 1, class activation maps, top classes, their normalisation;
- :mod:`~camretrieval.method.pooling`: Eq. 2-4, CroW channel weights and class-weighted sum pooling, and the
  baselines of the paper's tables (sum, CroW, MAC, GeM, R-MAC) under the names of :data:`POOLINGS`;
- :mod:`~camretrieval.method.cell_major`: Eq. 1-4 on maps stored cell-major (online aggregation, region re-ranking);
- :mod:`~camretrieval.method.aggregation`: section 3, ``D_I = l2(sum_c l2(PCAw(f^c)))``;
- :mod:`~camretrieval.method.whitening`: PCA-whitening as a fit/transform estimator;
- :mod:`~camretrieval.method.regions`: section 4's query boxes on feature cells, section 5's CAM region proposals;
- :mod:`~camretrieval.method.feature_maps`: the maps of one forward pass, cropped to a query region;
- :mod:`~camretrieval.method.class_list`: section 4.3's fixed list of classes.
"""

from camretrieval.method.aggregation import aggregate
from camretrieval.method.cams import class_activation_maps, class_logits, normalize_cams, top_classes
from camretrieval.method.class_list import ClassList
from camretrieval.method.feature_maps import FeatureMaps, crop_maps
from camretrieval.method.pooling import (
    POOLINGS,
    PooledVectors,
    channel_weights,
    class_vectors,
    class_weighted_vectors,
    pooled_vectors,
)
from camretrieval.method.regions import Box, parse_box, region_proposals
from camretrieval.method.whitening import PCAWhitening

__all__ = [
    "Box",
    "ClassList",
    "FeatureMaps",
    "PCAWhitening",
    "POOLINGS",
    "PooledVectors",
    "aggregate",
    "channel_weights",
    "class_activation_maps",
    "class_logits",
    "class_vectors",
    "class_weighted_vectors",
    "crop_maps",
    "normalize_cams",
    "parse_box",
    "pooled_vectors",
    "region_proposals",
    "top_classes",
]
