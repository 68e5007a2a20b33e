"""Pictures of CAM region proposals (Pillow only: no plotting dependency): the heatmap overlay, the proposals with
the thresholds that found them, panels stacked into a figure (METHOD.md section 5). The proposals themselves come
from :func:`camretrieval.explain.proposals.compute_region_proposals`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from camretrieval.errors import CamRetrievalError
from camretrieval.explain.proposals import RegionProposals, compute_region_proposals
from camretrieval.method.regions import Box

if TYPE_CHECKING:  # annotations only
    from camretrieval.extraction.describer import Describer

# A perceptually ordered dark-to-bright colour ramp (anchor points of matplotlib's "inferno"), for the heatmap.
_RAMP = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39),
     (252, 255, 164)],
    dtype=np.float64,
)
# One colour per threshold of the default five (more thresholds cycle).
_BOX_COLOURS = [(0, 200, 255), (0, 255, 120), (255, 230, 0), (255, 120, 0), (255, 0, 160)]


def _colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H x W) -> RGB uint8 (H x W x 3) along :data:`_RAMP`."""
    position = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    frac = (position - low)[..., None]
    return np.round(_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).astype(np.uint8)


def heatmap_overlay(proposals: RegionProposals, opacity: float = 0.6) -> Image.Image:
    """The heatmap laid over the original image, scaled to its maximum as the thresholds are. Cells are drawn as
    blocks (nearest-neighbour), not smoothed: the thresholds act on whole cells, so the picture shows what they see."""
    grid_h, grid_w = proposals.heatmap.shape
    stride = proposals.stride
    peak = float(proposals.heatmap.max()) if proposals.heatmap.size else 0.0
    cells = Image.fromarray(_colourise(proposals.heatmap / peak if peak > 0 else np.zeros_like(proposals.heatmap)))
    # Cells cover stride x stride pixels of the resized image; the last ones reach past its border: crop them.
    in_resized = cells.resize((grid_w * stride, grid_h * stride), Image.Resampling.NEAREST)
    in_resized = in_resized.crop((0, 0, *proposals.resized_size))
    in_original = in_resized.resize(proposals.image.size, Image.Resampling.NEAREST)
    return Image.blend(proposals.image, in_original, opacity)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels (before Pillow 10.1: its bitmap font, in its one size)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        return ImageFont.load_default()


def _draw_boxes(
    picture: Image.Image, proposals: RegionProposals, reference_box: Box | None, width: int, font
) -> Image.Image:
    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    if reference_box is not None:
        draw.rectangle(reference_box, outline=(255, 255, 255), width=width + 2)
    labels = []
    for box, found_by in zip(proposals.boxes, proposals.box_thresholds):
        colour = _BOX_COLOURS[proposals.thresholds.index(found_by[0]) % len(_BOX_COLOURS)]
        draw.rectangle(box, outline=colour, width=width)
        labels.append((box, colour, "/".join(f"{100 * t:g}%" for t in found_by)))
    # Labels after all boxes, each in its box's top-left corner, moved down while it would cover an earlier one
    # (boxes of several thresholds often share a corner).
    placed: list[tuple[float, float, float, float]] = []
    for box, colour, label in labels:
        x, y = box[0] + width + 2, box[1] + width + 1
        text_box = draw.textbbox((x, y), label, font=font)
        while any(_overlap(text_box, other) for other in placed):
            y += text_box[3] - text_box[1] + 2
            text_box = draw.textbbox((x, y), label, font=font)
        placed.append(text_box)
        draw.rectangle(text_box, fill=(0, 0, 0))
        draw.text((x, y), label, fill=colour, font=font)
    return picture


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_region_proposals(
    proposals: RegionProposals,
    reference_box: Box | None = None,
    class_names: Sequence[str] | None = None,
    height: int = 360,
    title: str | None = None,
) -> Image.Image:
    """A panel: the image with its proposals (labelled with the thresholds that found them; ``reference_box``, the
    annotated object, in white), beside the heatmap overlay with the same boxes, above a caption naming the
    classes (``class_names[c]`` for class c, e.g. :func:`camretrieval.imagenet_class_names`) and ``title``.
    ``height``: of each picture, in pixels."""
    caption_font = font(max(11, height // 28))
    line = max(2, round(proposals.image.height / height * 2))
    label_font = font(max(11, round(proposals.image.height / height * 13)))
    left = _draw_boxes(proposals.image, proposals, reference_box, line, label_font)
    right = _draw_boxes(heatmap_overlay(proposals), proposals, reference_box, line, label_font)
    width = round(proposals.image.width * height / proposals.image.height)
    left = left.resize((width, height), Image.Resampling.LANCZOS)
    right = right.resize((width, height), Image.Resampling.LANCZOS)
    names = [class_names[c] if class_names is not None else f"class {c}" for c in proposals.classes]
    lines = [title] if title else []
    lines.append(
        f"heatmap: mean CAM of {' + '.join(repr(n) for n in names)}; thresholds "
        + ", ".join(f"{100 * t:g}%" for t in proposals.thresholds)
        + " of its max"
    )
    summary = (
        f"{len(proposals.boxes)} boxes (labels: the thresholds that found each); "
        f"grid {proposals.heatmap.shape[1]}x{proposals.heatmap.shape[0]} cells of {proposals.stride} px"
    )
    lines.append(summary + ("; white: annotated object box" if reference_box is not None else ""))
    line_height = caption_font.getbbox("Ag")[3] + 6
    text_width = max(caption_font.getbbox(text)[2] for text in lines) + 8  # the caption may be wider than the pictures
    panel = Image.new(
        "RGB", (max(2 * width + 8, text_width), height + line_height * len(lines) + 8), (255, 255, 255)
    )
    panel.paste(left, (0, 0))
    panel.paste(right, (width + 8, 0))
    draw = ImageDraw.Draw(panel)
    for index, text in enumerate(lines):
        draw.text((4, height + 4 + index * line_height), text, fill=(0, 0, 0), font=caption_font)
    return panel


def stack_panels(panels: Sequence[Image.Image], gap: int = 12) -> Image.Image:
    """Panels one above the other on white, ``gap`` pixels apart."""
    if not panels:
        raise CamRetrievalError("no panels to stack")
    figure = Image.new(
        "RGB", (max(p.width for p in panels), sum(p.height for p in panels) + gap * (len(panels) - 1)), (255, 255, 255)
    )
    top = 0
    for panel in panels:
        figure.paste(panel, (0, top))
        top += panel.height + gap
    return figure


def save_region_proposals_figure(
    describer: Describer,
    images: Sequence[str | Path | Image.Image],
    path: str | Path,
    reference_boxes: Sequence[Box | None] | None = None,
    class_names: Sequence[str] | None = None,
    **options,
) -> list[RegionProposals]:
    """Compute the proposals of each image (``options`` go to :func:`compute_region_proposals`), draw one panel per
    image (:func:`draw_region_proposals`), stack them, and write the picture to ``path`` (format from its suffix)."""
    reference_boxes = reference_boxes if reference_boxes is not None else [None] * len(images)
    if len(reference_boxes) != len(images):
        raise CamRetrievalError(f"{len(images)} images but {len(reference_boxes)} reference boxes")
    results = [compute_region_proposals(describer, image, **options) for image in images]
    panels = [draw_region_proposals(r, box, class_names) for r, box in zip(results, reference_boxes)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stack_panels(panels).save(path)
    return results


__all__ = [
    "draw_region_proposals",
    "font",
    "heatmap_overlay",
    "save_region_proposals_figure",
    "stack_panels",
]
