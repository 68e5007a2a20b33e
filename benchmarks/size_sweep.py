"""Choose the default image size by measurement: mAP and seconds per image against --size.

Two real sets, PCA-whitening always learned on other images than those searched:
- eth80: ETH-80 objects (256 x 256 views, plain background). PCA on the even-numbered objects of each category,
  search among the odd-numbered ones (every view a query against the others).
- clutter: objects pasted in cluttered 480 x 640 scenes, queried with their boxes; PCA on all of eth80-dev.

    python benchmarks/size_sweep.py --sizes 224 320 448 512 720 [--data ../shared/data] [--sets eth80 clutter]
    python benchmarks/size_sweep.py --sizes 448 --feature-layer blocks.5   # another feature layer
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from camretrieval import Describer, fit_whitening, load_backbone
from camretrieval.evaluation.metrics import labels_mean_average_precision
from camretrieval.extraction.images import find_images


def eth80_split(root: Path) -> tuple[list[str], list[str]]:
    paths = find_images(root)
    objects = sorted({p.split("/")[0] for p in paths})
    train_objects = set(objects[::2])
    return [p for p in paths if p.split("/")[0] in train_objects], [p for p in paths if p.split("/")[0] not in train_objects]


def evaluate(describer: Describer, root: Path, paths: list[str], boxes: list | None) -> tuple[float, float]:
    started = time.perf_counter()
    database, done, _ = describer.describe_files(paths, root, progress=False)
    labels = [paths[i].split("/")[0] for i in done]
    if boxes is None:
        queries = database
    else:
        queries = describer.describe([root / paths[i] for i in done], [boxes[i] for i in done])
    seconds = (time.perf_counter() - started) / len(paths)
    mean_ap, _ = labels_mean_average_precision(queries @ database.T, labels, range(len(labels)))
    return mean_ap, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320, 448, 512, 720])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--sets", nargs="+", default=["eth80", "clutter"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--feature-layer", default=None, help="pool another layer than the backbone's default")
    args = parser.parse_args()
    backbone = load_backbone(args.backbone, feature_layer=args.feature_layer)
    eth80 = args.data / "eth80-dev"
    train, test = eth80_split(eth80)
    rows = []
    for size in args.sizes:
        row = {"size": size, "feature_layer": backbone.feature_layer}
        if "eth80" in args.sets:
            whitening, _ = fit_whitening(Describer(backbone, size), train, eth80, progress=False)
            row["eth80_map"], row["eth80_s_per_image"] = evaluate(
                Describer(backbone, size, whitening=whitening), eth80, test, None
            )
        if "clutter" in args.sets:
            clutter = args.data / "clutter-dev"
            whitening, _ = fit_whitening(Describer(backbone, size), find_images(eth80), eth80, progress=False)
            boxes = json.loads((clutter / "boxes.json").read_text())
            paths = sorted(boxes)
            row["clutter_box_map"], row["clutter_s_per_image"] = evaluate(
                Describer(backbone, size, whitening=whitening), clutter, paths, [tuple(boxes[p]) for p in paths]
            )
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
