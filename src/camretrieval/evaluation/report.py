"""The HTML report of ``camretrieval eval --report DIR``: :func:`write_eval_report` writes the metrics (named in words,
:func:`metric_name`), the settings, the mAP of each label (:func:`label_average_precisions`), a precision-recall plot
(inline SVG, :func:`pr_curve_svg`), for a few queries the query, the CAM heatmap of its top-2 classes
(:mod:`camretrieval.explain`) and its top results with their scores, and a sortable table of each query's AP. The page
is self-contained: one inline script (the table sorting), nothing loaded from another site.
"""

from __future__ import annotations

import html
import math
import re
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


# --- plain names of the record's metrics -------------------------------------------------------------------------

_SETUP_NAMES = {"easy": "Easy", "medium": "Medium", "hard": "Hard"}
_AP_KEY = re.compile(r"^(map|mp@(\d+))(?:_(easy|medium|hard))?$")
_OTHER_NAMES = {
    "ns_score": "N-S score (images of the query's group in its top 4, out of 4)",
    "seconds_per_image": "seconds per image (decoding, network, pooling and aggregation)",
}


def metric_name(key: str) -> str:
    """A metric of ``eval --json`` in words: ``map`` -> "mean average precision (mAP)", ``mp@5`` -> "mean precision
    at 5 (mP@5)", ``map_hard`` -> "mean average precision, Hard setup (mAP Hard)"; an unknown key with spaces."""
    match = _AP_KEY.match(key)
    if match is None:
        return _OTHER_NAMES.get(key, key.replace("_", " "))
    base, k, setup = match.groups()
    name, short = ("mean average precision", "mAP") if base == "map" else (f"mean precision at {k}", f"mP@{k}")
    if setup is None:
        return f"{name} ({short})"
    return f"{name}, {_SETUP_NAMES[setup]} setup ({short} {_SETUP_NAMES[setup]})"


def label_average_precisions(dataset: RetrievalDataset, aps: Sequence[float | None]) -> list[tuple[str, int, float | None]]:
    """(label, queries, mean AP over those with an AP) for each label that queries share, in order of first
    appearance; empty when the queries have no labels, or each its own (a classic Oxford query id, say)."""
    labels = [query.label for query in dataset.queries]
    if not labels or any(label is None for label in labels) or len(set(labels)) == len(labels):
        return []
    groups: dict[str, list[int]] = {}
    for q, label in enumerate(labels):
        groups.setdefault(str(label), []).append(q)
    rows = []
    for label, members in groups.items():
        scored = [aps[q] for q in members if q < len(aps) and aps[q] is not None]
        rows.append((label, len(members), float(np.mean(scored)) if scored else None))
    return rows


# --- pictures ------------------------------------------------------------------------------------------------------


def _thumbnail(picture: Image.Image, side: int) -> tuple[Image.Image, float]:
    """A copy at most ``side`` px on its longer side, and the scale from the picture's pixels to the copy's."""
    thumb = picture.copy()
    thumb.thumbnail((side, side))
    return thumb, thumb.width / picture.width


def draw_outlined_box(picture: Image.Image, box: Sequence[float], scale: float = 1.0) -> None:
    """Draw ``box`` (x1, y1, x2, y2, times ``scale``) on ``picture`` as a white line 3 px wide between two dark
    ones 2 px wide: it shows on a white sky as on a black night."""
    x1, y1, x2, y2 = (v * scale for v in box)
    draw = ImageDraw.Draw(picture)
    draw.rectangle((x1 - 3, y1 - 3, x2 + 3, y2 + 3), outline=(0, 0, 0), width=7)
    draw.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(255, 255, 255), width=3)


# --- the page ------------------------------------------------------------------------------------------------------

_REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; padding: 0 16px; color: #222; max-width: 1200px; }
nav { font-size: 14px; margin: -6px 0 12px; } nav a { margin-right: 12px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0 20px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th button { font: inherit; font-weight: 700; border: none; background: none; padding: 0; cursor: pointer; color: inherit; }
th button::after { content: " \\2195"; color: #999; font-weight: 400; }
th[aria-sort=ascending] button::after { content: " \\2191"; color: #222; }
th[aria-sort=descending] button::after { content: " \\2193"; color: #222; }
tr:target, .example:target { background: #fff6d5; }
.bar { display: inline-block; height: 10px; background: #4a90d9; vertical-align: middle; }
svg.pr-curve { max-width: 100%; height: auto; }
.example { margin: 18px 0; padding: 10px; border: 1px solid #ddd; border-radius: 6px; }
.example h3 { margin-top: 0; } .example h3 a { font-size: 13px; font-weight: 400; }
.row { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
figure { margin: 0; font-size: 12px; max-width: 220px; overflow-wrap: anywhere; }
figure img { display: block; max-width: 100%; }
.score { font-weight: 600; font-variant-numeric: tabular-nums; }
.pos { color: #1e8e3e; } .neg { color: #c0392b; } .junk { color: #888; }
.hint { color: #666; font-size: 13px; }
"""

# Click a column's heading to sort the table by it (again: the other way); "n/a" stays last. No external script.
_SORT_SCRIPT = """
document.querySelectorAll("table.sortable").forEach((table) => {
  const headings = [...table.tHead.rows[0].cells];
  headings.forEach((heading, column) => {
    const button = heading.querySelector("button");
    if (!button) return;
    button.addEventListener("click", () => {
      const ascending = heading.getAttribute("aria-sort") !== "ascending";
      headings.forEach((h) => h.removeAttribute("aria-sort"));
      heading.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const numeric = heading.dataset.sort === "number";
      const value = (row) => {
        const cell = row.cells[column];
        const text = cell.dataset.value ?? cell.textContent.trim();
        return numeric ? (text === "" ? NaN : Number(text)) : text;
      };
      const rows = [...table.tBodies[0].rows];
      rows.sort((a, b) => {
        const x = value(a), y = value(b);
        if (numeric) {
          if (Number.isNaN(x) || Number.isNaN(y)) return Number.isNaN(x) - Number.isNaN(y);
          return ascending ? x - y : y - x;
        }
        return ascending ? x.localeCompare(y, undefined, {numeric: true}) : y.localeCompare(x, undefined, {numeric: true});
      });
      table.tBodies[0].append(...rows);
    });
  });
});
"""


def _sortable_head(columns: Sequence[tuple[str, str | None]]) -> str:
    """A sortable table's heading: (title, "number" | "text" | None for a column that does not sort)."""
    cells = [
        f'<th data-sort="{kind}"><button type="button">{html.escape(title)}</button></th>'
        if kind
        else f"<th>{html.escape(title)}</th>"
        for title, kind in columns
    ]
    return f'<div class="table-wrap"><table class="sortable"><thead><tr>{"".join(cells)}</tr></thead><tbody>'


def _ap_cells(ap: float | None) -> str:
    if ap is None:
        return '<td class="num" data-value="">n/a</td><td></td>'
    return (
        f'<td class="num" data-value="{ap:.6f}">{ap:.4f}</td>'
        f'<td><span class="bar" style="width:{ap * 200:.0f}px"></span></td>'
    )


def write_eval_report(
    directory: str | Path,
    dataset: RetrievalDataset,
    result: VariantResult,
    record: dict[str, Any],
    describer: Describer,
    examples: int = REPORT_EXAMPLES,
    top: int = REPORT_TOP,
) -> Path:
    """Write ``index.html`` (and its pictures under ``images/``) into ``directory``: the metrics (in words), the
    settings, the mAP of each label (for sets whose queries share labels), a precision-recall plot (inline SVG), for a
    few queries (the worst and the best by AP) the query, the CAM heatmap of its top-2 classes and its top results
    (the query itself left out) with their scores, green-bordered when positive, red when negative, grey when junk,
    and a sortable table of every query's AP whose rows link to those examples. One self-contained page: its only
    script is inline, and it loads nothing from elsewhere. ``result.similarity`` (queries x database) must be kept:
    ``evaluate_variants(keep_similarity=True)``."""
    similarity = getattr(result, "similarity", None)
    if similarity is None:
        raise CamRetrievalError("the report needs the similarity matrix: evaluate with keep_similarity=True")
    directory = Path(directory)
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    aps = [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in record.get("aps", [])]
    similarity = np.asarray(similarity, dtype=np.float64)
    rankings = np.argsort(-similarity, axis=1, kind="stable")
    curves, relevance = [], []
    for q, entry in enumerate(dataset.gnd):
        positives, junk = _relevance(entry, dataset.protocol)
        relevance.append((positives, junk))
        if positives:
            curves.append(precision_recall(rankings[q], positives, junk))
    label_rows = label_average_precisions(dataset, aps)
    scored = [q for q, ap in enumerate(aps) if ap is not None]
    order = sorted(scored, key=lambda q: aps[q])  # type: ignore[arg-type, return-value]
    worst = order[: (examples + 1) // 2]
    best = [q for q in reversed(order) if q not in worst][: examples // 2]
    shown = {q: f"worst {i}" for i, q in enumerate(worst, start=1)} | {q: f"best {i}" for i, q in enumerate(best, start=1)}

    name = html.escape(dataset.name)
    sections = [("results", "Results")] + ([("labels", "mAP per label")] if label_rows else [])
    sections += [("precision-recall", "Precision-recall")] + ([("examples", "Examples")] if shown else [])
    sections.append(("queries", "AP per query"))
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>camretrieval eval: {name}</title><style>{_REPORT_STYLE}</style></head><body>",
        f"<h1>{name}: {html.escape(result.variant.name)}</h1>",
        "<nav>" + "".join(f'<a href="#{anchor}">{title}</a>' for anchor, title in sections) + "</nav>",
        f"<p>{len(dataset.images)} database images, {len(dataset.queries)} queries, "
        f"protocol {html.escape(dataset.protocol)}.</p>",
        '<h2 id="results">Results</h2>',
        '<div class="table-wrap"><table class="metrics"><tr><th>metric</th><th>value</th></tr>',
    ]
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(
                f'<tr title="{html.escape(key)} in eval --json"><td>{html.escape(metric_name(key))}</td>'
                f'<td class="num">{value:.4f}</td></tr>'
            )
    parts.append("</table></div>")
    settings = record.get("settings", {})
    parts.append('<div class="table-wrap"><table><tr><th>setting</th><th>value</th></tr>')
    parts += [f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in settings.items()]
    parts.append("</table></div>")
    if label_rows:
        parts.append('<h2 id="labels">Mean average precision per label</h2>')
        parts.append(
            '<p class="hint">Each label\'s queries (its images, each queried against all the others), their mean AP. '
            "Click a heading to sort.</p>"
        )
        parts.append(_sortable_head([("label", "text"), ("queries", "number"), ("mAP", "number"), ("", None)]))
        for label, count, label_map in label_rows:
            parts.append(
                f'<tr><td>{html.escape(label)}</td><td class="num" data-value="{count}">{count}</td>'
                f"{_ap_cells(label_map)}</tr>"
            )
        parts.append("</tbody></table></div>")
    parts.append('<h2 id="precision-recall">Precision-recall</h2>')
    parts.append(
        pr_curve_svg(curves, f"{dataset.name}: {len(curves)} queries, mAP {record.get('map', float('nan')):.3f}")
    )
    if shown:
        parts.append('<h2 id="examples">Examples</h2>')
        parts.append(
            "<p>The worst and the best queries by AP: the query (its box in white), the heatmap of its top-2 classes, "
            "and its top results with their cosine similarity to the query (the query itself left out): "
            '<span class="pos">green: positive</span>, <span class="neg">red: negative</span>, '
            '<span class="junk">grey: junk (not counted)</span>.</p>'
        )
    for q in worst + best:
        parts.append(
            _report_example(
                q, shown[q], dataset, rankings[q], similarity[q], relevance[q], aps[q], describer, images_dir, top
            )
        )
    parts.append('<h2 id="queries">Average precision per query</h2>')
    parts.append('<p class="hint">Click a heading to sort; the queries shown above link to their example.</p>')
    names = record.get("query_names") or [query.name for query in dataset.queries]
    columns: list[tuple[str, str | None]] = [("#", "number"), ("query", "text")]
    columns += [("label", "text")] if label_rows else []
    columns += [("AP", "number"), ("", None), ("example", "text")]
    parts.append(_sortable_head(columns))
    for q, ap in enumerate(aps):
        query_cell = html.escape(str(names[q]))
        example = ""
        if q in shown:
            query_cell = f'<a href="#example-{q}">{query_cell}</a>'
            example = f'<a href="#example-{q}">{shown[q]}</a>'
        label = f"<td>{html.escape(str(dataset.queries[q].label))}</td>" if label_rows else ""
        parts.append(
            f'<tr id="query-{q}"><td class="num" data-value="{q}">{q}</td><td>{query_cell}</td>{label}'
            f"{_ap_cells(ap)}<td>{example}</td></tr>"
        )
    parts.append("</tbody></table></div>")
    parts.append(f"<script>{_SORT_SCRIPT}</script></body></html>")
    page = directory / "index.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    return page


def _query_itself(dataset: RetrievalDataset, q: int) -> set[int]:
    """The database indices of query ``q``'s own image (its db_index, or the same file), left out of its results."""
    query = dataset.queries[q]
    own = {query.db_index} if query.db_index is not None else set()
    return own | {i for i, path in enumerate(dataset.images) if path == query.path}


def _report_example(
    q: int,
    title: str,
    dataset: RetrievalDataset,
    ranking: np.ndarray,
    scores: np.ndarray,
    relevance: tuple[set[int], set[int]],
    ap: float | None,
    describer: Describer,
    images_dir: Path,
    top: int,
) -> str:
    query = dataset.queries[q]
    positives, junk = relevance
    query_path = dataset.query_path(q)
    ap_text = "n/a" if ap is None else f"{ap:.3f}"
    parts = [
        f'<div class="example" id="example-{q}"><h3>{html.escape(title)}: query {q}, {html.escape(query.name)} '
        f'(AP {ap_text}) <a href="#query-{q}">its row in the table</a></h3><div class="row">'
    ]
    try:
        picture = describer.load(query_path)
        classes = top_class_scores(describer, picture, query.box, PROPOSAL_CLASSES)
        proposals = compute_region_proposals(describer, picture, classes=[c.index for c in classes])
        overlay = heatmap_overlay(proposals)
        for suffix, image in (("query", picture), ("cam", overlay)):
            thumb, scale = _thumbnail(image, 220)
            if query.box is not None:
                draw_outlined_box(thumb, query.box, scale)
            thumb.save(images_dir / f"q{q}_{suffix}.jpg", quality=90)
        caption = " + ".join(html.escape(c.name) for c in classes)
        parts.append(f'<figure><img src="images/q{q}_query.jpg" alt="query"><figcaption>query</figcaption></figure>')
        parts.append(
            f'<figure><img src="images/q{q}_cam.jpg" alt="CAM"><figcaption>CAM: {caption}</figcaption></figure>'
        )
    except CamRetrievalError as error:
        parts.append(f"<p>query image unusable: {html.escape(str(error))}</p>")
    parts.append('</div><div class="row">')
    own = _query_itself(dataset, q)
    results = [i for i in ranking[: top + len(own)].tolist() if i not in own][:top]
    words = {"pos": "positive", "neg": "negative", "junk": "junk"}
    for rank, i in enumerate(results, start=1):
        kind = "pos" if i in positives else "junk" if i in junk else "neg"
        colour = {"pos": (30, 170, 60), "neg": (210, 40, 40), "junk": (150, 150, 150)}[kind]
        target = images_dir / f"q{q}_r{rank}.jpg"
        try:
            with Image.open(dataset.image_path(i)) as image:
                image.draft("RGB", (300, 300))
                thumb, _ = _thumbnail(to_rgb(image), 150)
            ImageOps.expand(thumb, border=5, fill=colour).save(target, quality=85)
            img = f'<img src="images/{target.name}" alt="{words[kind]}">'
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            img = f"<p>unreadable: {html.escape(str(error))}</p>"
        parts.append(
            f'<figure class="{kind}" data-index="{i}">{img}<figcaption>{rank}. <span class="{kind}">{words[kind]}</span> '
            f'<span class="score">{float(scores[i]):.3f}</span><br>{html.escape(dataset.images[i])}</figcaption></figure>'
        )
    parts.append("</div></div>")
    return "\n".join(parts)


__all__ = [
    "REPORT_EXAMPLES",
    "REPORT_TOP",
    "draw_outlined_box",
    "label_average_precisions",
    "metric_name",
    "pr_curve_svg",
    "write_eval_report",
]
