"""Aggregation of class vectors into one descriptor D_I (METHOD.md section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from camretrieval.method.whitening import PCAWhitening


def aggregate(class_vectors: torch.Tensor, whitening: PCAWhitening | None) -> torch.Tensor:
    """``D_I = l2( sum_c l2( PCAw(f^c) ) )`` over the N_c class vectors of each image.

    class_vectors: B x N_c x K (each already l2-normalised, Eq. 4). Returns B x dim. With each image's own top
    classes this is offline aggregation (OfA); with the query's classes, online aggregation (OnA). Without a
    whitening (the "raw" rows of the paper's Table 1a), ``l2( sum_c f^c )``. The same sum aggregates R-MAC regions.
    """
    if whitening is None:
        return F.normalize(class_vectors.sum(dim=1), dim=-1)
    whitened = F.normalize(whitening.transform(class_vectors), dim=-1)
    return F.normalize(whitened.sum(dim=1), dim=-1)
