"""Channel weighting and class-weighted sum pooling (METHOD.md section 2, Eq. 2-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_weights(features: torch.Tensor) -> torch.Tensor:
    """CroW channel weights of each image (Eq. 2-3). features: B x K x H x W -> B x K.

    ``Q_k`` is the fraction of positive entries of channel k (Eq. 2); ``CW_k = log(sum_n Q_n / Q_k)``, and 0 for
    a channel with no positive entry (Eq. 3).
    """
    nonzero_fraction = (features > 0).to(features.dtype).mean(dim=(2, 3))
    total = nonzero_fraction.sum(dim=1, keepdim=True)
    active = nonzero_fraction > 0
    ratio = total / torch.where(active, nonzero_fraction, torch.ones_like(nonzero_fraction))
    return torch.where(active, torch.log(ratio), torch.zeros_like(nonzero_fraction))


def weighted_sum_pooling(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_ij X_k(i, j) * M_n(i, j)`` for every map M_n. features: B x K x H x W; weights: B x N x H x W -> B x N x K."""
    return torch.einsum("bkhw,bnhw->bnk", features, weights)


def class_vectors(features: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """Eq. 4, l2-normalised: ``f^c_k = CW_k * sum_ij X_k(i, j) CAM_c(i, j)``.

    features: B x K x H x W; cams: B x N_c x H x W (normalised, at the features' resolution). Returns B x N_c x K.
    """
    pooled = weighted_sum_pooling(features, cams) * channel_weights(features).unsqueeze(1)
    return F.normalize(pooled, dim=-1)
