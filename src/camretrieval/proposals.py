"""CAM region proposals of whole images, in original pixels, and a picture of them (METHOD.md section 5).

:func:`propose_regions` runs a :class:`~camretrieval.descriptor.Describer`'s backbone once on an image: the CAM
layer's activations give the logits, the top classes, their normalised CAMs (Eq. 1), the heatmap (mean of the top-2
CAMs), one box per threshold (:func:`camretrieval.regions.region_proposals`), and each box in the original image's
pixels (:func:`camretrieval.regions.cells_to_box`). Re-ranking uses the QUERY's classes on every database image:
pass them as ``classes``.

This module is separate from ``regions`` because it needs the Describer, and ``descriptor`` imports ``regions``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .cams import class_activation_maps, class_logits, normalize_cams, top_classes
from .descriptor import Describer
from .errors import CamRetrievalError
from .regions import (
    PROPOSAL_CLASSES,
    PROPOSAL_THRESHOLDS,
    Box,
    CellBox,
    cells_to_box,
    proposal_heatmap,
    region_proposals,
    threshold_boxes,
)

# Boxes under this many pixels of the network's input, in width or height, are skipped: 2 cells at stride 32 (see
# regions.DEFAULT_MIN_CELLS for how the original code's 5 cells of stride 16 at 720 px become this).
DEFAULT_MIN_SIZE = 64


def heatmaps_from_activations(
    cam_activations: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_classes: int = PROPOSAL_CLASSES,
    classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposal heatmaps of a batch from its CAM-layer activations (B x K x h x w): (heatmaps B x h x w, the
    classes used B x n).

    Without ``classes``, each image's own top-``n_classes`` classes by logit (softmax ranks as the logits do);
    with ``classes`` (B x N or N, best first: the query's classes when re-ranking), the first ``n_classes`` of
    them. The CAMs are normalised per class (max 1, negatives 0) before averaging, as METHOD.md section 1.
    """
    if n_classes < 1:
        raise CamRetrievalError(f"the heatmap needs at least one class, got n_classes={n_classes}")
    if classes is None:
        classes = top_classes(class_logits(cam_activations, weight, bias), n_classes)
    else:
        classes = torch.as_tensor(classes, dtype=torch.long, device=cam_activations.device)
        if classes.dim() == 1:
            classes = classes.unsqueeze(0).expand(cam_activations.shape[0], -1)
        if classes.numel() == 0 or int(classes.min()) < 0 or int(classes.max()) >= weight.shape[0]:
            raise CamRetrievalError(f"classes must be indices of the {weight.shape[0]} classes of the classifier")
        classes = classes[:, :n_classes]
    cams = normalize_cams(class_activation_maps(cam_activations, weight, classes))
    return proposal_heatmap(cams, n=n_classes), classes


@dataclass
class RegionProposals:
    """Everything :func:`compute_region_proposals` worked out for one image (for drawing and debugging)."""

    image: Image.Image  # the original image, RGB, EXIF orientation applied
    resized_size: tuple[int, int]  # (width, height) the network saw
    stride: int  # output stride of the CAM layer
    classes: list[int]  # the classes whose CAMs were averaged, best first
    heatmap: np.ndarray  # grid_h x grid_w, in [0, 1]
    thresholds: tuple[float, ...]
    cell_boxes: list[CellBox] = field(default_factory=list)  # the proposals, in CAM cells
    boxes: list[Box] = field(default_factory=list)  # the same, in the original image's pixels
    # For each proposal, the thresholds that produced it (a box found again by a higher threshold is kept once).
    box_thresholds: list[tuple[float, ...]] = field(default_factory=list)


def compute_region_proposals(
    describer: Describer,
    image: str | Path | Image.Image,
    n_classes: int = PROPOSAL_CLASSES,
    thresholds: Sequence[float] = PROPOSAL_THRESHOLDS,
    min_size: float = DEFAULT_MIN_SIZE,
    classes: Sequence[int] | None = None,
) -> RegionProposals:
    """:func:`propose_regions`, keeping the intermediate results (heatmap, classes, cell boxes)."""
    if min_size < 0:
        raise CamRetrievalError(f"min_size is in pixels of the network's input and cannot be negative: {min_size}")
    picture = describer.load(image)
    tensor = describer.preprocess(picture)
    resized_size = (tensor.shape[2], tensor.shape[1])
    backbone = describer.backbone
    stride = backbone.layer_strides[backbone.cam_layer]
    with torch.inference_mode():
        activations = describer.feature_maps(tensor.unsqueeze(0)).cam_activations
        chosen = None if classes is None else torch.as_tensor(list(classes), dtype=torch.long)
        heatmaps, used = heatmaps_from_activations(
            activations, backbone.classifier_weight, backbone.classifier_bias, n_classes, chosen
        )
    heatmap = heatmaps[0].float().cpu().numpy()
    min_cells = max(1, math.ceil(min_size / stride))
    cell_boxes = region_proposals(heatmap, thresholds, min_cells=min_cells)
    per_threshold = threshold_boxes(heatmap, thresholds)
    return RegionProposals(
        image=picture,
        resized_size=resized_size,
        stride=stride,
        classes=[int(c) for c in used[0].tolist()],
        heatmap=heatmap,
        thresholds=tuple(float(t) for t in thresholds),
        cell_boxes=cell_boxes,
        boxes=[cells_to_box(cells, stride, resized_size, picture.size) for cells in cell_boxes],
        box_thresholds=[
            tuple(float(t) for t, found in zip(thresholds, per_threshold) if found == cells) for cells in cell_boxes
        ],
    )


def propose_regions(
    describer: Describer,
    image: str | Path | Image.Image,
    n_classes: int = PROPOSAL_CLASSES,
    thresholds: Sequence[float] = PROPOSAL_THRESHOLDS,
    min_size: float = DEFAULT_MIN_SIZE,
    classes: Sequence[int] | None = None,
) -> list[Box]:
    """Candidate object regions of an image (a path or a PIL image), as boxes ``(x1, y1, x2, y2)`` in its
    ORIGINAL pixels (after EXIF orientation): METHOD.md section 5.

    One forward pass of the describer's backbone at its size; the CAMs of the top ``n_classes`` classes (by the
    classifier's logits; or the given ``classes``, best first, e.g. the query's when re-ranking) are normalised and
    averaged into a heatmap; for each threshold (fractions of its maximum, all five of the paper by default) the
    bounding box of the largest 8-connected component of cells; boxes under ``min_size`` pixels of the network's
    input (in width or height, rounded up to whole cells) skipped; duplicates dropped. Lower thresholds first, so
    the first box is usually the widest. An image with no positive evidence for its classes gives no boxes.
    The boxes can be passed back as query boxes (``Describer.describe(..., boxes=...)``): they select the same cells.
    """
    return compute_region_proposals(describer, image, n_classes, thresholds, min_size, classes).boxes


# --- Pictures (Pillow only: no plotting dependency) ---

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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
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
    font = _font(max(11, height // 28))
    line = max(2, round(proposals.image.height / height * 2))
    label_font = _font(max(11, round(proposals.image.height / height * 13)))
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
    line_height = font.getbbox("Ag")[3] + 6
    text_width = max(font.getbbox(text)[2] for text in lines) + 8  # the caption may be wider than the pictures
    panel = Image.new(
        "RGB", (max(2 * width + 8, text_width), height + line_height * len(lines) + 8), (255, 255, 255)
    )
    panel.paste(left, (0, 0))
    panel.paste(right, (width + 8, 0))
    draw = ImageDraw.Draw(panel)
    for index, text in enumerate(lines):
        draw.text((4, height + 4 + index * line_height), text, fill=(0, 0, 0), font=font)
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
