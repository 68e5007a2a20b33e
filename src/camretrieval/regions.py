"""Query regions: boxes in original image pixels, mapped onto feature maps (METHOD.md section 4).

A box ``(x1, y1, x2, y2)`` is given in the pixels of the original image (after EXIF orientation), x to the right and
y down, as Oxford/Paris annotate their queries. The image is resized before the forward pass, so the box is first
scaled into the resized image, then divided by the layer's stride: the original code divided original-pixel boxes
by the stride, forgetting the resize (about 6% off on Oxford).
"""

from __future__ import annotations

import math

from .errors import CamRetrievalError

Box = tuple[float, float, float, float]


class BoxError(CamRetrievalError):
    """A query box that is malformed, empty, or outside its image."""


def parse_box(text: str) -> Box:
    """``"x1,y1,x2,y2"`` (commas or spaces) -> a box of floats."""
    parts = text.replace(",", " ").split()
    try:
        values = tuple(float(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise BoxError(f"a box is four numbers x1,y1,x2,y2 in the image's pixels; got {text!r}")
    return values  # type: ignore[return-value]


def validate_box(box: Box, width: int, height: int) -> Box:
    """Check a box against its image (width x height): empty or fully outside is an error; a box that goes over
    the border is clipped to the image."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box):
        raise BoxError(f"box {box} has a non-finite coordinate")
    if x2 <= x1 or y2 <= y1:
        raise BoxError(f"box {box} is empty: it needs x1 < x2 and y1 < y2 (pixels, x1,y1 top-left)")
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        raise BoxError(f"box {box} lies outside the {width}x{height} image")
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """A box in an image of ``from_size`` (width, height) expressed in the same image resized to ``to_size``."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    x1, y1, x2, y2 = box
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def box_to_cells(box: Box, stride: int, grid_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The feature cells ``(col1, row1, col2, row2)`` (end-exclusive slices) that cover a box.

    ``box`` is in the pixels of the image the network saw (the resized one); a cell (i, j) of a layer of output
    stride s covers pixels ``[s*i, s*(i+1)) x [s*j, s*(j+1))``. Every cell the box touches is kept, at least one,
    within the ``grid_size`` (width, height) of the feature map.
    """
    x1, y1, x2, y2 = box
    grid_w, grid_h = grid_size
    col1 = min(max(math.floor(x1 / stride), 0), grid_w - 1)
    row1 = min(max(math.floor(y1 / stride), 0), grid_h - 1)
    col2 = max(min(math.ceil(x2 / stride), grid_w), col1 + 1)
    row2 = max(min(math.ceil(y2 / stride), grid_h), row1 + 1)
    return col1, row1, col2, row2
