"""How many images a PCA-whitening needs: mAP against the number of images it is learned from, on the collection
itself (what `camretrieval index` does without --pca), for no whitening, plain PCA-whitening and regularised ones.

Every image's top-64 class vectors (and, for clutter, each box query's) are extracted once and cached; each
whitening is then fitted on the top-1 class vector (N_pca = 1, the default) of an even sample of n images of the
searched set, and every variant scores the same vectors:

- eth80: eth80-dev, every image a query against all the others;
- clutter: clutter-dev, every image's box a query against all the whole images (the other views of the object
  are the positives).

    python benchmarks/whitening_size.py [--data ../shared/data] [--size 448] [--counts 30 100 300 0] [--cache DIR]

The candidates ("plain": the paper's PCA-whitening, dimension capped at n - 1; "shrink s": eigenvalues lambda_i + s
* mean(lambda), all K dimensions; "power b": scale by lambda^-b instead of lambda^-1/2) are computed here with NumPy
from the same formulas as camretrieval.method.whitening; the row "camretrieval" is the library's own
PCAWhitening(512, shrinkage=DEFAULT_SHRINKAGE), as `index` without --pca learns it.
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
from camretrieval.evaluation.metrics import evaluate
from camretrieval.extraction.describer import in_path_order
from camretrieval.method.whitening import DEFAULT_SHRINKAGE

N_CLASSES = 64
VARIANTS = ["none", "plain", "shrink 0.1", "shrink 0.3", "shrink 1", "shrink 3", "full 0.3", "full 1", "full 3", "power 0.25",
            "camretrieval"]


def class_vectors(describer: Describer, dataset, cache: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(images x 64 x K, box queries x 64 x K or None), float16, cached in ``cache``."""
    if cache.is_file():
        with np.load(cache) as stored:
            return stored["images"], (stored["queries"] if "queries" in stored else None)
    compute = lambda maps: describer.pooled_vectors(maps, N_CLASSES).vectors.half()  # noqa: E731
    done, rows = in_path_order(describer.iterate_files(dataset.images, dataset.root, compute, progress=True))
    assert len(done) == len(dataset.images), "an image could not be read"
    images = np.stack(rows)
    queries = None
    if any(q.box is not None for q in dataset.queries):
        queries = np.stack([
            describer.image_vectors(dataset.query_path(i), q.box, N_CLASSES).vectors[0].half().numpy()
            for i, q in enumerate(dataset.queries)
        ])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=images, **({"queries": queries} if queries is not None else {}))
    return images, queries


def descriptors(vectors: np.ndarray, transform) -> np.ndarray:
    """D_I = l2(sum_c l2(transform(f^c))) for images x N_c x K vectors; ``transform`` None: l2(sum_c f^c)."""
    x = vectors.astype(np.float32)
    if transform is not None:
        x = transform(x)
        x /= np.linalg.norm(x, axis=-1, keepdims=True).clip(1e-12)
    d = x.sum(axis=1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True).clip(1e-12)


def spectrum(training: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mean, eigenvalues (descending, all K), eigenvectors (K x K columns) of the training vectors' covariance."""
    x = training.astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / max(len(x) - 1, 1))
    order = np.argsort(eigenvalues)[::-1]
    return mean, np.clip(eigenvalues[order], 0, None), eigenvectors[:, order]


def projection(mean, eigenvalues, eigenvectors, dim: int, scale: np.ndarray):
    p = (eigenvectors[:, :dim] * scale[:dim]).astype(np.float32)
    m = mean.astype(np.float32)
    return lambda x: (x - m) @ p


def variants(training: np.ndarray, library: PCAWhitening) -> dict[str, object]:
    mean, lam, vec = spectrum(training)
    n, k = training.shape
    rank = min(n - 1, k)
    mean_lam = lam.sum() / k
    out = {"none": None}
    dim = min(512, rank)
    out["plain"] = projection(mean, lam, vec, dim, lam[:dim] ** -0.5)
    for s in (0.1, 0.3, 1.0, 3.0):
        out[f"shrink {s:g}"] = projection(mean, lam, vec, min(512, k), (lam[: min(512, k)] + s * mean_lam) ** -0.5)
    for s in (0.3, 1.0, 3.0):  # every direction kept: those the data does not span get the shrinkage alone
        out[f"full {s:g}"] = projection(mean, lam, vec, k, (lam + s * mean_lam) ** -0.5)
    for b in (0.25,):
        out[f"power {b:g}"] = projection(mean, lam, vec, dim, lam[:dim] ** -b)
    out["camretrieval"] = lambda x: library.transform(torch.from_numpy(x)).numpy()
    return {name: transform for name, transform in out.items() if name in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--counts", type=int, nargs="+", default=[30, 100, 300, 0], help="0: every image of the set")
    parser.add_argument("--sets", nargs="+", default=["eth80", "clutter"])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/camretrieval-whitening-size"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = parser.parse_args()
    VARIANTS[:] = args.variants
    describer = Describer(load_backbone("efficientnet_lite0"), args.size, N_CLASSES)
    folders = {"eth80": "eth80-dev", "clutter": "clutter-dev"}
    rows = []
    for name in args.sets:
        dataset = image_folder(args.data / folders[name], boxes=None if name == "eth80" else "boxes.json")
        started = time.perf_counter()
        images, queries = class_vectors(describer, dataset, args.cache / f"{name}-{args.size}.npz")
        print(f"{name}: {len(images)} images ({time.perf_counter() - started:.0f} s to extract or load)")
        for count in args.counts:
            n = len(images) if count == 0 else count
            sample = np.linspace(0, len(images) - 1, n).round().astype(int)  # an even sample, as `index` takes
            training = images[sample, 0].astype(np.float32)  # top-1 class vector of each (N_pca = 1)
            library = PCAWhitening(512, shrinkage=DEFAULT_SHRINKAGE).fit(training)
            for variant, transform in variants(training, library).items():
                database = descriptors(images, transform)
                query = descriptors(queries, transform) if queries is not None else database
                mean_ap = evaluate(dataset, query @ database.T)["map"]
                row = {"set": name, "images": n, "variant": variant, "map": round(float(mean_ap), 4)}
                if variant == "camretrieval":
                    row["dim"] = library.dim_
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| set | images | " + " | ".join(dict.fromkeys(r["variant"] for r in rows)) + " |")
    for name in args.sets:
        for count in args.counts:
            n = None
            cells = [r for r in rows if r["set"] == name and (count == 0 or r["images"] == count)]
            cells = [r for r in cells if count != 0 or r["images"] == max(c["images"] for c in cells)]
            n = cells[0]["images"] if cells else count
            print(f"| {name} | {n} | " + " | ".join(f"{r['map']:.3f}" for r in cells) + " |")
    if args.json:
        args.json.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
