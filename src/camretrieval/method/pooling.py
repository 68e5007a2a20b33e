"""Pooling of convolutional features: the class-weighted sum pooling of the paper (METHOD.md section 2, Eq. 2-4)
and the baselines it is compared with (section 8).

:func:`class_weighted_vectors` composes sections 1-2 on a batch of feature maps (top-N_c classes, their CAMs, Eq. 2-4);
:func:`pooled_vectors` puts the baselines beside it under the names of :data:`POOLINGS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from camretrieval.constants import POOLINGS  # the names and descriptions, importable without torch
from camretrieval.errors import CamRetrievalError
from camretrieval.method.cams import class_activation_maps, class_logits, normalize_cams, resize_cams, top_classes
from camretrieval.method.feature_maps import FeatureMaps


def channel_weights(features: torch.Tensor) -> torch.Tensor:
    """CroW channel weights of each image (Eq. 2-3). features: B x K x H x W -> B x K.

    ``Q_k`` is the fraction of positive entries of channel k (Eq. 2), then :func:`channel_weights_from_fractions`.
    """
    return channel_weights_from_fractions((features > 0).to(features.dtype).mean(dim=(2, 3)))


def channel_weights_from_fractions(fractions: torch.Tensor) -> torch.Tensor:
    """Eq. 3 from the fractions of positive entries Q_k (Eq. 2), ... x K -> ... x K: ``CW_k = log(sum_n Q_n / Q_k)``,
    and 0 for a channel with no positive entry. Stored maps keep the counts of Eq. 2, and re-ranking computes Q of
    many regions at once, so Eq. 3 stands on its own."""
    total = fractions.sum(dim=-1, keepdim=True)
    active = fractions > 0
    ratio = total / torch.where(active, fractions, torch.ones_like(fractions))
    return torch.where(active, torch.log(ratio), torch.zeros_like(fractions))


def weighted_sum_pooling(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_ij X_k(i, j) * M_n(i, j)`` for every map M_n. features: B x K x H x W; weights: B x N x H x W -> B x N x K."""
    return torch.einsum("bkhw,bnhw->bnk", features, weights)


def class_vectors(features: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    """Eq. 4, l2-normalised: ``f^c_k = CW_k * sum_ij X_k(i, j) CAM_c(i, j)``.

    features: B x K x H x W; cams: B x N_c x H x W (normalised, at the features' resolution). Returns B x N_c x K.
    """
    pooled = weighted_sum_pooling(features, cams) * channel_weights(features).unsqueeze(1)
    return F.normalize(pooled, dim=-1)


# --- Baselines of the paper's Tables 1 and 2 (METHOD.md section 8), on the same feature maps. ---
# Each takes B x K x H x W and returns unnormalised B x K (or B x R x K for regions); callers l2-normalise.


def sum_pooling(features: torch.Tensor) -> torch.Tensor:
    """SPoC without centre prior (the paper's "raw" features): ``sum_ij X_k(i, j)``."""
    return features.sum(dim=(2, 3))


def spatial_weights(features: torch.Tensor) -> torch.Tensor:
    """CroW spatial weights ``S = (sum_k X_k / ||sum_k X_k||_2)^(1/2)``. B x K x H x W -> B x H x W."""
    aggregated = features.sum(dim=1)
    norm = aggregated.flatten(1).norm(dim=1).clamp_min(1e-12)
    return (aggregated / norm[:, None, None]).clamp_min(0).sqrt()


def crow_pooling(features: torch.Tensor) -> torch.Tensor:
    """CroW: spatially weighted sum pooling times the channel weights (Eq. 3)."""
    pooled = torch.einsum("bkhw,bhw->bk", features, spatial_weights(features))
    return pooled * channel_weights(features)


def max_pooling(features: torch.Tensor) -> torch.Tensor:
    """MAC: ``max_ij X_k(i, j)``."""
    return features.amax(dim=(2, 3))


def gem_pooling(features: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM: ``(mean_ij X_k(i, j)^p)^(1/p)``; activations clamped at ``eps`` so that the root is defined."""
    return features.clamp_min(eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """The R-MAC grid (Tolias et al. 2016) on an H x W map, as (y1, x1, y2, x2) cells, end exclusive.

    Level l has square regions of side ``2 min(H, W) / (l + 1)``: l regions along the shorter side and
    ``l + extra`` along the longer one, ``extra`` chosen so that neighbours at level 1 overlap closest to
    ``overlap``; regions are spread evenly from edge to edge.
    """
    short, long = min(height, width), max(height, width)
    extra = 0
    if long > short:
        # For n = 1..6 extra regions along the long side, the overlap of neighbours of side `short`.
        steps = torch.arange(1, 7, dtype=torch.float64)
        step = (long - short) / steps
        extra = int(torch.argmin(((short - step) / short - overlap).abs())) + 1
    regions = []
    for level in range(1, levels + 1):
        side = max(1, math.floor(2 * short / (level + 1)))
        count_y = level + (extra if height > width else 0)
        count_x = level + (extra if width > height else 0)
        starts_y = _even_starts(height, side, count_y)
        starts_x = _even_starts(width, side, count_x)
        regions += [(y, x, y + side, x + side) for y in starts_y for x in starts_x]
    return list(dict.fromkeys(regions))  # a small map can repeat regions; each counts once


def _even_starts(length: int, side: int, count: int) -> list[int]:
    if count == 1 or length == side:
        return [(length - side) // 2]
    return [math.floor(i * (length - side) / (count - 1)) for i in range(count)]


def regional_max_pooling(features: torch.Tensor, levels: int = 3) -> torch.Tensor:
    """MAC of every R-MAC region: B x K x H x W -> B x R x K. The regions' whitening, l2 and sum come after."""
    regions = rmac_regions(features.shape[2], features.shape[3], levels)
    return torch.stack([features[:, :, y1:y2, x1:x2].amax(dim=(2, 3)) for y1, x1, y2, x2 in regions], dim=1)


# --- The vectors each pooling aggregates into D_I ---


@dataclass
class PooledVectors:
    """The vectors a batch of images is aggregated from (B x N x K, each l2-normalised): the class vectors f^c of
    the top N = N_c classes (pooling "cam", ``classes`` B x N_c), or for a baseline one vector per image or per
    R-MAC region (``classes`` None)."""

    vectors: torch.Tensor
    classes: torch.Tensor | None = None


def class_weighted_vectors(
    maps: FeatureMaps,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_classes: int,
    class_list: torch.Tensor | Sequence[int] | None = None,
    classes: torch.Tensor | None = None,
) -> PooledVectors:
    """METHOD.md sections 1-2 on a batch: top-N_c classes, their CAMs (Eq. 1, normalised), and Eq. 2-4. With a
    ``class_list`` (section 4.3, :mod:`camretrieval.method.class_list`), every image's classes are that list's first
    ``n_classes`` instead of its own top classes; ``classes`` (B x N) gives each image's classes outright."""
    if classes is None:
        classes = _chosen_classes(class_logits(maps.cam_activations, weight, bias), n_classes, class_list)
    cams = normalize_cams(class_activation_maps(maps.cam_activations, weight, classes))
    cams = resize_cams(cams, tuple(maps.features.shape[-2:]))
    return PooledVectors(class_vectors(maps.features, cams), classes)


def _chosen_classes(
    logits: torch.Tensor, n_classes: int, class_list: torch.Tensor | Sequence[int] | None
) -> torch.Tensor:
    """Each image's top-``n_classes`` classes by ``logits`` (B x C), or the class list's first ``n_classes``."""
    if class_list is None:
        return top_classes(logits, n_classes)
    listed = torch.as_tensor(class_list, dtype=torch.long, device=logits.device)[:n_classes]
    return listed.expand(logits.shape[0], -1)


_BASELINES = {"sum": sum_pooling, "sum-cw": lambda x: sum_pooling(x) * channel_weights(x), "crow": crow_pooling,
              "mac": max_pooling, "gem": gem_pooling}


def pooled_vectors(
    maps: FeatureMaps,
    pooling: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_classes: int,
    class_list: torch.Tensor | Sequence[int] | None = None,
) -> PooledVectors:
    """The vectors of ``pooling`` (see :data:`POOLINGS`) on a batch of maps; ``n_classes`` and ``class_list`` only
    matter for "cam". Maps with :attr:`~FeatureMaps.other_scales` give multi-scale vectors
    (:func:`multiscale_vectors`)."""
    if maps.other_scales:
        return multiscale_vectors(maps, pooling, weight, bias, n_classes, class_list)
    if pooling == "cam":
        return class_weighted_vectors(maps, weight, bias, n_classes, class_list)
    if pooling == "rmac":
        return PooledVectors(F.normalize(regional_max_pooling(maps.features), dim=-1))
    if pooling not in _BASELINES:
        raise CamRetrievalError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    return PooledVectors(F.normalize(_BASELINES[pooling](maps.features), dim=-1).unsqueeze(1))


def multiscale_vectors(
    maps: FeatureMaps,
    pooling: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_classes: int,
    class_list: torch.Tensor | Sequence[int] | None = None,
) -> PooledVectors:
    """Multi-scale vectors, as cirtorch pools them (the mean of the l2-normalised vectors of each scale, l2-normalised
    again), from ``maps`` and its :attr:`~FeatureMaps.other_scales`:

    - "cam": each image's top-N_c classes by its logits averaged over the scales (the same classes at every scale),
      then each class's vector f^c (Eq. 2-4) averaged over the scales: still one vector per class, so N_c,
      PCA-whitening and aggregation (section 3) apply unchanged;
    - "rmac": the regions of every scale together (R-MAC sums its regions anyway);
    - the other baselines: one vector per image, averaged over the scales.
    """
    scales = [FeatureMaps(scale.features, scale.cam_activations) for scale in (maps, *maps.other_scales)]
    if pooling == "cam":
        logits = torch.stack([class_logits(scale.cam_activations, weight, bias) for scale in scales]).mean(dim=0)
        classes = _chosen_classes(logits, n_classes, class_list)
        vectors = [class_weighted_vectors(scale, weight, bias, n_classes, classes=classes).vectors for scale in scales]
        return PooledVectors(F.normalize(torch.stack(vectors).mean(dim=0), dim=-1), classes)
    vectors = [pooled_vectors(scale, pooling, weight, bias, n_classes, class_list).vectors for scale in scales]
    if pooling == "rmac":
        return PooledVectors(torch.cat(vectors, dim=1))
    return PooledVectors(F.normalize(torch.stack(vectors).mean(dim=0), dim=-1))
