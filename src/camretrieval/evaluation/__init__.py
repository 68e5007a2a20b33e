"""Scoring retrieval on benchmarks: data sets and their protocols, the metrics, the runner that evaluates many
configurations from one extraction (``camretrieval eval`` and ``tables``), and the HTML report.

- :mod:`~camretrieval.evaluation.datasets`: Oxford/Paris (classic and revisited), UKBench, Holidays, label folders;
- :mod:`~camretrieval.evaluation.metrics`: average precision, revisitop's ``compute_map``, Easy/Medium/Hard, N-S;
- :mod:`~camretrieval.evaluation.runner`: :func:`evaluate_variants`, the paper's table rows;
- :mod:`~camretrieval.evaluation.report`: the page of ``camretrieval eval --report``.
"""

from camretrieval.evaluation.datasets import RetrievalDataset, image_folder, load_dataset
from camretrieval.evaluation.metrics import average_precision, compute_map, evaluate
from camretrieval.evaluation.runner import Variant, VariantResult, evaluate_variants

__all__ = [
    "RetrievalDataset",
    "Variant",
    "VariantResult",
    "average_precision",
    "compute_map",
    "evaluate",
    "evaluate_variants",
    "image_folder",
    "load_dataset",
]
