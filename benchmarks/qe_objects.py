"""Query expansion where the first results are mostly right: ETH-80 objects on plain backgrounds.

OfA descriptors (lite0, size 448, 64 classes) of the odd-numbered objects of each category, PCA-whitening learned
on the even-numbered ones (the split of size_sweep.py); every view a query against the others (itself excluded,
also from its own expansion). Prints mAP for plain search and average / alpha QE with K = 1, 2, 5, 10.

    python benchmarks/qe_objects.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from camretrieval import Describer, fit_whitening, load_backbone
from camretrieval.evaluation.metrics import labels_mean_average_precision
from camretrieval.search.expansion import expanded_query
from size_sweep import eth80_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    root = args.data / "eth80-dev"
    train, test = eth80_split(root)
    backbone = load_backbone("efficientnet_lite0")
    whitening, _ = fit_whitening(Describer(backbone), train, root, progress=False)
    descriptors, done, _ = Describer(backbone, whitening=whitening).describe_files(test, root, progress=False)
    labels = np.array([test[i].split("/")[0] for i in done])
    similarity = descriptors @ descriptors.T
    print(f"plain search (OfA): mAP {labels_mean_average_precision(similarity, labels, range(len(labels)))[0]:.3f}")
    for k, alpha in [(1, 0.0), (2, 0.0), (5, 0.0), (10, 0.0), (5, 3.0), (10, 3.0)]:
        expanded = []
        for q in range(len(descriptors)):
            order = np.argsort(-similarity[q], kind="stable")
            expanded.append(expanded_query(descriptors[q], descriptors[order[order != q][:k]], alpha))
        mean_ap = labels_mean_average_precision(np.stack(expanded) @ descriptors.T, labels, range(len(labels)))[0]
        print(f"QE{k}{f' alpha {alpha:g}' if alpha else ''}: mAP {mean_ap:.3f}")


if __name__ == "__main__":
    main()
