"""A page of search results that one file holds (``camretrieval search --html``): open it in any browser, mail it,
keep it; no server, script or network.

For each query: its picture with its box, its top classes, the refinement used; then the ranked results, each a
thumbnail with its rank, score and path, linking to the full image file (a ``file://`` link to the indexed folder).
The first ``explain_top`` results of each query also show why they matched (:func:`~camretrieval.explain.matches.
explain_match`: the heatmap of the query's top-2 classes over the result, its CAM region proposals and the region
that matched, with its score), and the query's own heatmap is shown beside it. An explanation costs four forward
passes (0.15 s at size 256 on 2 CPU cores), so only the first few results get one: the page of ``camretrieval
serve`` explains any result on demand. Pictures are embedded as JPEG data URIs.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from camretrieval.errors import CamRetrievalError
from camretrieval.explain.matches import explain_match, query_overlay, result_overlay
from camretrieval.extraction.images import load_image

if TYPE_CHECKING:  # annotations only
    from camretrieval.method.regions import Box
    from camretrieval.search.index import Index, SearchHit
    from camretrieval.search.refinement import SearchOptions

THUMBNAIL_SIDE = 200  # longer side of a result's thumbnail, in pixels
QUERY_SIDE = 320  # longer side of the query's picture
EXPLANATION_SIDE = 320  # longer side of an explanation's overlays
BOX_COLOUR = (255, 255, 255)


@dataclass
class QueryResults:
    """One query of a search and its ranked results: ``query`` as given (a path), its ``box`` (original pixels) or
    None, and its hits, best first."""

    query: str
    box: Box | None
    hits: list[SearchHit]


def describe_refinement(options: SearchOptions, n_classes: int) -> str:
    """The query-time refinement of ``options`` in words, e.g. "online aggregation (N_c = 8), then re-ranking of the
    top 100 with CAM regions (N_re = 6)"."""
    top = options.online_top_or_default
    steps = [
        f"online aggregation (N_c = {options.online_n_classes(n_classes)}"
        + (", unwhitened" if not options.online_whitening else "")
        + (f", of at most the first {top} of plain search)" if top else ")")
        if options.online
        else f"offline aggregation (N_c = {n_classes})"
    ]
    if options.rerank:
        steps.append(f"re-ranking of the top {options.rerank} with CAM regions (N_re = {options.rerank_classes})")
    if options.qe:
        gate = options.qe_gate_or_default
        steps.append(
            (f"alpha-query expansion with the top {options.qe} (alpha = {options.qe_alpha:g})" if options.qe_alpha
             else f"query expansion with the top {options.qe}")
            + (f" that are {gate}-reciprocal neighbours of the query (none: no expansion)" if gate else "")
        )
    return ", then ".join(steps)


def _data_uri(picture: Image.Image, quality: int = 85) -> str:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _fitted(picture: Image.Image, side: int) -> tuple[Image.Image, float]:
    scale = min(1.0, side / max(picture.size))
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.LANCZOS), scale


def _query_picture(path: str, box: Box | None) -> Image.Image:
    picture, scale = _fitted(load_image(path), QUERY_SIDE)
    if box is not None:
        draw = ImageDraw.Draw(picture)
        scaled = [v * scale for v in box]
        draw.rectangle(scaled, outline=(0, 0, 0), width=5)
        draw.rectangle(scaled, outline=BOX_COLOUR, width=3)
    return picture


def _file_link(path: Path) -> str:
    return path.resolve().as_uri()


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 0 0 .4em; word-break: break-all; }
.meta { color: #555; margin: 0 0 1.5em; max-width: 70em; } .meta code { background: #eee; padding: 0 .3em; }
section.query { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1em; margin: 0 0 1.5em; }
.head { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; margin-bottom: 1em; }
figure { margin: 0; } figcaption { font-size: 12px; color: #555; max-width: 320px; }
.head img { border: 1px solid #ccc; } .classes { margin: .3em 0; padding-left: 1.6em; }
.results { display: flex; flex-wrap: wrap; gap: .8em; align-items: flex-start; }
.hit { width: 212px; border: 1px solid #ddd; border-radius: 4px; padding: 5px; background: #fff; }
.hit:has(details[open]) { width: 332px; }
.hit img { display: block; max-width: 100%; } .thumb { height: 200px; display: flex; align-items: center; }
.caption { font-size: 12px; margin-top: 4px; word-break: break-all; }
.rank { font-weight: bold; } .score { font-variant-numeric: tabular-nums; color: #0a5; }
.missing { height: 200px; display: flex; align-items: center; justify-content: center; color: #a00; background: #fee; }
p.missing { height: auto; padding: 4px; } details { margin-top: 4px; } summary { cursor: pointer; color: #06c; }
"""


def _class_list_html(classes) -> str:
    items = "".join(
        f"<li>{html.escape(c.name.split(',')[0])} <span class='score'>{100 * c.probability:.1f}%</span></li>"
        for c in classes
    )
    return f"<ol class='classes'>{items}</ol>"


def _hit_html(rank: int, hit: SearchHit, root: Path | None, explanation_html: str) -> str:
    file = root / hit.path if root is not None else None
    caption = (
        f"<div class='caption'><span class='rank'>{rank}.</span> <span class='score'>{hit.score:.3f}</span> "
        f"{html.escape(hit.path)}</div>"
    )
    if file is None or not file.is_file():
        picture = "<div class='missing'>image not found</div>"
    else:
        try:
            thumbnail, _ = _fitted(load_image(file), THUMBNAIL_SIDE)
            picture = (
                f"<a class='thumb' href='{html.escape(_file_link(file))}' title='open the full image'>"
                f"<img src='{_data_uri(thumbnail)}' alt='{html.escape(hit.path)}'></a>"
            )
        except CamRetrievalError as error:
            picture = f"<div class='missing'>{html.escape(str(error))}</div>"
    return f"<div class='hit'>{picture}{caption}{explanation_html}</div>"


def write_results_page(
    path: str | Path,
    index: Index,
    results: Sequence[QueryResults],
    options: SearchOptions,
    explain_top: int = 3,
    index_dir: str | Path | None = None,
) -> Path:
    """Write the page of ``results`` (searched in ``index`` with ``options``) to ``path``; returns it. The first
    ``explain_top`` results of each query show why they matched (see the module docstring)."""
    path = Path(path)
    root = index.image_root
    describer = index.describer if explain_top > 0 and results else None
    sections = []
    for entry in results:
        query_heatmap, classes = "", None
        hits_html = []
        for rank, hit in enumerate(entry.hits, start=1):
            explanation_html = ""
            if describer is not None and rank <= explain_top and root is not None and (root / hit.path).is_file():
                try:
                    explanation = explain_match(
                        describer, entry.query, root / hit.path, entry.box, region_classes=options.rerank_classes
                    )
                except CamRetrievalError as error:
                    explanation_html = f"<p class='missing'>no explanation: {html.escape(str(error))}</p>"
                else:
                    classes = classes or explanation.classes
                    if not query_heatmap:
                        overlay = query_overlay(explanation, EXPLANATION_SIDE)
                        query_heatmap = (
                            f"<figure><img src='{_data_uri(overlay)}' alt='heatmap of the query'><figcaption>the "
                            "query's top-2 classes (CAM heatmap)</figcaption></figure>"
                        )
                    overlay = result_overlay(explanation, EXPLANATION_SIDE)
                    where = "the whole image" if explanation.region_is_whole_image else "the green region"
                    explanation_html = (
                        f"<details><summary>why it matched</summary><figure>"
                        f"<img src='{_data_uri(overlay)}' alt='why it matched'><figcaption>the heatmap of the "
                        f"query's top-2 classes on this image; grey: its CAM region proposals; {where} matched the "
                        f"query best (similarity {explanation.region_score:.3f})</figcaption></figure></details>"
                    )
            hits_html.append(_hit_html(rank, hit, root, explanation_html))
        try:
            query_picture = f"<img src='{_data_uri(_query_picture(entry.query, entry.box))}' alt='query'>"
        except CamRetrievalError as error:
            query_picture = f"<div class='missing'>{html.escape(str(error))}</div>"
        box_text = f"box {', '.join(f'{v:g}' for v in entry.box)}" if entry.box is not None else "whole image"
        head = (
            f"<div class='head'><figure>{query_picture}<figcaption>query ({box_text})</figcaption></figure>"
            f"{query_heatmap}<div>"
            + (f"<div>its top classes:</div>{_class_list_html(classes)}" if classes else "")
            + "</div></div>"
        )
        sections.append(
            f"<section class='query'><h2>{html.escape(entry.query)}</h2>{head}"
            f"<div class='results'>{''.join(hits_html) or '<p>no results</p>'}</div></section>"
        )
    settings = index.settings
    name = Path(index_dir).name if index_dir is not None else "index"
    meta = (
        f"<p class='meta'>index <code>{html.escape(str(index_dir or ''))}</code>: {len(index)} images under "
        f"<code>{html.escape(str(root) if root is not None else 'an unrecorded folder')}</code>; "
        f"{html.escape(str(settings.get('backbone')))}, {settings.get('size')} px, pooling "
        f"{html.escape(str(settings.get('pooling')))}. Ranked by "
        f"{html.escape(describe_refinement(options, index.n_classes))}. Click a picture for the full image"
        + (f"; the first {explain_top} results of each query show why they matched" if explain_top else "")
        + f". Written {time.strftime('%Y-%m-%d %H:%M')}.</p>"
    )
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>camretrieval: {len(results)} {'query' if len(results) == 1 else 'queries'} in {html.escape(name)}"
        f"</title><style>{_STYLE}</style></head><body><h1>Search results</h1>{meta}{''.join(sections)}</body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
