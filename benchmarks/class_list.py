"""A fixed list of classes (paper section 4.3) against plain OfA, for several lists, from one extraction per image.

``camretrieval eval --class-list`` measures one list per run and re-extracts every image; this script extracts each
image once (float16 maps kept in memory, cell-major) and computes, for each list, the class vectors of the listed
classes from those maps (:func:`camretrieval.search.online.online_class_vectors`: Eq. 1-4 exactly as the descriptor
computes them, from float16 maps, which moves descriptors by about 1e-5), learns the PCA-whitening on the vectors
of the list's first class (N_pca = 1, what ``fit-pca --class-list`` does), aggregates and scores with the ``eval``
protocol of a label folder (every image a query, itself excluded; clutter-dev queries are their boxes.json box:
the maps cropped to the box, as ``Describer.image_maps`` crops them). The plain OfA row (each image's own top 64)
is recomputed the same way and must equal docs/tables_*.md.

Settings (as docs/tables_clutter.md and docs/tables_eth80.md): efficientnet_lite0, size 448, 512-d PCA-whitening.
- ETH-80: database the odd objects of eth80-dev (benchmarks/size_sweep.py's split), PCA and class lists learned on
  the even objects (the other half of the objects: the same theme, other instances).
- clutter-dev: PCA on all of eth80-dev; class lists learned on eth80-dev (the objects of the theme on plain
  backgrounds: the very instances that clutter-dev pastes), on eth80-dev's even objects only (other instances of the
  same categories for the queries of the odd objects, reported apart), on the 23 landmark photos (the scenes only),
  or on clutter-dev itself (no labels needed: the collection's own images as its examples).

    python benchmarks/class_list.py [--data ../shared/data] [--tops 1 8 64] [--lengths 8 64] [--cache DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from camretrieval import Describer, PCAWhitening, load_backbone
from camretrieval.evaluation.datasets import image_folder
from camretrieval.evaluation.metrics import labels_mean_average_precision
from camretrieval.extraction.images import find_images
from camretrieval.method.aggregation import aggregate
from camretrieval.method.cams import class_logits, top_classes
from camretrieval.method.cell_major import online_class_vectors
from camretrieval.method.class_list import learn_class_list
from camretrieval.method.feature_maps import crop_maps
from camretrieval.method.regions import scale_box, validate_box
from size_sweep import eth80_split


class Extracted:
    """Each image's float16 cell-major maps (H x W x K) and its logits (C,), in path order."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []

    def add(self, features: torch.Tensor, logits: torch.Tensor) -> None:
        self.maps.append(features.permute(1, 2, 0).to(torch.float16).contiguous())
        self.logits.append(logits.float())


def extract(describer: Describer, paths: list[str], root: Path, boxes: dict | None = None) -> tuple[Extracted, Extracted | None]:
    """One forward pass per image; with ``boxes`` also the maps cropped to each image's box (the query's)."""
    backbone = describer.backbone
    assert backbone.feature_layer == backbone.cam_layer, "this script assumes one layer (efficientnet_lite0's head)"
    weight, bias = backbone.classifier_weight, backbone.classifier_bias
    stride = backbone.layer_strides[backbone.feature_layer]
    images, queries = Extracted(), Extracted() if boxes is not None else None
    with torch.inference_mode():
        for path in paths:
            picture = describer.load(root / path)
            tensor = describer.preprocess(picture)
            maps = describer.feature_maps(tensor.unsqueeze(0))
            images.add(maps.features[0], class_logits(maps.cam_activations, weight, bias)[0])
            if boxes is not None:
                box = scale_box(validate_box(tuple(boxes[path]), *picture.size), picture.size, (tensor.shape[2], tensor.shape[1]))
                region = crop_maps(maps, box, (stride, stride))
                queries.add(region.features[0], class_logits(region.cam_activations, weight, bias)[0])
    return images, queries


def class_vectors(extracted: Extracted, weight: torch.Tensor, classes: torch.Tensor | None, n_own: int) -> list[torch.Tensor]:
    """Per image, the class vectors (N x K) of ``classes`` (a fixed list), or of its own top ``n_own`` classes."""
    out = []
    with torch.inference_mode():
        for maps, logits in zip(extracted.maps, extracted.logits):
            chosen = classes if classes is not None else top_classes(logits[None], n_own)[0]
            cells = maps[None].float()
            out.append(online_class_vectors(cells, cells, weight, chosen)[0])
    return out


def descriptors(vectors: list[torch.Tensor], whitening: PCAWhitening) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([aggregate(v[None], whitening).numpy() for v in vectors])


DIM = 512


def whitening_of(vectors: list[torch.Tensor]) -> PCAWhitening:
    return PCAWhitening(DIM).fit(torch.cat([v[:1] for v in vectors]).double().numpy())


def score(labels: list[str], db: Extracted, queries: Extracted | None, pca: Extracted, weight, classes, n_own=64) -> np.ndarray:
    """Per-query AP with the PCA-whitening learned on ``pca``: every database image a query (``queries``: its box
    region, else itself), itself excluded, positives its label."""
    whitening = whitening_of(class_vectors(pca, weight, classes, 1))
    database = descriptors(class_vectors(db, weight, classes, n_own), whitening)
    query = database if queries is None else descriptors(class_vectors(queries, weight, classes, n_own), whitening)
    return labels_mean_average_precision(query @ database.T, labels, range(len(labels)))[1]


def cached(cache: Path | None, name: str, make) -> Extracted:
    """``make()``, saved in (and read back from) ``cache``/``name``.pt when a cache folder is given."""
    if cache is None:
        return make()
    path = cache / f"{name}.pt"
    if path.is_file():
        saved = torch.load(path)
        extracted = Extracted()
        extracted.maps, extracted.logits = saved["maps"], saved["logits"]
        return extracted
    extracted = make()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"maps": extracted.maps, "logits": extracted.logits}, path)
    return extracted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--tops", type=int, nargs="+", default=[1, 8, 64], help="N: top classes counted per example")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 64], help="L: classes kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument("--dim", type=int, default=DIM, help="PCA-whitening dimensions (default: 512)")
    parser.add_argument("--cache", type=Path, help="keep the extracted maps here (float16, about 1.2 GB) for reruns")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    globals()["DIM"] = args.dim
    if args.threads:
        torch.set_num_threads(args.threads)
    describer = Describer(load_backbone("efficientnet_lite0"), args.size)
    weight = describer.backbone.classifier_weight
    rows = []

    def report(dataset_name: str, row: str, aps: np.ndarray, subset: np.ndarray | None = None) -> None:
        rows.append({"dataset": dataset_name, "row": row, "map": float(aps.mean())})
        extra = ""
        if subset is not None:
            rows[-1]["map_odd_objects"] = float(aps[subset].mean())
            extra = f"  odd objects' queries {aps[subset].mean():.3f}"
        print(f"{dataset_name:<12} {row:<56} {aps.mean():.3f}{extra}", flush=True)

    started = time.perf_counter()
    eth80 = args.data / "eth80-dev"
    even, odd = eth80_split(eth80)
    eth_even = cached(args.cache, "eth80_even", lambda: extract(describer, even, eth80)[0])
    eth_odd = cached(args.cache, "eth80_odd", lambda: extract(describer, odd, eth80)[0])
    print(f"ETH-80 extracted in {time.perf_counter() - started:.0f} s", flush=True)
    odd_labels = [p.split("/")[0] for p in odd]

    def eth_score(classes) -> float:  # every odd view a query against the other odd views, itself excluded
        return score(odd_labels, eth_odd, None, eth_even, weight, classes)

    report("ETH-80", "OfA, each image's own top 64 (plain)", eth_score(None))
    even_logits = torch.stack(eth_even.logits)
    for top in args.tops:
        for length in args.lengths:
            classes, _ = learn_class_list(even_logits, top, length)
            report("ETH-80", f"list of {length} from the top {top} of the even objects", eth_score(torch.as_tensor(classes)))

    started = time.perf_counter()
    clutter = args.data / "clutter-dev"
    dataset = image_folder(clutter)
    boxes = {q.path: q.box for q in dataset.queries}
    assert [q.db_index for q in dataset.queries] == list(range(len(dataset.images)))
    if args.cache is not None and (args.cache / "clutter_queries.pt").is_file():
        db, queries = cached(args.cache, "clutter", None), cached(args.cache, "clutter_queries", None)
    else:
        db, queries = extract(describer, dataset.images, clutter, boxes)
        cached(args.cache, "clutter", lambda: db), cached(args.cache, "clutter_queries", lambda: queries)
    landmarks = args.data / "landmarks"
    scenes = cached(args.cache, "landmarks", lambda: extract(describer, find_images(landmarks), landmarks)[0])
    all_eth = Extracted()
    all_eth.maps, all_eth.logits = eth_even.maps + eth_odd.maps, eth_even.logits + eth_odd.logits
    print(f"clutter-dev and landmarks extracted in {time.perf_counter() - started:.0f} s", flush=True)
    labels = dataset.labels
    # clutter-dev's objects are eth80-dev's: the queries of the odd objects are those whose instances the even
    # objects' examples do not show (a list learned on the even objects has seen other instances only).
    odd_objects = {p.split("/")[0] for p in odd}
    subset = np.array([label in odd_objects for label in labels])
    report("clutter-dev", "OfA, each image's own top 64 (plain)", score(labels, db, queries, all_eth, weight, None), subset)
    sources = {"eth80-dev": all_eth, "eth80-dev even objects": eth_even, "landmarks": scenes, "clutter-dev itself": db}
    for source, examples in sources.items():
        logits = torch.stack(examples.logits)
        for top in args.tops:
            for length in args.lengths:
                classes, _ = learn_class_list(logits, top, length)
                report("clutter-dev", f"list of {length} from the top {top} of {source}",
                       score(labels, db, queries, all_eth, weight, torch.as_tensor(classes)), subset)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
