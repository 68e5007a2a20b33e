"""See why it matched: explanations of a match, and the figure of ``camretrieval explain`` (Pillow and torch only).

A query's top classes with their ImageNet names, the CAM heatmaps of its top-2 classes over the query and over a
result, and the result's region that matched (its best CAM region proposal for the query's classes, scored as
re-ranking scores it): :func:`explain_match`, drawn by :func:`query_overlay` and :func:`result_overlay` (the web
page's overlays, :mod:`camretrieval.web.server`); the figure of ``camretrieval explain``: :func:`explain_figure`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from camretrieval.errors import CamRetrievalError
from camretrieval.explain.drawing import draw_region_proposals, font, heatmap_overlay, stack_panels
from camretrieval.explain.proposals import RegionProposals, compute_region_proposals
from camretrieval.extraction.backbones import imagenet_class_names
from camretrieval.extraction.images import IMAGE_EXTENSIONS, ImageError
from camretrieval.method.aggregation import aggregate
from camretrieval.method.cams import class_activation_maps, class_logits, normalize_cams
from camretrieval.method.cell_major import cropped_region_class_vectors
from camretrieval.method.regions import PROPOSAL_CLASSES, Box, validate_box
from camretrieval.search.reranking import DEFAULT_RERANK_CLASSES

if TYPE_CHECKING:  # annotations only
    from camretrieval.extraction.describer import Describer

EXPLAIN_CLASSES = 5  # top classes of the query listed by an explanation
OVERLAY_SIDE = 640  # longer side of the overlays the API serves, in pixels
MATCH_COLOUR = (40, 255, 80)


@dataclass
class ClassScore:
    """One of an image's top classes: its index in the classifier, its ImageNet name, its softmax probability."""

    index: int
    name: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "probability": self.probability}


_NAMES: list[str] | None = None


def class_names() -> list[str]:
    """The 1000 ImageNet class names (read once)."""
    global _NAMES
    if _NAMES is None:
        _NAMES = imagenet_class_names()
    return _NAMES


def _name(index: int) -> str:
    names = class_names()
    return names[index] if 0 <= index < len(names) else f"class {index}"


def top_class_scores(
    describer: Describer, image: str | Path | Image.Image, box: Box | None = None, n: int = EXPLAIN_CLASSES
) -> list[ClassScore]:
    """The top-``n`` classes of an image, or of its region ``box`` (whose classes are then the region's own, as a
    box query's are), with their names and softmax probabilities."""
    maps = describer.image_maps(image, box)
    backbone = describer.backbone
    with torch.inference_mode():
        probabilities = class_logits(maps.cam_activations, backbone.classifier_weight, backbone.classifier_bias)[
            0
        ].softmax(0)
        values, indices = probabilities.float().topk(min(n, probabilities.numel()))
    return [ClassScore(int(i), _name(int(i)), float(p)) for p, i in zip(values.tolist(), indices.tolist())]


@dataclass
class Explanation:
    """Why a result matched a query: the query's top classes, the heatmap of its top-2 classes over the query
    (``query``) and over the result (``result``, whose ``boxes`` are the result's region proposals for the query's
    classes), and the proposal that matched best (``region``, in the result's pixels, with its cosine similarity to
    the query; the whole image when the result has no proposal)."""

    classes: list[ClassScore]
    query: RegionProposals
    query_box: Box | None
    result: RegionProposals
    region: Box
    region_score: float
    region_is_whole_image: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": {
                "box": list(self.query_box) if self.query_box is not None else None,
                "size": list(self.query.image.size),
                "classes": [c.to_dict() for c in self.classes],
                "heatmap_classes": [c.to_dict() for c in self.classes[: len(self.query.classes)]],
            },
            "result": {
                "size": list(self.result.image.size),
                "region": [round(v, 2) for v in self.region],
                "region_score": self.region_score,
                "region_is_whole_image": self.region_is_whole_image,
                "proposals": [[round(v, 2) for v in box] for box in self.result.boxes],
            },
        }


@torch.inference_mode()
def explain_match(
    describer: Describer,
    query: str | Path | Image.Image,
    result: str | Path | Image.Image,
    query_box: Box | None = None,
    n_classes: int = EXPLAIN_CLASSES,
    region_classes: int = DEFAULT_RERANK_CLASSES,
) -> Explanation:
    """Explain a match (the describer must be the index's: same backbone, size, whitening).

    The query's classes are those of its region when it has a box. The heatmaps are the mean normalised CAM of the
    query's top-2 classes (METHOD.md section 5) on each image. The result's proposals are scored as re-ranking
    scores them (:mod:`camretrieval.search.reranking`): each region's class vectors for the query's
    top-``region_classes`` (N_re) classes, whitened and aggregated, against the query's descriptor over the same
    classes. For a baseline pooling (no class vectors) each region is described as a query region instead and
    compared with the query's descriptor.
    """
    backbone = describer.backbone
    weight = backbone.classifier_weight
    query_picture = describer.load(query)
    if query_box is not None:
        query_box = validate_box(query_box, *query_picture.size)
    result_picture = describer.load(result)
    query_maps = describer.image_maps(query_picture, query_box)
    logits = class_logits(query_maps.cam_activations, weight, backbone.classifier_bias)[0]
    probabilities = logits.softmax(0).float()
    order = logits.argsort(descending=True)
    classes = [ClassScore(int(i), _name(int(i)), float(probabilities[i])) for i in order[:n_classes].tolist()]
    query_classes = order[: max(region_classes, PROPOSAL_CLASSES)]
    on_query = compute_region_proposals(describer, query_picture, classes=query_classes.tolist())
    on_result = compute_region_proposals(describer, result_picture, classes=query_classes.tolist())
    whole = (0.0, 0.0, float(result_picture.width), float(result_picture.height))
    boxes = list(on_result.boxes) or [whole]
    if describer.pooling == "cam":
        n_re = min(region_classes, len(query_classes))
        q = aggregate(describer.pooled_vectors(query_maps, n_re).vectors, describer.whitening)[0]
        maps = describer.feature_maps(describer.preprocess(result_picture).unsqueeze(0))
        features, activations = maps.features[0].permute(1, 2, 0), maps.cam_activations[0].permute(1, 2, 0)
        strides = (backbone.layer_strides[backbone.feature_layer], backbone.layer_strides[backbone.cam_layer])
        height, width = activations.shape[:2]
        cell_boxes = list(on_result.cell_boxes) or [(0, 0, width, height)]
        scores = []
        for cell_box in cell_boxes:
            vectors = cropped_region_class_vectors(
                features, activations, weight, query_classes[:n_re], cell_box, strides[1], strides
            )
            scores.append(float(aggregate(vectors.unsqueeze(0), describer.whitening)[0] @ q))
    else:
        q = torch.as_tensor(describer.describe([query_picture], [query_box]))[0]
        regions = describer.describe([result_picture] * len(boxes), boxes)
        scores = [float(row @ q.numpy()) for row in regions]
    best = int(np.argmax(scores))
    return Explanation(
        classes,
        on_query,
        query_box,
        on_result,
        tuple(boxes[best]),
        scores[best],
        not on_result.boxes,  # type: ignore[arg-type]
    )


def _fit(picture: Image.Image, side: int) -> tuple[Image.Image, float]:
    """The picture scaled so that its longer side is ``side`` (never enlarged more than 2x), and the scale."""
    scale = min(side / max(picture.size), 2.0)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.LANCZOS), scale


def _scaled(box: Sequence[float], scale: float) -> tuple[float, float, float, float]:
    return tuple(v * scale for v in box)  # type: ignore[return-value]


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, font) -> None:
    box = draw.textbbox(xy, text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    draw.text(xy, text, fill=colour, font=font)


def query_overlay(explanation: Explanation, side: int = OVERLAY_SIDE) -> Image.Image:
    """The query with the heatmap of its top-2 classes and, in white, its box."""
    picture, scale = _fit(heatmap_overlay(explanation.query), side)
    if explanation.query_box is not None:
        ImageDraw.Draw(picture).rectangle(_scaled(explanation.query_box, scale), outline=(255, 255, 255), width=3)
    return picture


def result_overlay(explanation: Explanation, side: int = OVERLAY_SIDE) -> Image.Image:
    """The result with the heatmap of the query's top-2 classes, its region proposals (thin, grey) and, in green,
    the region that matched with its score."""
    picture, scale = _fit(heatmap_overlay(explanation.result), side)
    draw = ImageDraw.Draw(picture)
    for box in explanation.result.boxes:
        draw.rectangle(_scaled(box, scale), outline=(200, 200, 200), width=1)
    region = _scaled(explanation.region, scale)
    draw.rectangle(region, outline=MATCH_COLOUR, width=4)
    label_font = font(max(12, picture.height // 30))
    _label(draw, (region[0] + 6, region[1] + 5), f"matched {explanation.region_score:.3f}", MATCH_COLOUR, label_font)
    return picture


def _caption_below(picture: Image.Image, lines: Sequence[str], font) -> Image.Image:
    line_height = font.getbbox("Ag")[3] + 4
    width = max([picture.width] + [int(font.getbbox(text)[2]) + 8 for text in lines])
    panel = Image.new("RGB", (width, picture.height + line_height * len(lines) + 6), (255, 255, 255))
    panel.paste(picture, (0, 0))
    draw = ImageDraw.Draw(panel)
    for i, text in enumerate(lines):
        draw.text((4, picture.height + 3 + i * line_height), text, fill=(0, 0, 0), font=font)
    return panel


def _side_by_side(panels: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    row = Image.new(
        "RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)), (255, 255, 255)
    )
    left = 0
    for panel in panels:
        row.paste(panel, (left, 0))
        left += panel.width + gap
    return row


@torch.inference_mode()
def explain_figure(
    describer: Describer,
    image: str | Path | Image.Image,
    n_classes: int = EXPLAIN_CLASSES,
    box: Box | None = None,
    title: str | None = None,
    height: int = 300,
) -> tuple[Image.Image, list[ClassScore]]:
    """``camretrieval explain``: the image with its CAM region proposals beside the heatmap of its top-2 classes
    (:func:`camretrieval.explain.drawing.draw_region_proposals`), above the CAM of each of its top-``n_classes`` classes
    with its name and probability. With ``box``, the classes are the box's (white in the figure)."""
    if n_classes < 1:
        raise CamRetrievalError(f"--classes must be at least 1, got {n_classes}")
    picture = describer.load(image)
    if box is not None:
        box = validate_box(box, *picture.size)
    classes = top_class_scores(describer, picture, box, n_classes)
    proposals = compute_region_proposals(describer, picture, classes=[c.index for c in classes])
    top = draw_region_proposals(proposals, box, class_names(), height=height, title=title)
    backbone = describer.backbone
    activations = describer.feature_maps(describer.preprocess(picture).unsqueeze(0)).cam_activations
    indices = torch.tensor([[c.index for c in classes]])
    cams = (
        normalize_cams(class_activation_maps(activations, backbone.classifier_weight, indices))[0].float().cpu().numpy()
    )
    caption_font = font(max(11, height // 22))
    small = round(height * 0.75)
    panels = []
    for rank, (score, cam) in enumerate(zip(classes, cams), start=1):
        overlay = heatmap_overlay(dataclasses.replace(proposals, heatmap=cam, classes=[score.index]))
        overlay = overlay.resize(
            (max(1, round(overlay.width * small / overlay.height)), small), Image.Resampling.LANCZOS
        )
        if box is not None:
            s = small / picture.height
            ImageDraw.Draw(overlay).rectangle(_scaled(box, s), outline=(255, 255, 255), width=2)
        panels.append(_caption_below(overlay, [f"{rank}. {score.name}", f"p = {score.probability:.3f}"], caption_font))
    rows = [top]
    per_row = max(1, math.floor(top.width / (panels[0].width + 8))) if panels else 1
    for start in range(0, len(panels), per_row):
        rows.append(_side_by_side(panels[start : start + per_row]))
    return stack_panels(rows), classes


def open_image_argument(path: str | Path) -> Path:
    """A local image file named on the command line (``camretrieval explain``)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        print(
            f"note: {path.suffix or 'no extension'} is not an indexed image extension; trying to read it anyway",
            file=sys.stderr,
        )
    return path


__all__ = [
    "EXPLAIN_CLASSES",
    "MATCH_COLOUR",
    "OVERLAY_SIDE",
    "ClassScore",
    "Explanation",
    "class_names",
    "explain_figure",
    "explain_match",
    "open_image_argument",
    "query_overlay",
    "result_overlay",
    "top_class_scores",
]
