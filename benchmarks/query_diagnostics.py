"""What limits box queries on clutter-dev: the figures docs/method.md, docs/refinement.md and docs/evaluation.md quote.

Protocol of ``benchmarks/refinement.py`` (and its cached PCA-whitening and index under ``--workdir``): clutter-dev's
400 images indexed with their maps (efficientnet_lite0 at ``--size`` 448, 512-d PCA-whitening learned on all of
eth80-dev), every image a query with its boxes.json box, positives the other 9 views of its object, the query's own
image excluded from its ranking.

1. Query description (OfA mAP): the box's cells cropped out of the whole image's maps (what ``search --box`` does);
   the box cut out of the image and forwarded at the database's scale (cirtorch's way); cut out and resized so that
   its shorter side is ``--size``; the whole image, no box.
2. Re-ranking's reach (``--rerank`` R): how many of each query's 9 positives the OfA top R holds, and of those
   positives, the share whose best-scoring region (the one re-ranking scores them by) overlaps their object's box
   with an IoU over .5.
3. CAM region proposals (the five thresholds' boxes of a heatmap, as ``explain`` and re-ranking draw them) against
   the object's box: mean over images of the best IoU of an image's proposals when the heatmap is drawn with the
   image's OWN top-2 classes (what OfA aggregates), with the top-2 classes of its box region (a query's classes on
   its own image), and with each query's classes on its 9 positives (re-ranking's case).

    python benchmarks/query_diagnostics.py [--workdir /tmp/camretrieval-refinement] [--rerank 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from camretrieval.evaluation.metrics import labels_mean_average_precision
from camretrieval.extraction.images import load_image, preprocess, resized_size
from camretrieval.method.cams import class_logits, top_classes
from camretrieval.method.feature_maps import crop_maps
from camretrieval.method.regions import (
    DEFAULT_MIN_SIZE,
    PROPOSAL_CLASSES,
    PROPOSAL_THRESHOLDS,
    batch_region_proposals,
    cells_to_box,
    heatmaps_from_activations,
    scale_box,
)
from camretrieval.search.reranking import region_scores
from refinement import prepare


def iou(a, b) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def cropped_query(describer, path: Path, box, side: int | None) -> np.ndarray:
    """The descriptor of the box cut out of the image and forwarded on its own: resized by the factor the database
    image is (``side`` None: the object at the database's scale), or so that its shorter side is ``side``."""
    image = load_image(path)
    crop = image.crop(tuple(int(round(v)) for v in box))
    scale = describer.size / min(image.size) if side is None else side / min(crop.size)
    stride = describer.backbone.stride
    crop = crop.resize((max(stride, round(crop.width * scale)), max(stride, round(crop.height * scale))), Image.BILINEAR)
    # Already at the wanted scale: preprocess at the crop's own shorter side, so that it is not resized again.
    tensor = preprocess(crop, min(crop.size), describer.backbone.mean, describer.backbone.std)
    with torch.inference_mode():
        return describer.aggregate(describer.pooled_vectors(describer.feature_maps(tensor.unsqueeze(0))))[0].numpy()


def query_descriptions(index, query_ids: list[int], boxes: dict, labels: list[str]) -> None:
    describer = index.describer
    variants = {
        "box cells cropped from the whole image's maps (default)": lambda p, b: describer.describe([p], [b])[0],
        "box cut out, forwarded at the database's scale": lambda p, b: cropped_query(describer, p, b, None),
        f"box cut out, resized to {describer.size} px": lambda p, b: cropped_query(describer, p, b, describer.size),
        "whole query image, no box": lambda p, b: describer.describe([p], [None])[0],
    }
    print(f"\n1. query description, OfA mAP ({len(query_ids)} queries)")
    for name, describe in variants.items():
        rows = []
        for query_id in query_ids:
            path = index.paths[query_id]
            rows.append(index.descriptors @ describe(index.image_root / path, tuple(boxes[path])))
        print(f"   {name:<58} {labels_mean_average_precision(np.stack(rows), labels, query_ids)[0]:.3f}")


def rerank_reach(index, query_ids: list[int], boxes: dict, labels: list[str], rerank: int) -> None:
    refinement, backbone, whitening = index.refinement, index.describer.backbone, index.whitening
    strides = (backbone.layer_strides[backbone.feature_layer], backbone.layer_strides[backbone.cam_layer])
    labels_array = np.asarray(labels)
    found, overlapping, positives_found = [], 0, 0
    sizes: dict[int, tuple[int, int]] = {}  # original (width, height) of each image, EXIF orientation applied
    for query_id in query_ids:
        path = index.paths[query_id]
        query = index.describe_query(index.image_root / path, tuple(boxes[path]))
        ofa = refinement.initial_ranking(query, exclude=[query_id])
        candidates = ofa.ids[:rerank]
        positive = candidates[labels_array[candidates] == labels[query_id]]
        found.append(len(positive))
        if not len(positive):
            continue
        n_re = 6  # re-ranking's N_re (SearchOptions' default)
        regions = region_scores(index.maps, positive, query.classes[:n_re], query.descriptor(n_re, whitening),
                                backbone.classifier_weight, whitening, strides)
        for image_id, cells in zip(positive.tolist(), regions.boxes):
            if image_id not in sizes:
                sizes[image_id] = load_image(index.image_root / index.paths[image_id]).size
            original = sizes[image_id]
            resized = resized_size(*original, index.describer.size)
            region = (0, 0, *original) if cells is None else cells_to_box(cells, strides[1], resized, original)
            overlapping += iou(region, boxes[index.paths[image_id]]) > 0.5
        positives_found += len(positive)
    print(f"\n2. re-ranking's reach, OfA top {rerank} ({len(query_ids)} queries)")
    print(f"   positives (of 9) in the top {rerank}: mean {np.mean(found):.2f}, median {np.median(found):.0f}")
    print(f"   of those, best region's IoU with the object's box > .5: {overlapping / max(positives_found, 1):.1%} "
          f"({overlapping} of {positives_found})")


def proposal_overlap(index, boxes: dict, labels: list[str]) -> None:
    describer = index.describer
    backbone = describer.backbone
    weight, bias = backbone.classifier_weight, backbone.classifier_bias
    cam_stride = backbone.layer_strides[backbone.cam_layer]
    min_cells = max(1, -(-DEFAULT_MIN_SIZE // cam_stride))
    own, region, positives = [], [], []

    def best_iou(heatmap: torch.Tensor, resized, original, box) -> float:
        proposals = batch_region_proposals(heatmap.unsqueeze(0), PROPOSAL_THRESHOLDS, min_cells=min_cells)[0]
        return max((iou(cells_to_box(c, cam_stride, resized, original), box) for c in proposals), default=0.0)

    for label in sorted(set(labels)):
        members = [i for i, name in enumerate(labels) if name == label]
        activations, sizes, region_classes = [], [], []
        for image_id in members:
            path = index.paths[image_id]
            picture = load_image(index.image_root / path)
            with torch.inference_mode():
                maps = describer.feature_maps(describer.preprocess(picture).unsqueeze(0))
                resized = resized_size(*picture.size, describer.size)
                box_maps = crop_maps(maps, scale_box(tuple(boxes[path]), picture.size, resized),
                                     (backbone.layer_strides[backbone.feature_layer], cam_stride))
                region_classes.append(top_classes(class_logits(box_maps.cam_activations, weight, bias), PROPOSAL_CLASSES)[0])
            activations.append(maps.cam_activations)
            sizes.append((resized, picture.size))
        with torch.inference_mode():
            for k, image_id in enumerate(members):
                box = boxes[index.paths[image_id]]
                heatmap, _ = heatmaps_from_activations(activations[k], weight, bias, PROPOSAL_CLASSES)
                own.append(best_iou(heatmap[0], *sizes[k], box))
                heatmap, _ = heatmaps_from_activations(activations[k], weight, bias, PROPOSAL_CLASSES, region_classes[k])
                region.append(best_iou(heatmap[0], *sizes[k], box))
                for q in range(len(members)):  # every other view's query classes on this image
                    if q != k:
                        heatmap, _ = heatmaps_from_activations(activations[k], weight, bias, PROPOSAL_CLASSES,
                                                               region_classes[q])
                        positives.append(best_iou(heatmap[0], *sizes[k], box))
    print(f"\n3. CAM region proposals against the object's box, mean best IoU ({len(own)} images)")
    print(f"   heatmap of the image's own top-{PROPOSAL_CLASSES} classes:            {np.mean(own):.3f}")
    print(f"   heatmap of its box region's top-{PROPOSAL_CLASSES} classes:           {np.mean(region):.3f}")
    print(f"   heatmap of each query's classes on its positives: {np.mean(positives):.3f} ({len(positives)} pairs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-refinement"))
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--rerank", type=int, default=100, help="R: the OfA top R re-ranking sees (default: 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as benchmarks/refinement.py)")
    parser.add_argument("--parts", nargs="+", default=["queries", "reach", "proposals"],
                        choices=["queries", "reach", "proposals"])
    args = parser.parse_args()
    args.distractors = None
    index, _ = prepare(args)
    torch.set_num_threads(args.threads)
    boxes = json.loads((args.data / "clutter-dev" / "boxes.json").read_text())
    labels = [path.split("/")[0] for path in index.paths]
    query_ids = [i for i, path in enumerate(index.paths) if path in boxes]
    print(f"{len(index)} images, {len(query_ids)} box queries, {args.backbone} at {args.size} px")
    started = time.perf_counter()
    if "queries" in args.parts:
        query_descriptions(index, query_ids, boxes, labels)
    if "reach" in args.parts:
        rerank_reach(index, query_ids, boxes, labels, args.rerank)
    if "proposals" in args.parts:
        proposal_overlap(index, boxes, labels)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
