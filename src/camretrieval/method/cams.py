"""Class Activation Maps (METHOD.md section 1, Eq. 1).

With a GAP + linear head, the logit of class c is ``sum_k W[c, k] mean_ij A_k(i, j) + b_c``; moving the mean out
of the sum gives the CAM of class c, ``CAM_c(i, j) = sum_k W[c, k] A_k(i, j)`` (no bias), whose spatial mean is
the logit without its bias. All functions work on batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from camretrieval.errors import CamRetrievalError


def class_logits(cam_activations: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The classifier's logits from the CAM activations A (B x K x h x w): ``W @ GAP(A) + b`` -> B x C."""
    return F.linear(cam_activations.mean(dim=(2, 3)), weight, bias)


def top_classes(logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Indices of the top-``n_classes`` predicted classes, best first (B x N_c).

    The paper ranks classes by softmax score; softmax is monotonic, so ranking the logits is the same.
    """
    n_classes = min(n_classes, logits.shape[1])
    return logits.topk(n_classes, dim=1, sorted=True).indices


def class_activation_maps(cam_activations: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Eq. 1: ``CAM_c(i, j) = sum_k W[c, k] A_k(i, j)`` for the given classes of each image.

    cam_activations: B x K x h x w; weight: C x K; classes: B x N_c class indices. Returns B x N_c x h x w.
    """
    return torch.einsum("bnk,bkhw->bnhw", weight[classes], cam_activations)


def normalize_cams(cams: torch.Tensor) -> torch.Tensor:
    """Scale each map by its maximum and set negative values to 0, so CAMs lie in [0, 1] (the original code)."""
    return scale_by_peak(cams, cams.amax(dim=(2, 3), keepdim=True))


def scale_by_peak(cams: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """CAM normalisation with a given maximum ``peak`` (broadcast against ``cams``): ``max(CAM / peak, 0)``.

    :func:`normalize_cams` takes each whole map's maximum; re-ranking takes each region's. A map whose maximum is not
    positive has no region of evidence for its class and becomes all zeros (dividing by a negative maximum would
    instead turn the least likely places into the most likely).
    """
    scaled = cams / torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.where(peak > 0, scaled.clamp(min=0), torch.zeros_like(scaled))


def check_class_indices(
    classes: torch.Tensor | Sequence[int],
    n_classes_total: int | None = None,
    error: type[CamRetrievalError] = CamRetrievalError,
    unique: bool = True,
) -> torch.Tensor:
    """Classes to compute CAMs of, checked: at least one, none twice (``unique``), indices in 0..C-1 (C, when known:
    the classifier's classes). Returns them as a flat long tensor; raises ``error`` naming the problem."""
    indices = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if indices.numel() == 0:
        raise error("the class list is empty")
    if unique and indices.unique().numel() != indices.numel():
        raise error("the class list names a class twice")
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or (n_classes_total is not None and high >= n_classes_total):
        limit = f"0..{n_classes_total - 1}" if n_classes_total is not None else "non-negative"
        raise error(f"class indices must be {limit} (the classifier's classes); the list has {low}..{high}")
    return indices


def resize_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CAMs resized (bilinearly) to the feature maps' resolution when the two layers differ."""
    if tuple(cams.shape[-2:]) == tuple(size):
        return cams
    return F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
