"""The two sets of maps one forward pass gives the method (METHOD.md section 1), and their crop to a query region
(section 4).

The features X are pooled into descriptors; the CAM activations A (the maps right before global average pooling) give
the class activation maps with the classifier's weights (Eq. 1). For most backbones both are the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from camretrieval.method.regions import Box, box_to_cells


@dataclass
class FeatureMaps:
    """What one forward pass gives the descriptor: features X (B x K' x H x W) and CAM activations A (B x K x h x w)."""

    features: torch.Tensor
    cam_activations: torch.Tensor


def crop_maps(maps: FeatureMaps, box: Box, strides: tuple[int, int]) -> FeatureMaps:
    """The maps of a query region: features and CAM activations each cropped to the cells covering ``box`` (in the
    pixels of the network's input); ``strides`` are the output strides of the feature and CAM layers."""

    def crop(tensor: torch.Tensor, stride: int) -> torch.Tensor:
        col1, row1, col2, row2 = box_to_cells(box, stride, (tensor.shape[-1], tensor.shape[-2]))
        return tensor[..., row1:row2, col1:col2]

    return FeatureMaps(crop(maps.features, strides[0]), crop(maps.cam_activations, strides[1]))
