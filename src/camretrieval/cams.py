"""Class Activation Maps (METHOD.md section 1, Eq. 1).

With a GAP + linear head, the logit of class c is ``sum_k W[c, k] mean_ij A_k(i, j) + b_c``; moving the mean out
of the sum gives the CAM of class c, ``CAM_c(i, j) = sum_k W[c, k] A_k(i, j)`` (no bias), whose spatial mean is
the logit without its bias. All functions work on batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """Scale each map by its maximum and set negative values to 0, so CAMs lie in [0, 1] (the original code).

    A map whose maximum is not positive has no region of evidence for its class; it becomes all zeros (dividing by
    a negative maximum would instead turn the least likely places into the most likely).
    """
    peak = cams.amax(dim=(2, 3), keepdim=True)
    scaled = cams / torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.where(peak > 0, scaled.clamp(min=0), torch.zeros_like(cams))


def resize_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """CAMs resized (bilinearly) to the feature maps' resolution when the two layers differ."""
    if tuple(cams.shape[-2:]) == tuple(size):
        return cams
    return F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
