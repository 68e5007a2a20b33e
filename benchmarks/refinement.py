"""Query-time refinement measured: mAP and per-query latency of OfA, OnA, re-ranking with CAM regions and query
expansion (METHOD.md sections 3 and 5) on clutter-dev box queries.

Setup (as the issue asks): efficientnet_lite0 at --size 448; PCA-whitening learned on all of eth80-dev at the same
size (512-d, N_pca = 1); the index is clutter-dev (400 images of 40 objects pasted in cluttered scenes) with its
maps stored; every image is a query with its boxes.json box; positives are the other 9 views of the same object;
the query's own image is excluded from the ranking (and so from re-ranking and query expansion) and from the AP.

Latency is per query on this machine with ``--threads`` torch threads (default 1: on a shared 2-core machine, two
OpenMP threads competing with other processes slow the small matrix products down 10-20x; one thread measures the
method, not the contention): the query's forward pass (one, shared by every method: the class vectors of its top-64
classes, from which any N_c <= 64 is sliced) plus the method's own stages. Each stage is timed separately and the
stages of a pipeline are added, so that the expensive stages (OnA over the whole database) run once per query for
all the QE variants built on them.

``--ablations`` adds rows that depart from the paper, to see what limits OnA and re-ranking on this set: no
PCA-whitening (the whitening is learned on eth80-dev's plain backgrounds), the query's classes taken from the whole
image instead of its box, and the query described by forwarding the cropped box (at the database's scale, as
cirtorch does) instead of cropping the whole image's maps.

``--distractors DIR`` adds every image under DIR to the database (``benchmarks/make_distractors.py`` makes 4 600 of
them for a 5 000-image index): the index is then built over a folder of links, ``clutter-dev/...`` and
``distractors/...``; queries are still clutter-dev's images with their boxes; a distractor is a negative for every
query, except that distractors under a folder named like the query's object are ignored for it (junk: eth80-dev holds
clutter-dev's very objects). Bytes stored per image are printed from the index folder's files.

    python benchmarks/refinement.py [--data ../shared/data] [--workdir /tmp/camretrieval-refinement] [--queries 400]
        [--rerank 100 1000] [--online-classes 8 64] [--distractors DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camretrieval import Describer, Index, PCAWhitening, fit_whitening, load_backbone
from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.metrics import average_precision, labels_mean_average_precision
from camretrieval.extraction.images import find_images, load_image, preprocess
from camretrieval.method.aggregation import aggregate
from camretrieval.method.cell_major import online_class_vectors
from camretrieval.search.online import online_descriptors
from camretrieval.search.refinement import QueryDescription, Ranking, SearchOptions
from camretrieval.search.reranking import region_scores, rerank_order

QE_VARIANTS = [("", 0, 0.0), (" + QE2", 2, 0.0), (" + QE5", 5, 0.0), (" + aQE5 (a=3)", 5, 3.0)]


def prepare(args: argparse.Namespace) -> Index:
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.backbone)
    pca_file = workdir / f"pca_eth80_{args.backbone}_{args.size}.npz"
    if pca_file.is_file():
        whitening = PCAWhitening.load(pca_file)
    else:
        started = time.perf_counter()
        eth80 = args.data / "eth80-dev"
        whitening, _ = fit_whitening(Describer(backbone, size=args.size), find_images(eth80), eth80, progress=False)
        whitening.save(pca_file)
        print(f"PCA-whitening learned on eth80-dev in {time.perf_counter() - started:.0f} s")
    index_dir, images = workdir / f"index_clutter_{args.backbone}_{args.size}", args.data / "clutter-dev"
    if args.distractors is not None:
        index_dir = workdir / f"index_clutter+{args.distractors.name}_{args.backbone}_{args.size}"
        images = link_collection(workdir / f"collection_clutter+{args.distractors.name}", args.data / "clutter-dev",
                                 args.distractors)
    try:
        return Index.open(index_dir), index_dir  # built before
    except CamRetrievalError:
        pass
    started = time.perf_counter()
    index, failures = Index.build(images, whitening, backbone=args.backbone, size=args.size,
                                  progress=args.distractors is not None, index_dir=index_dir)
    assert not failures, failures
    print(f"indexed {len(index)} images in {time.perf_counter() - started:.0f} s")
    return index, index_dir


def link_collection(root: Path, clutter: Path, distractors: Path) -> Path:
    """A folder of links: clutter-dev's images under clutter-dev/, the distractors under distractors/."""
    for source, name in ((clutter, "clutter-dev"), (distractors, "distractors")):
        for path in find_images(source):
            target = root / name / path
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to((source / path).resolve())
    return root


def bytes_per_image(index_dir: Path, count: int) -> dict[str, float]:
    """The index folder's bytes per image, by file name (summed over the store's shards)."""
    sizes: dict[str, float] = {}
    for f in sorted(index_dir.rglob("*")):
        if f.is_file():
            sizes[f.name] = sizes.get(f.name, 0.0) + f.stat().st_size / count
    return sizes | {"total": sum(sizes.values())}


def mean_average_precision(rows: list[np.ndarray], labels: list[str], query_ids: list[int], junk: dict[int, np.ndarray]) -> float:
    """mAP of queries that are database images (each excluded from its own ranking), positives the images with its
    label, and each query's ``junk`` indices ignored (removed from its ranking)."""
    labels = np.asarray(labels)
    aps = []
    for row, query_id in zip(rows, query_ids):
        order = np.argsort(-row, kind="stable")
        keep = order != query_id
        if query_id in junk:
            keep &= ~np.isin(order, junk[query_id])
        relevant = labels[order[keep]] == labels[query_id]
        aps.append(average_precision(np.flatnonzero(relevant), int(relevant.sum())))
    return float(np.mean(aps))


def similarity_row(ranking: Ranking, size: int) -> np.ndarray:
    """A similarity row that sorts as the ranking does (what labels_mean_average_precision takes)."""
    row = np.full(size, -np.inf)
    row[ranking.ids] = -np.arange(len(ranking.ids), dtype=np.float64)
    return row


def ranking_of(scores: np.ndarray, excluded: int) -> Ranking:
    scores = scores.astype(np.float64)
    scores[excluded] = -np.inf
    ids = np.argsort(-scores, kind="stable")[:-1]
    return Ranking(ids, scores[ids], np.zeros((len(scores), 1), np.float32))


def crop_forward_query(index: Index, path: Path, box, n_classes: int) -> QueryDescription:
    """Ablation: the box cut out of the image at the database's scale and forwarded on its own."""
    describer = index.describer
    image = load_image(path)
    scale = describer.size / min(image.size)
    crop = image.crop(tuple(int(round(v)) for v in box))
    side = describer.backbone.stride
    crop = crop.resize((max(side, round(crop.width * scale)), max(side, round(crop.height * scale))), Image.BILINEAR)
    # Already at the database's scale: preprocess at the crop's own shorter side, so that it is not resized again.
    tensor = preprocess(crop, min(crop.size), describer.backbone.mean, describer.backbone.std)
    pooled = describer.pooled_vectors(describer.feature_maps(tensor.unsqueeze(0)), n_classes)
    return QueryDescription(pooled.vectors[0], pooled.classes[0])


def ablations(index: Index, query_ids: list[int], boxes: dict, labels: list[str], rerank: int) -> None:
    weight = index.describer.backbone.classifier_weight
    everything = np.arange(len(index))
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    for query_id in query_ids:
        path = index.paths[query_id]
        image = index.image_root / path
        query = index.describe_query(image, tuple(boxes[path]), SearchOptions(online=True, online_classes=64))
        whole = index.describe_query(image, None, SearchOptions(online=True, online_classes=64))
        cropped = crop_forward_query(index, image, boxes[path], 64)
        raw8 = online_descriptors(index.maps, everything, query.classes[:8], weight, None)
        rows["OnA N_c=8, no PCA-whitening"].append(similarity_row(ranking_of(raw8 @ query.descriptor(8, None), query_id), len(index)))
        by_whole = online_descriptors(index.maps, everything, whole.classes[:8], weight, index.whitening)
        # The query region's vectors for the whole image's classes: the region's maps with other classes.
        region = index.describer.image_maps(image, tuple(boxes[path]))
        cells = region.features.permute(0, 2, 3, 1)
        q_whole = aggregate(online_class_vectors(cells, cells, weight, whole.classes[:8]), index.whitening)[0].numpy()
        rows["OnA N_c=8, classes of the whole query image"].append(similarity_row(ranking_of(by_whole @ q_whole, query_id), len(index)))
        crop8 = online_descriptors(index.maps, everything, cropped.classes[:8], weight, index.whitening)
        rows["OnA N_c=8, query = forwarded crop"].append(
            similarity_row(ranking_of(crop8 @ cropped.descriptor(8, index.whitening), query_id), len(index)))
        crop8raw = online_descriptors(index.maps, everything, cropped.classes[:8], weight, None)
        rows["OnA N_c=8, forwarded crop, no PCA-whitening"].append(
            similarity_row(ranking_of(crop8raw @ cropped.descriptor(8, None), query_id), len(index)))
        rows["OfA, query = forwarded crop"].append(
            similarity_row(ranking_of(index.descriptors @ cropped.descriptor(64, index.whitening), query_id), len(index)))
        first = index.refinement.initial_ranking(query, SearchOptions(), exclude=[query_id])
        candidates = first.ids[:rerank]
        regions = region_scores(index.maps, candidates, query.classes[:6], query.descriptor(6, None), weight, None, (32, 32))
        ids = np.concatenate([candidates[rerank_order(regions.scores)], first.ids[rerank:]])
        rows[f"OfA + R{rerank}, regions without PCA-whitening"].append(similarity_row(Ranking(ids, ids * 0.0, first.base), len(index)))
    print(f"\nablations (departures from the paper), {len(query_ids)} queries")
    for name, name_rows in rows.items():
        print(f"{name:<48} {labels_mean_average_precision(np.stack(name_rows), labels, query_ids)[0]:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-refinement"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--queries", type=int, default=0, help="only the first N queries (0: all)")
    parser.add_argument("--rerank", type=int, nargs="+", default=[100], help="R of each re-ranking row (default: 100)")
    parser.add_argument("--online-classes", type=int, nargs="*", default=[8, 64], help="N_c of each OnA row (default: 8 64)")
    parser.add_argument("--distractors", type=Path, help="a folder of images added to the database (see above)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, see above)")
    parser.add_argument("--ablations", action="store_true", help="also measure departures from the paper")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args()

    index, index_dir = prepare(args)  # built with torch's default threads
    torch.set_num_threads(args.threads)
    clutter_boxes = json.loads((args.data / "clutter-dev" / "boxes.json").read_text())
    prefix = "clutter-dev/" if args.distractors is not None else ""
    boxes = {prefix + path: box for path, box in clutter_boxes.items()}
    labels = [p[len(prefix):].split("/")[0] if p.startswith(prefix) else "distractor" for p in index.paths]
    query_ids = [i for i, p in enumerate(index.paths) if p in boxes]
    # Distractors under a folder named like a query's object are that query's junk (eth80-dev holds its objects).
    distractors = [i for i, p in enumerate(index.paths) if not p.startswith(prefix)] if prefix else []
    junk_of_label = {label: np.array([i for i in distractors if label in index.paths[i].split("/")[:-1]], np.int64)
                     for label in {labels[i] for i in query_ids}}
    junk = {i: junk_of_label[labels[i]] for i in query_ids if len(junk_of_label[labels[i]])}
    if args.queries:
        query_ids = query_ids[:: max(1, len(query_ids) // args.queries)][: args.queries]
    stored = bytes_per_image(index_dir, len(index))
    print(f"{len(index)} images ({len(distractors)} distractors), {len(query_ids)} queries, {torch.get_num_threads()} "
          f"threads; stored per image: {stored['total'] / 1e3:.1f} kB ("
          + ", ".join(f"{name} {size / 1e3:.1f} kB" for name, size in stored.items() if name != "total") + ")")

    def online(n_classes):
        return lambda q, ofa, excluded: index.refinement.initial_ranking(q, SearchOptions(online=True, online_classes=n_classes), excluded)

    def rerank(top):
        return lambda q, ofa, excluded: index.refinement.rerank(q, ofa, top)

    bases = {"OfA": lambda q, ofa, excluded: ofa}
    bases |= {f"OnA N_c={n}": online(n) for n in args.online_classes}
    bases |= {f"OfA + R{r}": rerank(r) for r in args.rerank}
    # search --refine: OnA N_c=8 unwhitened over the OfA top 1000 (all of a 400-image index); no QE after it
    refine = "--refine (OnA N_c=8, unwhitened)"
    bases[refine] = lambda q, ofa, excluded: index.refinement.initial_ranking(q, SearchOptions.refine(), excluded)
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    forward_seconds = []
    needed = SearchOptions(online=True, online_classes=max(args.online_classes + [8]), rerank=1)
    index.describe_query(index.image_root / index.paths[0], None, needed)  # warm-up (loads the backbone)
    for count, query_id in enumerate(query_ids, start=1):
        path = index.paths[query_id]
        started = time.perf_counter()
        query = index.describe_query(index.image_root / path, tuple(boxes[path]), needed)
        forward_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        ofa = index.refinement.initial_ranking(query, SearchOptions(), exclude=[query_id])
        ofa_seconds = time.perf_counter() - started
        for base_name, stage in bases.items():
            started = time.perf_counter()
            ranking = stage(query, ofa, [query_id])
            base_seconds = time.perf_counter() - started + ofa_seconds * (base_name.startswith("OfA"))
            for suffix, qe, alpha in QE_VARIANTS if base_name != refine else QE_VARIANTS[:1]:
                started = time.perf_counter()
                final = index.refinement.expand(ranking, qe, alpha) if qe else ranking
                name = base_name + suffix
                seconds[name].append(base_seconds + time.perf_counter() - started)
                rows[name].append(similarity_row(final, len(index)))
        if count % 10 == 0:
            print(f"  {count} queries", flush=True)

    forward = float(np.mean(forward_seconds))
    print(f"\nquery forward pass (box region, top-64 class vectors): {1000 * forward:.0f} ms per query")
    print(f"{'method':<28} {'mAP':>6} {'refine ms':>10} {'total ms':>9}")
    table = []
    for name in rows:
        mean_ap = mean_average_precision(rows[name], labels, query_ids, junk)
        refine = float(np.mean(seconds[name]))
        table.append({"method": name, "mAP": mean_ap, "refine_ms": 1000 * refine, "total_ms": 1000 * (forward + refine)})
        print(f"{name:<28} {mean_ap:6.3f} {1000 * refine:10.1f} {1000 * (forward + refine):9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"images": len(index), "queries": len(query_ids), "bytes_per_image": stored,
                                         "forward_ms": 1000 * forward, "rows": table}, indent=2))
    if args.ablations:
        ablations(index, query_ids, boxes, labels, args.rerank[0])


if __name__ == "__main__":
    main()
