"""Which refinement settings serve box queries best: image size (database and query), how the query's box is
described (its cells cropped out of the whole image's maps, or the box cut out of the image and forwarded on its own),
OnA's number of query classes N_c, re-ranking's R after OnA, and query expansion, on clutter-dev.

Protocol of benchmarks/refinement.py: clutter-dev (400 images, 40 objects pasted in cluttered scenes) is the database,
its maps stored; queries are its images with their boxes.json boxes (every ``--every``-th: 100 of the 400 by default,
every object); positives the other 9 views of the object; the query's own image excluded. PCA-whitening 512-d learned
on all of eth80-dev at the database's size (as today). efficientnet_lite0.

Query descriptions compared (``--query``):
- ``maps``: the whole query image at the database size, the box's cells cropped out of its maps (today's default);
- ``crop@db``: the box cut out of the image, resized by the same factor the database images are (the object at the
  database's scale), forwarded;
- ``crop@N``: the box cut out and resized so that its shorter side is N pixels (more pixels on a small object).

    python benchmarks/refine_sweep.py [--sizes 448 640] [--query maps crop@db crop@448 crop@640] [--every 4]
        [--workdir /tmp/camretrieval-refinement] [--json rows.jsonl]
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
from camretrieval.evaluation.metrics import labels_mean_average_precision
from camretrieval.extraction.images import find_images, load_image, preprocess
from camretrieval.search.refinement import QueryDescription, Ranking, SearchOptions


def prepare(data: Path, workdir: Path, size: int) -> Index:
    workdir.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone("efficientnet_lite0")
    pca_file = workdir / f"pca_eth80_efficientnet_lite0_{size}.npz"
    if pca_file.is_file():
        whitening = PCAWhitening.load(pca_file)
    else:
        started = time.perf_counter()
        eth80 = data / "eth80-dev"
        whitening, _ = fit_whitening(Describer(backbone, size=size), find_images(eth80), eth80, progress=False)
        whitening.save(pca_file)
        print(f"PCA-whitening at {size} learned on eth80-dev in {time.perf_counter() - started:.0f} s", flush=True)
    index_dir = workdir / f"index_clutter_efficientnet_lite0_{size}"
    try:
        return Index.open(index_dir)
    except CamRetrievalError:
        pass
    started = time.perf_counter()
    index, failures = Index.build(data / "clutter-dev", whitening, size=size, progress=False, index_dir=index_dir)
    assert not failures, failures
    print(f"indexed clutter-dev at {size} in {time.perf_counter() - started:.0f} s", flush=True)
    return index


def crop_query(index: Index, path: Path, box, side: int | None, n_classes: int) -> QueryDescription:
    """The box cut out of the image and forwarded: resized so that its shorter side is ``side`` pixels, or (None) by
    the factor the database image is resized by."""
    describer = index.describer
    image = load_image(path)
    crop = image.crop(tuple(int(round(v)) for v in box))
    scale = (describer.size / min(image.size)) if side is None else side / min(crop.size)
    stride = describer.backbone.stride
    crop = crop.resize((max(stride, round(crop.width * scale)), max(stride, round(crop.height * scale))), Image.BILINEAR)
    tensor = preprocess(crop, min(crop.size), describer.backbone.mean, describer.backbone.std)
    pooled = describer.pooled_vectors(describer.feature_maps(tensor.unsqueeze(0)), n_classes)
    return QueryDescription(pooled.vectors[0], pooled.classes[0])


def similarity_row(ranking: Ranking, size: int) -> np.ndarray:
    row = np.full(size, -np.inf)
    row[ranking.ids] = -np.arange(len(ranking.ids), dtype=np.float64)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-refinement"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 640])
    parser.add_argument("--query", nargs="+", default=["maps", "crop@db", "crop@448", "crop@640"])
    parser.add_argument("--online-classes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rerank", type=int, nargs="*", default=[20, 50, 100], help="R re-ranked after OnA")
    parser.add_argument("--every", type=int, default=4, help="every N-th image is a query (4: 100 queries)")
    parser.add_argument("--json", type=Path, help="append one JSON line per row here")
    args = parser.parse_args()
    boxes = json.loads((args.data / "clutter-dev" / "boxes.json").read_text())
    for size in args.sizes:
        index = prepare(args.data, args.workdir, size)
        refinement = index.refinement
        labels = [p.split("/")[0] for p in index.paths]
        query_ids = [i for i, p in enumerate(index.paths) if p in boxes][:: args.every]
        rows: dict[str, list[np.ndarray]] = defaultdict(list)
        started = time.perf_counter()
        for query_id in query_ids:
            path = index.paths[query_id]
            image = index.image_root / path
            for mode in args.query:
                if mode == "maps":
                    query = index.describe_query(image, tuple(boxes[path]), SearchOptions(online=True, online_classes=64))
                else:
                    side = None if mode == "crop@db" else int(mode.split("@")[1])
                    query = crop_query(index, image, boxes[path], side, 64)
                ofa = refinement.initial_ranking(query, SearchOptions(), [query_id])
                rows[f"{mode} OfA"].append(similarity_row(ofa, len(index)))
                rows[f"{mode} OfA+R100"].append(similarity_row(refinement.rerank(query, ofa, 100), len(index)))
                for n in args.online_classes:
                    ona = refinement.initial_ranking(query, SearchOptions(online=True, online_classes=n), [query_id])
                    rows[f"{mode} OnA{n}"].append(similarity_row(ona, len(index)))
                    rows[f"{mode} OnA{n}+QE2"].append(similarity_row(refinement.expand(ona, 2), len(index)))
                    for r in args.rerank:
                        reranked = refinement.rerank(query, ona, r)
                        rows[f"{mode} OnA{n}+R{r}"].append(similarity_row(reranked, len(index)))
                        rows[f"{mode} OnA{n}+R{r}+QE2"].append(similarity_row(refinement.expand(reranked, 2), len(index)))
        print(f"\nsize {size}: {len(query_ids)} queries in {time.perf_counter() - started:.0f} s")
        for name, name_rows in rows.items():
            mean_ap = labels_mean_average_precision(np.stack(name_rows), labels, query_ids)[0]
            print(f"{size} {name:<28} {mean_ap:.3f}", flush=True)
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps({"size": size, "row": name, "mAP": mean_ap, "queries": len(query_ids)}) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
