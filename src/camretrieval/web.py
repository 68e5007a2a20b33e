"""See why it matched: explanations of a match, the ``eval --report`` page, and ``camretrieval serve``.

Three layers, each usable without the next:

- explanations (Pillow and torch only): a query's top classes with their ImageNet names, the CAM heatmaps of its
  top-2 classes over the query and over a result, and the result's region that matched (its best CAM region
  proposal for the query's classes, scored as re-ranking scores it): :func:`explain_match`, :func:`explain_figure`;
- the HTML report of ``camretrieval eval --report DIR``: :func:`write_eval_report`;
- the web page and its JSON API (FastAPI + uvicorn): :func:`create_app`, :func:`serve`. docs/web.md documents it.

Security of the server (docs/web.md): it binds 127.0.0.1 unless told otherwise; it serves only the indexed images
(a path must be in the index's list, free of ``..`` and absolute parts, and must resolve, symlinks followed, to a
file under the index's image root); request bodies over :data:`MAX_UPLOAD_BYTES` are refused with 413 before they
are parsed; uploads are decoded only when their header says at most :data:`MAX_UPLOAD_PIXELS` pixels; uploads are
kept in a temporary folder of the server's own, removed when it stops; every error is a JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import html
import io
import json
import math
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .aggregation import aggregate
from .backbones import imagenet_class_names
from .cams import class_activation_maps, class_logits, normalize_cams
from .errors import CamRetrievalError
from .images import IMAGE_EXTENSIONS, ImageError, to_rgb
from .index import Index, SearchOptions
from .proposals import (
    RegionProposals,
    _font,
    compute_region_proposals,
    draw_region_proposals,
    heatmap_overlay,
    stack_panels,
)
from .regions import PROPOSAL_CLASSES, Box, BoxError, parse_box, validate_box
from .reranking import DEFAULT_RERANK_CLASSES, cropped_region_class_vectors

if TYPE_CHECKING:  # annotations only
    from .datasets import RetrievalDataset
    from .descriptor import Describer
    from .experiments import VariantResult

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an upload's file, and (plus a little for the form) a request's body
MAX_UPLOAD_PIXELS = 40_000_000  # checked from the file's header, before any pixel is decoded
UPLOAD_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})  # what find_images indexes
THUMBNAIL_SIZES = (128, 256, 512)  # the few sizes served keep the cache bounded
EXPLAIN_CLASSES = 5  # top classes of the query listed by an explanation
OVERLAY_SIDE = 640  # longer side of the overlays the API serves, in pixels
MATCH_COLOUR = (40, 255, 80)


# --- explanations ---------------------------------------------------------------------------------------------


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
    query's top-2 classes (METHOD.md section 5) on each image. The result's proposals are scored as re-ranking scores
    them (:mod:`camretrieval.reranking`): each region's class vectors for the query's top-``region_classes`` (N_re)
    classes, whitened and aggregated, against the query's descriptor over the same classes. For a baseline pooling
    (no class vectors) each region is described as a query region instead and compared with the query's descriptor.
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
    font = _font(max(12, picture.height // 30))
    _label(draw, (region[0] + 6, region[1] + 5), f"matched {explanation.region_score:.3f}", MATCH_COLOUR, font)
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
    (:func:`camretrieval.proposals.draw_region_proposals`), above the CAM of each of its top-``n_classes`` classes
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
    font = _font(max(11, height // 22))
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
        panels.append(_caption_below(overlay, [f"{rank}. {score.name}", f"p = {score.probability:.3f}"], font))
    rows = [top]
    per_row = max(1, math.floor(top.width / (panels[0].width + 8))) if panels else 1
    for start in range(0, len(panels), per_row):
        rows.append(_side_by_side(panels[start : start + per_row]))
    return stack_panels(rows), classes


# --- the eval report --------------------------------------------------------------------------------------------


REPORT_EXAMPLES = 6  # queries shown with their CAM and top results: the worst half and the best half by AP
REPORT_TOP = 8  # results shown per example query


def _relevance(entry: dict[str, np.ndarray], protocol: str) -> tuple[set[int], set[int]]:
    """(positives, junk) of a query's ground truth; revisited sets: the Medium setup (Easy + Hard positive)."""
    if protocol == "revisited":
        positives = set(np.asarray(entry["easy"]).tolist()) | set(np.asarray(entry["hard"]).tolist())
    else:
        positives = set(np.asarray(entry["ok"]).tolist())
    return positives, set(np.asarray(entry.get("junk", [])).tolist())


def precision_recall(ranking: np.ndarray, positives: set[int], junk: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall after each positive of a ranking (database indices, best first), junk left out."""
    kept = [i for i in ranking.tolist() if i not in junk]
    hits = np.flatnonzero(np.isin(np.asarray(kept, dtype=np.int64), np.fromiter(positives, dtype=np.int64)))
    if not positives or hits.size == 0:
        return np.zeros(0), np.zeros(0)
    found = np.arange(1, hits.size + 1)
    return found / (hits + 1), found / len(positives)


def mean_interpolated_precision(curves: Sequence[tuple[np.ndarray, np.ndarray]], levels: int = 101) -> np.ndarray:
    """Mean over queries of the interpolated precision (the best precision at any recall >= r) at ``levels``
    recall levels from 0 to 1."""
    recall_levels = np.linspace(0, 1, levels)
    rows = []
    for precision, recall in curves:
        row = np.zeros(levels)
        for j, r in enumerate(recall_levels):
            reached = precision[recall >= r - 1e-12]
            row[j] = reached.max() if reached.size else 0.0
        rows.append(row)
    return np.mean(rows, axis=0) if rows else np.zeros(levels)


def pr_curve_svg(
    curves: Sequence[tuple[np.ndarray, np.ndarray]], title: str, width: int = 460, height: int = 340
) -> str:
    """A precision-recall plot as inline SVG: each query's curve (faint) and the mean interpolated precision."""
    left, right, top, bottom = 52, 16, 28, 44
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(recall: float, precision: float) -> str:
        return f"{left + recall * plot_w:.1f},{top + (1 - precision) * plot_h:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)}" class="pr-curve">',
        f'<text x="{left + plot_w / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>',
    ]
    for tick in np.linspace(0, 1, 6):
        x, y = left + tick * plot_w, top + (1 - tick) * plot_h
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#e4e4e4"/>')
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle" font-size="11">{tick:.1f}</text>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick:.1f}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#555"/>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle" font-size="12">recall</text>')
    parts.append(
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">precision</text>'
    )
    if len(curves) <= 200:  # beyond that the faint lines are a grey blur
        for precision, recall in curves:
            if precision.size:
                # One point per positive found, from recall 0 at the first one's precision.
                points = " ".join([xy(0, precision[0])] + [xy(r, p) for p, r in zip(precision, recall)])
                parts.append(
                    f'<polyline points="{points}" fill="none" stroke="#9ab" stroke-opacity="0.35" stroke-width="1"/>'
                )
    mean = mean_interpolated_precision(curves)
    points = " ".join(xy(r, p) for r, p in zip(np.linspace(0, 1, len(mean)), mean))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#c0392b" stroke-width="2.5"/>')
    parts.append(  # bottom left: where a precision-recall curve seldom goes
        f'<text x="{left + 8}" y="{top + plot_h - 10}" font-size="12" fill="#c0392b">mean interpolated precision</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


def _thumbnail_file(picture: Image.Image, path: Path, side: int = 200, border: tuple | None = None) -> None:
    picture = picture.copy()
    picture.thumbnail((side, side))
    if border is not None:
        picture = ImageOps.expand(picture, border=5, fill=border)
    picture.save(path, quality=85)


_REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 10px; background: #4a90d9; vertical-align: middle; }
.example { margin: 18px 0; padding: 10px; border: 1px solid #ddd; border-radius: 6px; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
figure { margin: 0; font-size: 12px; max-width: 220px; overflow-wrap: anywhere; }
figure img { display: block; }
.pos { color: #1e8e3e; } .neg { color: #c0392b; } .junk { color: #888; }
"""


def write_eval_report(
    directory: str | Path,
    dataset: RetrievalDataset,
    result: VariantResult,
    record: dict[str, Any],
    describer: Describer,
    examples: int = REPORT_EXAMPLES,
    top: int = REPORT_TOP,
) -> Path:
    """Write ``index.html`` (and its pictures under ``images/``) into ``directory``: the metrics, the settings, each
    query's AP, a precision-recall plot (inline SVG), and for a few queries (the worst and the best by AP) the query,
    the CAM heatmap of its top-2 classes and its top results, green-bordered when positive, red when negative, grey
    when junk. ``result.similarity`` (queries x database) must be kept: ``evaluate_variants(keep_similarity=True)``."""
    similarity = getattr(result, "similarity", None)
    if similarity is None:
        raise CamRetrievalError("the report needs the similarity matrix: evaluate with keep_similarity=True")
    directory = Path(directory)
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    aps = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in record.get("aps", [])]
    rankings = np.argsort(-np.asarray(similarity, dtype=np.float64), axis=1, kind="stable")
    curves, relevance = [], []
    for q, entry in enumerate(dataset.gnd):
        positives, junk = _relevance(entry, dataset.protocol)
        relevance.append((positives, junk))
        if positives:
            curves.append(precision_recall(rankings[q], positives, junk))
    name = html.escape(dataset.name)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>camretrieval eval: {name}</title><style>{_REPORT_STYLE}</style></head><body>",
        f"<h1>{name}: {html.escape(result.variant.name)}</h1>",
        f"<p>{len(dataset.images)} database images, {len(dataset.queries)} queries, "
        f"protocol {html.escape(dataset.protocol)}.</p>",
        "<h2>Results</h2>",
        "<table><tr><th>metric</th><th>value</th></tr>",
    ]
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f'<tr><td>{html.escape(key)}</td><td class="num">{value:.4f}</td></tr>')
    parts.append("</table>")
    settings = record.get("settings", {})
    parts.append("<table><tr><th>setting</th><th>value</th></tr>")
    parts += [f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()]
    parts.append("</table>")
    parts.append("<h2>Precision-recall</h2>")
    parts.append(
        pr_curve_svg(curves, f"{dataset.name}: {len(curves)} queries, mAP {record.get('map', float('nan')):.3f}")
    )
    scored = [q for q, ap in enumerate(aps) if ap is not None]
    order = sorted(scored, key=lambda q: aps[q])  # type: ignore[arg-type, return-value]
    worst = order[: (examples + 1) // 2]
    best = [q for q in reversed(order) if q not in worst][: examples // 2]
    if worst or best:
        parts.append("<h2>Examples</h2>")
        parts.append(
            "<p>The worst and the best queries by AP: the query (its box in white), the heatmap of its top-2 classes, "
            'and its top results: <span class="pos">green: positive</span>, <span class="neg">red: negative</span>, '
            '<span class="junk">grey: junk (not counted)</span>.</p>'
        )
    for q in worst + best:
        parts.append(_report_example(q, dataset, rankings[q], relevance[q], aps[q], describer, images_dir, top))
    parts.append("<h2>Average precision per query</h2>")
    parts.append("<table><tr><th>#</th><th>query</th><th>AP</th><th></th></tr>")
    names = record.get("query_names") or [query.name for query in dataset.queries]
    for q, ap in enumerate(aps):
        value = "n/a" if ap is None else f"{ap:.4f}"
        bar = "" if ap is None else f'<span class="bar" style="width:{ap * 200:.0f}px"></span>'
        parts.append(
            f'<tr><td>{q}</td><td>{html.escape(str(names[q]))}</td><td class="num">{value}</td><td>{bar}</td></tr>'
        )
    parts.append("</table></body></html>")
    page = directory / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


def _report_example(
    q: int,
    dataset: RetrievalDataset,
    ranking: np.ndarray,
    relevance: tuple[set[int], set[int]],
    ap: float | None,
    describer: Describer,
    images_dir: Path,
    top: int,
) -> str:
    query = dataset.queries[q]
    positives, junk = relevance
    query_path = dataset.query_path(q)
    parts = [f'<div class="example"><h3>query {q}: {html.escape(query.name)} (AP {ap:.3f})</h3><div class="row">']
    try:
        picture = describer.load(query_path)
        classes = top_class_scores(describer, picture, query.box, PROPOSAL_CLASSES)
        proposals = compute_region_proposals(describer, picture, classes=[c.index for c in classes])
        overlay = heatmap_overlay(proposals)
        for suffix, image in (("query", picture), ("cam", overlay)):
            target = images_dir / f"q{q}_{suffix}.jpg"
            framed = image.copy()
            if query.box is not None:
                ImageDraw.Draw(framed).rectangle(query.box, outline=(255, 255, 255), width=max(2, picture.width // 150))
            _thumbnail_file(framed, target, 220)
        caption = " + ".join(html.escape(c.name) for c in classes)
        parts.append(f'<figure><img src="images/q{q}_query.jpg" alt="query"><figcaption>query</figcaption></figure>')
        parts.append(
            f'<figure><img src="images/q{q}_cam.jpg" alt="CAM"><figcaption>CAM: {caption}</figcaption></figure>'
        )
    except CamRetrievalError as error:
        parts.append(f"<p>query image unusable: {html.escape(str(error))}</p>")
    parts.append('</div><div class="row">')
    for rank, i in enumerate(ranking[:top].tolist(), start=1):
        kind = "pos" if i in positives else "junk" if i in junk else "neg"
        colour = {"pos": (30, 170, 60), "neg": (210, 40, 40), "junk": (150, 150, 150)}[kind]
        target = images_dir / f"q{q}_r{rank}.jpg"
        try:
            with Image.open(dataset.image_path(i)) as image:
                image.draft("RGB", (300, 300))
                _thumbnail_file(to_rgb(image), target, 150, border=colour)
            img = f'<img src="images/{target.name}" alt="{kind}">'
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            img = f"<p>unreadable: {html.escape(str(error))}</p>"
        parts.append(
            f'<figure class="{kind}">{img}<figcaption>{rank}. <span class="{kind}">{kind}</span> '
            f"{html.escape(dataset.images[i])}</figcaption></figure>"
        )
    parts.append("</div></div>")
    return "\n".join(parts)


# --- uploads and the files the server may serve ----------------------------------------------------------------


class RequestError(CamRetrievalError):
    """A request the server refuses, with the HTTP status to answer (400, 403, 404, 413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded image decoded to RGB (EXIF orientation applied), or a :class:`RequestError`: 413 for over
    :data:`MAX_UPLOAD_BYTES` or :data:`MAX_UPLOAD_PIXELS` (checked from the header, before decoding), 415 for a
    file that is no image of a format the index takes, 400 for a corrupt one."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(
            413, f"the upload is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB"
        )
    if not data:
        raise RequestError(400, "the upload is empty")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; the pixel limit below is the real one.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_UPLOAD_PIXELS:
                    raise RequestError(
                        413,
                        f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; the limit is "
                        f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixels",
                    )
                if image.format not in UPLOAD_FORMATS:
                    raise RequestError(
                        415, f"{image.format} images are not accepted: upload JPEG, PNG, WebP, BMP or TIFF"
                    )
                image.load()
                return to_rgb(image)
    except RequestError:
        raise
    except UnidentifiedImageError as error:
        raise RequestError(415, "the upload is not an image (accepted: JPEG, PNG, WebP, BMP, TIFF)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(413, f"the image has too many pixels ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise RequestError(400, f"the image is corrupt or truncated ({error})") from error


_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


class UploadStore:
    """The last ``keep`` uploaded query images, as files in the server's own temporary folder (so that a result can
    be explained after the search without uploading the query again); named by their content's hash."""

    def __init__(self, directory: Path, keep: int = 32) -> None:
        self.directory = directory
        self.keep = keep
        self._names: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes, name: str) -> str:
        upload_id = hashlib.sha256(data).hexdigest()[:32]
        with self._lock:
            if upload_id not in self._names:
                (self.directory / upload_id).write_bytes(data)
            self._names[upload_id] = name
            self._names.move_to_end(upload_id)
            while len(self._names) > self.keep:
                old, _ = self._names.popitem(last=False)
                (self.directory / old).unlink(missing_ok=True)
        return upload_id

    def get(self, upload_id: str) -> tuple[bytes, str]:
        with self._lock:
            if not _UPLOAD_ID.match(upload_id) or upload_id not in self._names:
                raise RequestError(
                    404, f"no uploaded query {upload_id!r} (the server keeps the last {self.keep}): search again"
                )
            self._names.move_to_end(upload_id)
            return (self.directory / upload_id).read_bytes(), self._names[upload_id]


class BytesLRU:
    """A thread-safe least-recently-used cache of byte strings, bounded by their total size."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                self._size -= len(self._items.pop(key))
            self._items[key] = value
            self._size += len(value)
            while self._size > self.budget and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


class IndexedImages:
    """The only files the server reads for a request: the index's images, each resolved against its image root."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.root = root.resolve()
        self.paths = list(paths)
        self.positions = {path: i for i, path in enumerate(self.paths)}

    def resolve(self, relative: str) -> Path:
        """The file of an indexed path, or a :class:`RequestError`: 404 for a path that is not in the index
        (``..``, absolute, or any other), 403 for one that resolves outside the image root (a symlink escape)."""
        pure = PurePosixPath(relative)
        if (
            not relative
            or "\x00" in relative
            or "\\" in relative
            or pure.is_absolute()
            or any(part in ("..", ".") for part in relative.split("/"))
            or relative not in self.positions
        ):
            raise RequestError(404, "not an indexed image")
        try:
            resolved = (self.root / relative).resolve(strict=True)
        except (OSError, RuntimeError) as error:  # missing since indexing, or a symlink loop
            raise RequestError(404, "indexed image no longer readable") from error
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            raise RequestError(403, "this indexed path leads outside the image folder (a symlink): not served")
        return resolved


def thumbnail_bytes(path: Path, size: int) -> bytes:
    """A JPEG thumbnail (longer side ``size``) of an image file; JPEGs are decoded at reduced scale (draft mode)."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        picture = to_rgb(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    output = io.BytesIO()
    picture.save(output, "JPEG", quality=82)
    return output.getvalue()


def png_bytes(picture: Image.Image) -> bytes:
    output = io.BytesIO()
    picture.save(output, "PNG", optimize=False)
    return output.getvalue()


# --- the web app --------------------------------------------------------------------------------------------------


STATIC_DIR = Path(__file__).with_name("web_static")
_BODY_LIMIT = MAX_UPLOAD_BYTES + 256 * 1024  # the file plus the form's other fields and boundaries
_DRAIN_LIMIT = 8 * MAX_UPLOAD_BYTES  # a declared body up to this is read and dropped before the 413 (see below)


class Hit(BaseModel):
    path: str = Field(description="relative to the indexed folder, as in `camretrieval search --json`")
    score: float = Field(description="cosine similarity (or the refined score with re-ranking)")


class SearchResult(BaseModel):
    query: str = Field(description="the indexed path, or the uploaded file's name")
    results: list[Hit]
    query_id: str | None = Field(None, description="an upload's id, for /api/explain (the server keeps the last 32)")
    box: list[float] | None = None
    seconds: float = Field(description="time the search took on the server")


class ClassInfo(BaseModel):
    index: int
    name: str
    probability: float


class ExplainQuery(BaseModel):
    box: list[float] | None
    size: list[int]
    classes: list[ClassInfo]
    heatmap_classes: list[ClassInfo]


class ExplainResult(BaseModel):
    path: str
    size: list[int]
    score: float = Field(description="the plain (OfA) cosine similarity of the query and this image")
    region: list[float] = Field(description="the region that matched: x1, y1, x2, y2 in the result's pixels")
    region_score: float
    region_is_whole_image: bool
    proposals: list[list[float]]


class Explain(BaseModel):
    query: ExplainQuery
    result: ExplainResult
    overlays: dict[str, str] = Field(description="URLs of the PNG overlays: query and result")


class ImageList(BaseModel):
    total: int = Field(description="indexed images matching the filter")
    offset: int
    paths: list[str]


class Info(BaseModel):
    count: int
    settings: dict[str, Any]
    refinement: dict[str, bool] = Field(description="which search options this index supports")
    limits: dict[str, int]


class Error(BaseModel):
    detail: str


_ERRORS = {status: {"model": Error} for status in (400, 403, 404, 413, 415)}


class _TooLarge(StarletteHTTPException):
    """Raised while the body is read: an HTTP exception, so that FastAPI's form parsing passes it on as it is
    (it turns any other exception into a 400) and the app answers 413."""

    def __init__(self) -> None:
        super().__init__(413, f"the request is larger than the upload limit of {MAX_UPLOAD_BYTES // 2**20} MB")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the app parses it (Starlette's
    multipart parser would spool it to disk first). A declared body (Content-Length) up to ``drain`` bytes is read
    and dropped first, so that a client still sending sees the 413 and not a reset connection; a larger one is
    answered at once and the connection closed."""

    def __init__(self, app, limit: int = _BODY_LIMIT, drain: int = _DRAIN_LIMIT) -> None:
        self.app, self.limit, self.drain = app, limit, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.drain:
                while (await receive()).get("more_body", False):
                    pass
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": _TooLarge().detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class WebState:
    """What the server holds: the index and its model (loaded once, at start), the caches, the uploads folder."""

    def __init__(self, index_dir: str | Path, device: str = "cpu", upload_dir: Path | None = None) -> None:
        self.index = Index.open(index_dir, device=device)
        if self.index.image_root is None or not Path(self.index.image_root).is_dir():
            raise CamRetrievalError(
                f"the images of {index_dir} are not where they were indexed ({self.index.image_root}): the server "
                "shows them, so they must be there"
            )
        self.images = IndexedImages(Path(self.index.image_root), self.index.paths)
        self.describer = self.index.describer  # loads the backbone now, once, not on the first request
        class_names()
        self.model_lock = threading.Lock()  # one forward pass at a time: the CPU is busy enough with one
        self.thumbnails = BytesLRU(96 * 2**20)
        self.overlays = BytesLRU(64 * 2**20)
        self.explanations: OrderedDict[tuple, tuple[Explanation, float]] = OrderedDict()
        self.cache_lock = threading.Lock()
        self.upload_dir = upload_dir or Path(tempfile.mkdtemp(prefix="camretrieval-serve-"))
        self.uploads = UploadStore(self.upload_dir)

    def close(self) -> None:
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    @property
    def refinement(self) -> dict[str, bool]:
        has_maps = getattr(self.index, "maps", None) is not None and self.describer.pooling == "cam"
        return {"online": has_maps, "rerank": has_maps, "qe": True}

    def query_image(
        self, path: str | None, query_id: str | None, data: bytes | None = None
    ) -> tuple[Image.Image | Path, str, str | None]:
        """(image, name, upload id) of a query given as an indexed path, an upload id, or uploaded bytes."""
        if data is not None:
            return decode_upload(data), "", None
        if (path is None) == (query_id is None):
            raise RequestError(
                400, "give the query as an uploaded file, an indexed path, or an upload's query_id (one of them)"
            )
        if path is not None:
            return self.images.resolve(path), path, None
        data, name = self.uploads.get(query_id)  # type: ignore[arg-type]
        return decode_upload(data), name, query_id

    def explanation(
        self, key: tuple, query: Image.Image | Path, box: Box | None, result: str
    ) -> tuple[Explanation, float]:
        """The explanation of (query, box, result), cached (the page asks for it, then for its two overlays)."""
        with self.cache_lock:
            cached = self.explanations.get(key)
            if cached is not None:
                self.explanations.move_to_end(key)
                return cached
        result_path = self.images.resolve(result)
        with self.model_lock:
            explanation = explain_match(self.describer, query, result_path, box)
            q = self.describer.describe([query], [box])[0]
        score = float(self.index.descriptors[self.images.positions[result]] @ q)
        with self.cache_lock:
            self.explanations[key] = (explanation, score)
            while len(self.explanations) > 32:
                self.explanations.popitem(last=False)
        return explanation, score


def _parse_box(text: str | None) -> Box | None:
    if text is None or not text.strip():
        return None
    box = parse_box(text)
    if not all(math.isfinite(v) for v in box):
        raise BoxError(f"box {text!r} has a non-finite coordinate")
    return box


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def create_app(index_dir: str | Path, device: str = "cpu", allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The web page and its JSON API over the index at ``index_dir`` (opened, and its model loaded, now).
    ``allowed_hosts``: the Host headers answered (None: any); :func:`serve` gives the loopback names when it
    listens on loopback, so that a web page elsewhere cannot reach the server under a name of its own (DNS
    rebinding)."""
    state = WebState(index_dir, device)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()  # the uploads folder goes with the server

    app = FastAPI(
        title="camretrieval",
        version="0.1.0",
        description="Visual instance search with class-weighted CAM features: search an index with an uploaded or "
        "indexed image (optionally a box around the object) and see why each result matched.",
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.web = state
    app.add_middleware(BodyLimit)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(CamRetrievalError)
    async def user_error(request: Request, error: CamRetrievalError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log (uvicorn prints it), never to the client.
        return JSONResponse({"detail": "internal error (see the server's log)"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", response_model=Info, summary="The index: size, settings, supported options, limits")
    def info() -> dict[str, Any]:
        settings = {k: v for k, v in state.index.settings.items() if k != "weights"}
        return {
            "count": len(state.index),
            "settings": settings,
            "refinement": state.refinement,
            "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "upload_pixels": MAX_UPLOAD_PIXELS, "top": 1000},
        }

    @app.get("/api/images", response_model=ImageList, summary="List the indexed images (paged, filtered)")
    def list_images(
        q: str = Query("", description="keep the paths containing this text (case-insensitive)", max_length=200),
        offset: int = Query(0, ge=0),
        limit: int = Query(60, ge=1, le=500),
    ) -> dict[str, Any]:
        paths = state.images.paths
        if q:
            needle = q.lower()
            paths = [p for p in paths if needle in p.lower()]
        return {"total": len(paths), "offset": offset, "paths": paths[offset : offset + limit]}

    @app.get(
        "/api/images/{path:path}", summary="An indexed image, as stored", responses=_ERRORS, response_class=FileResponse
    )
    def image(path: str) -> FileResponse:
        return FileResponse(state.images.resolve(path), headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/api/thumbnails/{path:path}",
        summary="A JPEG thumbnail of an indexed image",
        responses=_ERRORS,
        response_class=Response,
    )
    def thumbnail(path: str, size: int = Query(256, description=f"longer side: one of {THUMBNAIL_SIZES}")) -> Response:
        if size not in THUMBNAIL_SIZES:
            raise RequestError(400, f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        file = state.images.resolve(path)
        data = state.thumbnails.get((path, size))
        if data is None:
            try:
                data = thumbnail_bytes(file, size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise RequestError(404, f"the indexed image cannot be read any more ({error})") from error
            state.thumbnails.put((path, size), data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post(
        "/api/search",
        response_model=list[SearchResult],
        responses=_ERRORS,
        summary="Search with an uploaded image or an indexed one (the result of `camretrieval search --json`)",
    )
    def search(
        file: UploadFile | None = File(
            None, description="the query image: JPEG, PNG, WebP, BMP or TIFF, at most 20 MB and 40 megapixels"
        ),
        path: str | None = Form(None, description="or an indexed image's path (as in the results)"),
        query_id: str | None = Form(None, description="or an earlier upload's query_id"),
        box: str | None = Form(None, description="x1,y1,x2,y2 around the object, in the query's pixels"),
        top: int = Form(10, ge=1, le=1000),
        online: bool = Form(False, description="online aggregation (needs an index with maps)"),
        rerank: int = Form(0, ge=0, description="re-rank the top R with CAM regions (needs an index with maps)"),
        qe: int = Form(0, ge=0, description="query expansion with the top K"),
        qe_alpha: float = Form(0.0, ge=0, description="alpha-QE power (0: average QE)"),
    ) -> list[dict[str, Any]]:
        data = None
        name = ""
        if file is not None:
            if path is not None or query_id is not None:
                raise RequestError(400, "give either an uploaded file, an indexed path or a query_id, not several")
            data = file.file.read(MAX_UPLOAD_BYTES + 1)
            name = PurePosixPath((file.filename or "upload").replace("\\", "/")).name[:200] or "upload"
        query, query_name, upload_id = state.query_image(path, query_id, data)
        if data is not None:
            upload_id = state.uploads.add(data, name)
            query_name = name
        parsed_box = _parse_box(box)
        options = SearchOptions(online=online, rerank=rerank, qe=qe, qe_alpha=qe_alpha)
        started = time.perf_counter()
        with state.model_lock:
            hits = state.index.search([query], [parsed_box], top, options)[0]
        return [
            {
                "query": query_name,
                "results": [{"path": hit.path, "score": hit.score} for hit in hits],
                "query_id": upload_id,
                "box": list(parsed_box) if parsed_box is not None else None,
                "seconds": time.perf_counter() - started,
            }
        ]

    def _explain(path: str | None, query_id: str | None, box: str | None, result: str) -> tuple[Explanation, float]:
        query, _, _ = state.query_image(path, query_id)
        parsed_box = _parse_box(box)
        return state.explanation((path, query_id, parsed_box, result), query, parsed_box, result)

    @app.get(
        "/api/explain",
        response_model=Explain,
        responses=_ERRORS,
        summary="Why a result matched: the query's top classes, the region that matched, overlay URLs",
    )
    def explain(
        result: str = Query(description="the result's indexed path"),
        path: str | None = Query(None, description="the query as an indexed path"),
        query_id: str | None = Query(None, description="or as an upload's query_id"),
        box: str | None = Query(None, description="the query's box x1,y1,x2,y2, as searched"),
    ) -> dict[str, Any]:
        explanation, score = _explain(path, query_id, box, result)
        record = explanation.to_dict()
        record["result"] |= {"path": result, "score": score}
        params = {k: v for k, v in {"result": result, "path": path, "query_id": query_id, "box": box}.items() if v}
        record["overlays"] = {
            side: "/api/explain/overlay?" + urlencode(params | {"side": side}) for side in ("query", "result")
        }
        return record

    @app.get(
        "/api/explain/overlay",
        responses=_ERRORS | {200: {"content": {"image/png": {}}}},
        response_class=Response,
        summary="A CAM heatmap overlay as PNG: the query (box in white) or the result (matched region in green)",
    )
    def explain_overlay(
        result: str = Query(description="the result's indexed path"),
        side: str = Query("result", pattern="^(query|result)$"),
        path: str | None = Query(None),
        query_id: str | None = Query(None),
        box: str | None = Query(None),
    ) -> Response:
        key = (path, query_id, box, result, side)
        data = state.overlays.get(key)
        if data is None:
            explanation, _ = _explain(path, query_id, box, result)
            data = png_bytes(query_overlay(explanation) if side == "query" else result_overlay(explanation))
            state.overlays.put(key, data)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    return app


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """``camretrieval serve``: open the index, load its model, and serve the page and the API until interrupted."""
    import uvicorn

    started = time.perf_counter()
    loopback = host in ("127.0.0.1", "localhost", "::1")
    # Starlette compares the Host header up to its first colon, which an IPv6 literal ("[::1]:8000") defeats.
    checked = host in ("127.0.0.1", "localhost")
    app = create_app(index_dir, device, allowed_hosts=LOOPBACK_HOSTS if checked else None)
    state: WebState = app.state.web
    if not loopback:
        print(
            f"warning: listening on {host}: anyone who can reach this machine can search the index and see its images",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {len(state.index)} images of {index_dir} (model loaded in {time.perf_counter() - started:.1f} s) "
        f"at http://{shown}:{port}/  (API: http://{shown}:{port}/openapi.json; Ctrl-C stops)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        state.close()


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
    "ClassScore",
    "Explanation",
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_PIXELS",
    "create_app",
    "decode_upload",
    "explain_figure",
    "explain_match",
    "query_overlay",
    "result_overlay",
    "serve",
    "top_class_scores",
    "write_eval_report",
]
