"""See why it matched: CAM region proposals, their pictures, and explanations of a match.

- :mod:`camretrieval.explain.proposals`: the CAM region proposals of a whole image, in its original pixels
  (METHOD.md section 5): :func:`propose_regions`, :func:`compute_region_proposals`;
- :mod:`camretrieval.explain.drawing`: pictures of them (Pillow only): :func:`heatmap_overlay`,
  :func:`draw_region_proposals`, :func:`stack_panels`, :func:`save_region_proposals_figure`;
- :mod:`camretrieval.explain.matches`: why a result matched a query (its top classes, the CAM heatmaps of its top-2
  classes over the query and the result, the result's region that matched): :func:`explain_match`,
  :func:`query_overlay`, :func:`result_overlay`, and the figure of ``camretrieval explain``: :func:`explain_figure`.
"""

from camretrieval.explain.drawing import (
    draw_region_proposals,
    font,
    heatmap_overlay,
    save_region_proposals_figure,
    stack_panels,
)
from camretrieval.explain.matches import (
    EXPLAIN_CLASSES,
    ClassScore,
    Explanation,
    class_names,
    explain_figure,
    explain_match,
    open_image_argument,
    query_overlay,
    result_overlay,
    top_class_scores,
)
from camretrieval.explain.proposals import RegionProposals, compute_region_proposals, propose_regions

__all__ = [
    "EXPLAIN_CLASSES",
    "ClassScore",
    "Explanation",
    "RegionProposals",
    "class_names",
    "compute_region_proposals",
    "draw_region_proposals",
    "explain_figure",
    "explain_match",
    "font",
    "heatmap_overlay",
    "open_image_argument",
    "propose_regions",
    "query_overlay",
    "result_overlay",
    "save_region_proposals_figure",
    "stack_panels",
    "top_class_scores",
]
