"""Query boxes through the resize, on the true sizes of the Oxford images."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from camretrieval import load_backbone
from camretrieval.extraction.images import resized_size
from camretrieval.extraction.settings import DEFAULT_SIZE
from camretrieval.method.feature_maps import FeatureMaps, crop_maps
from camretrieval.method.regions import BoxError, box_to_cells, parse_box, scale_box, validate_box


def real_sizes(gnd_dir: Path) -> list[tuple[int, int]]:
    """(width, height) of every ROxford5k/RParis6k image (database images, and the query crops)."""
    sizes = []
    for sizes_file in sorted(gnd_dir.glob("r*_sizes_*.txt")):
        sizes += [tuple(int(v) for v in line.split(",")[2:4]) for line in sizes_file.read_text().splitlines()]
    return sizes


@pytest.mark.parametrize("size", [DEFAULT_SIZE, 720])
def test_resized_size_is_what_the_resize_produces_for_every_real_size(gnd_dir, size):
    distinct = sorted(set(real_sizes(gnd_dir)))
    assert len(distinct) > 100
    for width, height in distinct:
        resized = TF.resize(Image.new("L", (width, height)), [size], antialias=True)
        assert resized.size == resized_size(width, height, size)
        assert min(resized.size) == size


@pytest.mark.parametrize("size", [DEFAULT_SIZE, 720])
def test_boxes_map_through_the_resize_on_every_real_size(gnd_dir, size):
    sizes = real_sizes(gnd_dir)
    assert len(sizes) > 11000
    rng = random.Random(size)
    naive_differs = 0
    for width, height in sizes:
        x1, y1 = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
        box = validate_box((x1, y1, rng.uniform(x1 + 1, width), rng.uniform(y1 + 1, height)), width, height)
        new_w, new_h = resized_size(width, height, size)
        scaled = scale_box(box, (width, height), (new_w, new_h))
        assert scaled == pytest.approx(
            (box[0] * new_w / width, box[1] * new_h / height, box[2] * new_w / width, box[3] * new_h / height)
        )
        stride = 32
        grid = (math.ceil(new_w / stride), math.ceil(new_h / stride))  # SAME padding: the EfficientNet-Lite grid
        col1, row1, col2, row2 = box_to_cells(scaled, stride, grid)
        # The cells cover the box and are the fewest that do.
        sx1, sy1, sx2, sy2 = scaled
        assert col1 * stride <= sx1 < (col1 + 1) * stride and (col2 - 1) * stride < sx2 <= col2 * stride
        assert row1 * stride <= sy1 < (row1 + 1) * stride and (row2 - 1) * stride < sy2 <= row2 * stride
        assert col2 <= grid[0] and row2 <= grid[1]
        # The whole image maps onto the whole feature map.
        assert box_to_cells(scale_box((0, 0, width, height), (width, height), (new_w, new_h)), stride, grid) == (
            0, 0, *grid
        )
        naive_differs += box_to_cells(box, stride, grid) != (col1, row1, col2, row2)  # the original code's mapping
    # Most images are ~1024 px and resized to `size`: ignoring the resize crops other cells for almost all boxes.
    assert naive_differs > 0.9 * len(sizes)


def test_feature_grid_of_real_network_matches_stride(gnd_dir):
    backbone = load_backbone("efficientnet_lite0", pretrained=False)
    for width, height in real_sizes(gnd_dir)[:3]:
        new_w, new_h = resized_size(width, height, 256)
        with torch.inference_mode():
            maps = backbone(torch.zeros(1, 3, new_h, new_w))
        assert maps.features.shape[-2:] == (math.ceil(new_h / 32), math.ceil(new_w / 32))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "densenet161", "vgg16_cam"])
def test_declared_layer_strides_match_the_network(name):
    backbone = load_backbone(name, pretrained=False)
    for layer, stride in backbone.layer_strides.items():
        backbone.feature_layer = layer
        with torch.inference_mode():
            maps = backbone(torch.zeros(1, 3, 128, 192))
        assert maps.features.shape[-2:] == (128 // stride, 192 // stride), layer


def test_crop_maps_takes_the_cells_of_each_layer():
    features = torch.arange(2 * 8 * 8.0).reshape(1, 2, 8, 8)  # stride 16
    activations = torch.arange(3 * 4 * 4.0).reshape(1, 3, 4, 4)  # stride 32
    cropped = crop_maps(FeatureMaps(features, activations), (40, 0, 70, 33), (16, 32))
    assert torch.equal(cropped.features, features[..., 0:3, 2:5])
    assert torch.equal(cropped.cam_activations, activations[..., 0:2, 1:3])


def test_tiny_box_keeps_one_cell_and_edges_clamp():
    assert box_to_cells((33.0, 33.0, 34.0, 34.0), 32, (4, 4)) == (1, 1, 2, 2)
    assert box_to_cells((0.0, 0.0, 128.0, 128.0), 32, (4, 4)) == (0, 0, 4, 4)
    assert box_to_cells((127.0, 127.0, 128.0, 128.0), 32, (4, 4)) == (3, 3, 4, 4)


def test_bad_boxes_are_clear_errors():
    with pytest.raises(BoxError, match="empty"):
        validate_box((10, 10, 10, 50), 100, 100)
    with pytest.raises(BoxError, match="empty"):
        validate_box((50, 10, 20, 50), 100, 100)
    with pytest.raises(BoxError, match="outside"):
        validate_box((120, 10, 150, 50), 100, 100)
    with pytest.raises(BoxError, match="outside"):
        validate_box((-50, -50, -1, -1), 100, 100)
    with pytest.raises(BoxError, match="four numbers"):
        parse_box("1,2,3")
    with pytest.raises(BoxError, match="four numbers"):
        parse_box("a,b,c,d")
    assert validate_box((-5, 10, 120, 50), 100, 100) == (0, 10, 100, 50)  # over the border: clipped
    assert parse_box("1, 2 ,3,4.5") == (1, 2, 3, 4.5)
