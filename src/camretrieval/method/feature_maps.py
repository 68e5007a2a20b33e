"""The two sets of maps one forward pass gives the method (METHOD.md section 1), and their crop to a query region
(section 4). Multi-scale extraction adds the maps of the same images forwarded at smaller scales
(:attr:`FeatureMaps.other_scales`); what is stored and refined is always the first scale's.

The features X are pooled into descriptors; the CAM activations A (the maps right before global average pooling) give
the class activation maps with the classifier's weights (Eq. 1). For most backbones both are the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camretrieval.method.regions import Box, box_to_cells


@dataclass
class FeatureMaps:
    """What one forward pass gives the descriptor: features X (B x K' x H x W) and CAM activations A (B x K x h x w).

    ``other_scales``: the maps of the same images forwarded at other scales (multi-scale descriptors, pooled and
    averaged by :func:`camretrieval.method.pooling.pooled_vectors`); each one's ``input_scale`` is the factor its
    network input was resized by from this one's (a box in this input's pixels times ``input_scale`` is the box
    in that input's)."""

    features: torch.Tensor
    cam_activations: torch.Tensor
    other_scales: tuple["FeatureMaps", ...] = ()
    input_scale: float = 1.0


def crop_maps(maps: FeatureMaps, box: Box, strides: tuple[int, int]) -> FeatureMaps:
    """The maps of a query region: features and CAM activations each cropped to the cells covering ``box`` (in the
    pixels of the network's input); ``strides`` are the output strides of the feature and CAM layers."""

    def crop(tensor: torch.Tensor, stride: int, scaled: Box) -> torch.Tensor:
        col1, row1, col2, row2 = box_to_cells(scaled, stride, (tensor.shape[-1], tensor.shape[-2]))
        return tensor[..., row1:row2, col1:col2]

    def crop_scale(scale: FeatureMaps) -> FeatureMaps:
        scaled = tuple(v * scale.input_scale for v in box)
        return FeatureMaps(
            crop(scale.features, strides[0], scaled), crop(scale.cam_activations, strides[1], scaled),
            input_scale=scale.input_scale,
        )

    cropped = crop_scale(maps)
    cropped.other_scales = tuple(crop_scale(scale) for scale in maps.other_scales)
    return cropped
