"""Evaluations of descriptor configurations on a benchmark, side by side, and the paper's tables.

Every configuration ("variant": a pooling, a number of classes, with or without PCA-whitening) of one backbone
and image size is computed from the SAME forward pass of each image: the maps are pooled once per variant, so a
table of ten rows costs one extraction, and the rows differ only in what the paper's rows differ in. PCA-whitening
is learned on another collection (the paper: Paris6k for Oxford5k and vice versa).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.datasets import RetrievalDataset
from camretrieval.evaluation.metrics import evaluate
from camretrieval.extraction.describer import Describer, check_whitening
from camretrieval.extraction.fitting import whitening_settings, whitening_shrinkage
from camretrieval.extraction.images import ImageError
from camretrieval.extraction.settings import DEFAULT_CLASSES
from camretrieval.method.aggregation import aggregate
from camretrieval.method.feature_maps import FeatureMaps
from camretrieval.method.pooling import pooled_vectors
from camretrieval.method.whitening import PCAWhitening
from camretrieval.search.index import Index
from camretrieval.search.refinement import SearchOptions


@dataclass(frozen=True)
class Variant:
    """One row of a table: how the maps are pooled (see ``descriptor.POOLINGS``), N_c for "cam", and whether the
    vectors are PCA-whitened before aggregation."""

    name: str
    pooling: str = "cam"
    n_classes: int = DEFAULT_CLASSES
    whiten: bool = True


@dataclass
class VariantResult:
    variant: Variant
    metrics: dict[str, Any]
    seconds_per_image: float  # shared decoding + forward pass, plus this variant's own pooling and aggregation
    similarity: np.ndarray | None = None  # queries x database, kept by evaluate_variants(keep_similarity=True)


class _PoolingTimer:
    """Pools a batch of maps for every variant, timing each (the cost of a variant beyond the forward pass)."""

    def __init__(self, describer: Describer, variants: Sequence[Variant]) -> None:
        self.describer = describer
        # "cam" variants differ only in N_c: the top classes are sorted, so one pass with the largest N_c serves all.
        self.cam_classes = max((v.n_classes for v in variants if v.pooling == "cam"), default=0)
        self.poolings = sorted({v.pooling for v in variants})
        self.seconds = {pooling: 0.0 for pooling in self.poolings}

    def __call__(self, maps: FeatureMaps) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Each pooling's vectors of ``maps`` and the seconds each took. Pure, so that it may run in the describer's
        worker processes: the caller adds the seconds up (:meth:`record`)."""
        pooled, seconds = {}, {}
        for pooling in self.poolings:
            started = time.perf_counter()
            backbone = self.describer.backbone
            with torch.inference_mode():
                vectors = pooled_vectors(
                    maps, pooling, backbone.classifier_weight, backbone.classifier_bias, self.cam_classes or 1,
                    self.describer.class_list,
                ).vectors
            pooled[pooling] = vectors.half()
            seconds[pooling] = time.perf_counter() - started
        return pooled, seconds

    def record(self, seconds: dict[str, float]) -> None:
        for pooling, spent in seconds.items():
            self.seconds[pooling] += spent


def _pool_files(
    describer: Describer, variants: Sequence[Variant], paths: Sequence[str], root: Path, batch_size: int | None, workers: int,
    progress: bool,
) -> tuple[dict[str, list[torch.Tensor | None]], _PoolingTimer, float, list]:
    """Every file's pooled vectors for each pooling (float16 to keep big sets in memory); None for unusable files."""
    timer = _PoolingTimer(describer, variants)
    pooled: dict[str, list[torch.Tensor | None]] = {pooling: [None] * len(paths) for pooling in timer.poolings}
    failures: list = []
    started = time.perf_counter()
    for indices, (result, spent) in describer.iterate_files(paths, root, timer, batch_size, workers, progress, failures):
        timer.record(spent)
        for pooling, vectors in result.items():
            for index, rows in zip(indices, vectors.cpu()):
                pooled[pooling][index] = rows
    return pooled, timer, time.perf_counter() - started, failures


def _pool_queries(
    describer: Describer, variants: Sequence[Variant], dataset: RetrievalDataset, progress: bool
) -> tuple[dict[str, list[torch.Tensor]], _PoolingTimer, float]:
    """Each query's pooled vectors, from its box when it has one (the maps cropped to the box, METHOD.md 4)."""
    timer = _PoolingTimer(describer, variants)
    pooled: dict[str, list[torch.Tensor]] = {pooling: [] for pooling in timer.poolings}
    started = time.perf_counter()
    for index, query in enumerate(tqdm(dataset.queries, unit="query", disable=not progress, file=sys.stderr)):
        maps = describer.image_maps(dataset.query_path(index), query.box)
        result, spent = timer(maps)
        timer.record(spent)
        for pooling, vectors in result.items():
            pooled[pooling].append(vectors[0].cpu())
    return pooled, timer, time.perf_counter() - started


def _descriptors(vectors: Sequence[torch.Tensor | None], variant: Variant, whitening: PCAWhitening | None, dim: int) -> np.ndarray:
    """D_I of each image for one variant; an unusable image gets a zero descriptor (it ranks last for every query)."""
    rows = np.zeros((len(vectors), dim), np.float32)
    count = variant.n_classes if variant.pooling == "cam" else None
    # Images of the same map shape have the same number of vectors (R-MAC regions): aggregate them together.
    by_count: dict[int, list[int]] = {}
    for i, v in enumerate(vectors):
        if v is not None:
            by_count.setdefault(len(v), []).append(i)
    for members in by_count.values():
        stacked = torch.stack([vectors[i][:count] for i in members]).float()
        rows[members] = aggregate(stacked, whitening).numpy()
    return rows


def fit_variant_whitenings(
    describer: Describer,
    variants: Sequence[Variant],
    paths: Sequence[str],
    root: Path,
    dim: int = 512,
    n_pca: int = 1,
    batch_size: int | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict[str, PCAWhitening]:
    """One PCA-whitening per pooling that a whitened variant uses, all from one pass over ``paths``: for "cam" the
    top-``n_pca`` class vectors of each image (METHOD.md 3), for a baseline its vectors (every R-MAC region)."""
    whitened = [v for v in variants if v.whiten]
    if not whitened:
        return {}
    fit_variants = [Variant(f"pca-{v.pooling}", v.pooling, n_pca) for v in whitened]
    pooled, _, _, _ = _pool_files(describer, fit_variants, paths, root, batch_size, workers, progress)
    whitenings = {}
    for pooling, vectors in pooled.items():
        usable = [v[:n_pca] if pooling == "cam" else v for v in vectors if v is not None]
        if not usable:
            raise CamRetrievalError(f"no usable images under {root} to learn the PCA-whitening from")
        settings = dataclasses.replace(describer.settings, pooling=pooling)
        shrinkage = whitening_shrinkage(dim, len(usable), n_pca, pooling)  # as fit_whitening chooses it
        whitenings[pooling] = PCAWhitening(
            dim, whitening_settings(settings, describer.backbone, n_pca, len(usable)), shrinkage
        ).fit(torch.cat(usable).float().numpy())
    return whitenings


def evaluate_variants(
    describer: Describer,
    dataset: RetrievalDataset,
    variants: Sequence[Variant],
    whitenings: dict[str, PCAWhitening],
    batch_size: int | None = None,
    workers: int = 2,
    progress: bool = True,
    keep_similarity: bool = False,
) -> list[VariantResult]:
    """Describe the dataset once with ``describer``'s backbone, size and class list (its pooling, N_c and whitening
    are the variants') and score every variant with the dataset's own protocol. ``keep_similarity`` keeps each
    variant's queries x database similarities in its result (for ``eval --report``). With a class list, the "cam"
    variants aggregate the first N_c classes of that fixed list (section 4.3) instead of each image's own."""
    pooled, timer, seconds, failures = _pool_files(
        describer, variants, dataset.images, dataset.root, batch_size, workers, progress
    )
    for failure in failures:
        print(f"{dataset.name}: database image unusable, ranked last: {failure.path}: {failure.reason}", file=sys.stderr)
    # Queries that are database images without a box are their database entry: no second extraction.
    own_queries = all(q.db_index is not None and q.box is None for q in dataset.queries)
    if own_queries:
        query_pooled, query_timer, query_seconds = None, None, 0.0
    else:
        query_pooled, query_timer, query_seconds = _pool_queries(describer, variants, dataset, progress)
    n_described = len(dataset.images) + (0 if own_queries else len(dataset.queries))
    shared = seconds + query_seconds - sum(timer.seconds.values()) - sum(query_timer.seconds.values() if query_timer else [])
    results = []
    for variant in variants:
        whitening = whitenings.get(variant.pooling) if variant.whiten else None
        if variant.whiten and whitening is None:
            raise CamRetrievalError(f"variant {variant.name} needs a PCA-whitening for pooling {variant.pooling}")
        if whitening is not None:
            check_whitening(whitening, dataclasses.replace(describer.settings, pooling=variant.pooling))
        dim = whitening.dim_ if whitening is not None else _channels(pooled[variant.pooling])
        started = time.perf_counter()
        database = _descriptors(pooled[variant.pooling], variant, whitening, dim)
        if own_queries:
            queries = database[[q.db_index for q in dataset.queries]]
        else:
            queries = _descriptors(query_pooled[variant.pooling], variant, whitening, dim)
        own = timer.seconds[variant.pooling] + (query_timer.seconds[variant.pooling] if query_timer else 0.0)
        own += time.perf_counter() - started
        similarity = queries @ database.T
        metrics = evaluate(dataset, similarity)
        results.append(VariantResult(variant, metrics, (shared + own) / n_described, similarity if keep_similarity else None))
    return results


def evaluate_refinement(
    index: Index,
    dataset: RetrievalDataset,
    options: SearchOptions,
    variant: Variant,
    progress: bool = True,
) -> VariantResult:
    """Score query-time refinement (``eval --refine``, ``--online``, ``--rerank R``, ``--qe K``: ``options``) with the
    dataset's own protocol, through the same :meth:`Index.rank` that ``search`` runs, on ``index``: an index of the
    dataset's database images (``Index.build`` of ``dataset.root``; images it skipped as unusable are ranked last,
    as :func:`evaluate_variants` ranks them; a query that cannot be read is reported and scored on the database
    order). A query that is a database image is left out of its own ranking and of
    its expansion (its ground truth holds it as junk). ``seconds_per_image`` is the mean refinement time per query,
    its description included."""
    if any(Path(path).is_absolute() for path in dataset.images):
        raise CamRetrievalError("query-time refinement is evaluated on one folder of images: not with --distractors")
    position = {path: i for i, path in enumerate(dataset.images)}
    unknown = [path for path in index.paths if path not in position]
    if unknown:
        raise CamRetrievalError(f"the index holds images that {dataset.name} does not list, e.g. {unknown[0]}")
    in_dataset = np.array([position[path] for path in index.paths], dtype=np.int64)
    in_index = {int(d): i for i, d in enumerate(in_dataset)}
    similarity = np.full((len(dataset.queries), len(dataset.images)), -np.inf)
    started = time.perf_counter()
    for row, query in enumerate(tqdm(dataset.queries, desc="queries", unit="query", disable=not progress)):
        own = in_index.get(query.db_index) if query.db_index is not None else None
        try:
            description = index.describe_query(dataset.query_path(row), query.box, options)
        except ImageError as error:  # its row stays all -inf: the database order, as a plain eval's empty descriptor
            print(f"{dataset.name}: query unusable, scored on no ranking: {query.path}: {error}", file=sys.stderr)
            continue
        ranking = index.rank(description, options, exclude=[own] if own is not None else [])
        # the ranking's order as similarities: first best; the excluded and the unusable after every ranked image
        similarity[row, in_dataset[ranking.ids]] = -np.arange(len(ranking.ids), dtype=np.float64)
    seconds = (time.perf_counter() - started) / max(1, len(dataset.queries))
    return VariantResult(variant, evaluate(dataset, similarity), seconds, similarity)


def _channels(vectors: Sequence[torch.Tensor | None]) -> int:
    for v in vectors:
        if v is not None:
            return v.shape[-1]
    raise CamRetrievalError("no usable images to evaluate")


def result_record(result: VariantResult, settings: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready record: the metrics (per-query AP with None for skipped queries), the settings, seconds/image."""
    record: dict[str, Any] = {"variant": result.variant.name}
    for key, value in result.metrics.items():
        if isinstance(value, np.ndarray):
            value = [None if np.isnan(x) else float(x) for x in value.tolist()]
        elif isinstance(value, (np.floating, float)):
            value = float(value)
        record[key] = value
    record["settings"] = settings | asdict(result.variant)
    record["seconds_per_image"] = result.seconds_per_image
    return record


# --- the paper's tables (METHOD.md section 7) ---

PAPER_ROWS = {  # Oxford5k / Paris6k, VGG-16-CAM, 512-d
    "Raw": (".396", ".526"),
    "Raw + CroW + PCA": (".607", ".685"),
    "64 CAMs (OfA)": (".712", ".805"),
}


def table_1a_variants() -> list[Variant]:
    return [
        Variant("Raw", "sum", whiten=False),
        Variant("Raw + CroW", "crow", whiten=False),
        Variant("Raw + PCA", "sum"),
        Variant("Raw + CroW + PCA", "crow"),
        Variant("64 CAMs (OfA)", "cam", 64),
    ]


def table_1b_variants() -> list[Variant]:
    return [Variant(f"N_c = {n}", "cam", n) for n in (1, 8, 32, 64)]


def table_2_variants() -> list[Variant]:
    return [
        Variant("SPoC (sum) + PCA", "sum"),
        Variant("MAC + PCA", "mac"),
        Variant("GeM (p=3) + PCA", "gem"),
        Variant("R-MAC", "rmac"),
        Variant("CroW + PCA", "crow"),
        Variant("OfA, 64 CAMs", "cam", 64),
    ]


def markdown_table(title: str, results: Sequence[VariantResult], paper_column: int | None = None) -> str:
    revisited = "map_medium" in results[0].metrics
    header = "| row | mAP |" + (" Easy | Medium | Hard |" if revisited else "") + " s / image |"
    if paper_column is not None:
        header += f" paper ({('Oxford5k', 'Paris6k')[paper_column]}, VGG-16-CAM) |"
    lines = [f"**{title}**", "", header, "|" + "---|" * (header.count("|") - 1)]
    for result in results:
        m = result.metrics
        cells = [result.variant.name, f"{m['map']:.3f}"]
        if revisited:
            cells += [f"{m['map_easy']:.3f}", f"{m['map_medium']:.3f}", f"{m['map_hard']:.3f}"]
        cells.append(f"{result.seconds_per_image:.3f}")
        if paper_column is not None:
            cells.append(PAPER_ROWS.get(result.variant.name, ("", ""))[paper_column])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
