"""Gated query expansion (issue 15, docs/refinement.md "QE that knows when to help"): QE with and without the
k-reciprocal gate, after each first stage, on a set where the first results are mostly right and on one where
they are not.

- ETH-80 objects (``benchmarks/qe_objects.py``'s split): OfA of the odd-numbered objects of each category (lite0,
  448 px, 64 classes), PCA-whitening learned on the even-numbered ones; every view a query against the others
  (itself excluded from its ranking and its expansion).
- clutter-dev box queries: the 400-image index of ``benchmarks/refinement.py`` (PCA learned on eth80-dev, same
  --workdir), every --step-th image a query with its boxes.json box, positives the other 9 views of its object, its own
  image excluded; first stages OfA, OfA + R100 and whitened OnA (N_c = 8).

Each expansion runs through ``Refinement.expand`` (the code ``search --qe K [--qe-gate k]`` runs). Prints mAP per
first stage and per expansion, and how often the gate let at least one result through.

    python benchmarks/gated_qe.py [--workdir /tmp/camretrieval-refinement] [--step 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from camretrieval import Describer, fit_whitening, load_backbone
from camretrieval.search.refinement import Ranking, Refinement, SearchOptions
from refinement import mean_average_precision, prepare, similarity_row
from size_sweep import eth80_split

EXPANSIONS = [(k, alpha, gate) for k, alpha in [(2, 0.0), (5, 0.0), (10, 0.0), (5, 3.0), (10, 3.0)] for gate in (0, 5, 10, 20)]


def eth80_rankings(args: argparse.Namespace) -> tuple[Refinement, list[Ranking], list[str], list[int]]:
    cache = args.workdir / "gated_qe_eth80.npz"
    root = args.data / "eth80-dev"
    train, test = eth80_split(root)
    backbone = load_backbone("efficientnet_lite0")
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        descriptors, labels = stored["descriptors"], [str(label) for label in stored["labels"]]
    else:
        whitening, _ = fit_whitening(Describer(backbone), train, root, progress=False)
        descriptors, done, _ = Describer(backbone, whitening=whitening).describe_files(test, root, progress=False)
        labels = [test[i].split("/")[0] for i in done]
        np.savez(cache, descriptors=descriptors, labels=np.array(labels))
    refinement = Refinement(descriptors, None, 64, None, backbone)
    rankings = []
    for query in range(len(descriptors)):
        scores = descriptors @ descriptors[query]
        allowed = np.ones(len(descriptors), dtype=bool)
        allowed[query] = False
        ids = np.flatnonzero(allowed)[np.argsort(-scores[allowed].astype(np.float64), kind="stable")]
        rankings.append(Ranking(ids, scores[ids], descriptors, query=descriptors[query]))
    return refinement, rankings, labels, list(range(len(descriptors)))


def clutter_rankings(args: argparse.Namespace) -> tuple[Refinement, dict[str, list[Ranking]], list[str], list[int]]:
    index, _ = prepare(args)
    boxes = json.loads((args.data / "clutter-dev" / "boxes.json").read_text())
    labels = [path.split("/")[0] for path in index.paths]
    query_ids = list(range(0, len(index), args.step))
    refinement = index.refinement
    stages: dict[str, list[Ranking]] = {"OfA": [], "OfA + R100": [], "OnA N_c = 8": []}
    needed = SearchOptions(online=True, online_classes=8, rerank=100)
    for count, query_id in enumerate(query_ids, start=1):
        path = index.paths[query_id]
        query = index.describe_query(args.data / "clutter-dev" / path, tuple(boxes[path]), needed)
        first = refinement.initial_ranking(query, SearchOptions(), [query_id])
        stages["OfA"].append(first)
        stages["OfA + R100"].append(refinement.rerank(query, first, 100))
        stages["OnA N_c = 8"].append(refinement.initial_ranking(query, SearchOptions(online=True, online_classes=8), [query_id]))
        if count % 50 == 0:
            print(f"  clutter-dev: {count} of {len(query_ids)} queries", flush=True)
    return refinement, stages, labels, query_ids


def table(name: str, refinement: Refinement, rankings: list[Ranking], labels: list[str], query_ids: list[int]) -> list[dict]:
    size = len(refinement.descriptors)
    plain = mean_average_precision([similarity_row(r, size) for r in rankings], labels, query_ids, {})
    rows = [{"set": name, "qe": 0, "alpha": 0.0, "gate": 0, "mAP": plain, "expanded": 0.0}]
    print(f"\n{name}: plain {plain:.3f}")
    print(f"{'expansion':<22} {'no gate':>8} {'gate 5':>8} {'gate 10':>8} {'gate 20':>8}   (share of queries expanded)")
    line: list[str] = []
    for k, alpha, gate in EXPANSIONS:
        expanded = [refinement.expand(r, k, alpha, gate) for r in rankings]
        mean_ap = mean_average_precision([similarity_row(r, size) for r in expanded], labels, query_ids, {})
        share = float(np.mean([e is not r for e, r in zip(expanded, rankings)]))
        rows.append({"set": name, "qe": k, "alpha": alpha, "gate": gate, "mAP": mean_ap, "expanded": share})
        line.append(f"{mean_ap:.3f} ({share:.2f})" if gate else f"{mean_ap:.3f}")
        if gate == EXPANSIONS[-1][2]:
            label = f"QE{k}" + (f" alpha {alpha:g}" if alpha else "")
            print(f"{label:<22} " + " ".join(f"{cell:>8}" for cell in line))
            line = []
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-refinement"))
    parser.add_argument("--step", type=int, default=1, help="every STEP-th clutter-dev image a query (default: all 400)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.backbone, args.size, args.distractors = "efficientnet_lite0", 448, None
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # small products: two threads beside another job are many times slower (refinement.py)
    rows = table("eth80-dev OfA", *eth80_rankings(args))
    refinement, stages, labels, query_ids = clutter_rankings(args)
    for name, rankings in stages.items():
        rows += table(f"clutter-dev {name}", refinement, rankings, labels, query_ids)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
