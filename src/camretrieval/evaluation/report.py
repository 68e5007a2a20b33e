"""The HTML report of ``camretrieval eval --report DIR``: :func:`write_eval_report` writes the metrics, the settings,
each query's AP, a precision-recall plot (inline SVG, :func:`pr_curve_svg`) and, for a few queries, the query, the CAM
heatmap of its top-2 classes (:mod:`camretrieval.explain`) and its top results.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.metrics import mean_interpolated_precision, precision_recall
from camretrieval.explain import compute_region_proposals, heatmap_overlay, top_class_scores
from camretrieval.extraction.images import to_rgb
from camretrieval.method.regions import PROPOSAL_CLASSES

if TYPE_CHECKING:  # annotations only
    from camretrieval.evaluation.datasets import RetrievalDataset
    from camretrieval.evaluation.runner import VariantResult
    from camretrieval.extraction.describer import Describer

REPORT_EXAMPLES = 6  # queries shown with their CAM and top results: the worst half and the best half by AP
REPORT_TOP = 8  # results shown per example query


def _relevance(entry: dict[str, np.ndarray], protocol: str) -> tuple[set[int], set[int]]:
    """(positives, junk) of a query's ground truth; revisited sets: the Medium setup (Easy + Hard positive)."""
    if protocol == "revisited":
        positives = set(np.asarray(entry["easy"]).tolist()) | set(np.asarray(entry["hard"]).tolist())
    else:
        positives = set(np.asarray(entry["ok"]).tolist())
    return positives, set(np.asarray(entry.get("junk", [])).tolist())


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


__all__ = ["REPORT_EXAMPLES", "REPORT_TOP", "pr_curve_svg", "write_eval_report"]
