"""Search at scale: latency, recall@100 against exact search, build time and memory per image, versus collection
size, for exact search (float32, float16) and the approximate indexes of camretrieval.storage.ann (HNSW, IVF-PQ).

The vectors are synthetic, d=512 and l2-normalised like whitened descriptors. They are not uniform on the sphere,
where every pair is nearly orthogonal and "nearest" means little: real descriptors form clumps (views of one object
or landmark) in a low-dimensional part of the space. So the data is a Gaussian mixture: 4000 centres drawn with a
decaying spectrum (standard deviation along the i-th of 512 random directions ~ i^-0.5), each point its centre
plus noise with a steeper spectrum (~ i^-0.75, so a clump varies mostly along a few directions) and a per-cluster
size (0.6 to 1 times the centre's norm), then l2-normalised. At 100k / 1M points a query's mean top-1 / top-10 /
top-100 cosine similarities (printed for each size) are 0.86 / 0.73 / 0.47 and 0.89 / 0.85 / 0.73, around those of
real unwhitened ETH-80-dev descriptors among themselves (0.91 / 0.81 / 0.64), and unrelated pairs are
near-orthogonal, as after whitening. Queries are 200 fresh draws from the same mixture, not database members.

Per size and index: build seconds (all threads), bytes of the serialised index per image, search latency of one
query at a time (median over the queries; with 1 thread and with all threads), and recall@100 of the index's top
100 against exact float32 search. One more row re-scores IVF-PQ's top 400 exactly with the float32 descriptors
(which a camretrieval Index keeps anyway; its bytes / image count them). HNSW is built only up to --hnsw-max
vectors (default 100k): on a 2-core machine a 1M x 512 HNSW graph takes longer than the rest of the run (about 12 min extrapolated from 58 s at 100k); when
larger sizes are skipped in a run that built a smaller one, their build time is extrapolated instead.

    python benchmarks/search_scale.py [--sizes 10000,100000,1000000] [--threads 1,0] [--json out.json]
    python benchmarks/search_scale.py --eth80 [--data ../shared/data]   # float32 vs float16 mAP on real descriptors
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# OpenMP threads that spin while they wait are ruinous on a machine whose cores are busy with other jobs (IVF-PQ
# training at 10k took 150 s with spinning, 21 s without, on the 2 shared cores of the run in docs/search_scale.md).
# Must be set before FAISS loads libgomp; an OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from camretrieval.storage.ann import build_search_index, index_kind, recall_at, search_settings  # noqa: E402

DIM = 512
N_CENTRES = 4000
K = 100
RERANK = 400  # ivfpq + exact re-scoring of its top 400 with the float32 descriptors (which an Index keeps anyway)
INDEXES = [("exact", None, False), ("exact-float16", None, True), ("hnsw", "hnsw", False), ("ivfpq", "ivfpq", False)]


class Mixture:
    """The synthetic descriptor distribution of the module docstring (fixed by ``seed``)."""

    def __init__(self, dim: int = DIM, n_centres: int = N_CENTRES, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        spectrum = 1.0 / np.sqrt(np.arange(1, dim + 1))
        self.rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        self.noise_rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        centres = (rng.standard_normal((n_centres, dim)) * spectrum) @ self.rotation
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        noise_spectrum = np.arange(1, dim + 1) ** -0.75  # steeper: within a clump, a few directions dominate
        self.noise_scale = (noise_spectrum / np.linalg.norm(noise_spectrum)).astype(np.float32)  # unit expected norm
        self.spread = rng.uniform(0.6, 1.0, n_centres).astype(np.float32)  # noise norm relative to the centre
        self.weights = rng.dirichlet(np.full(n_centres, 2.0))  # some clusters bigger than others

    def sample(self, n: int, seed: int, chunk: int = 50_000) -> np.ndarray:
        """n l2-normalised float32 vectors."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.centres.shape[1]), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            owner = rng.choice(len(self.centres), m, p=self.weights)
            noise = (rng.standard_normal((m, out.shape[1]), dtype=np.float32) * self.noise_scale) @ self.noise_rotation
            x = self.centres[owner] + noise * self.spread[owner, None]
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def serialised_bytes(index: faiss.Index) -> int:
    """Size of faiss.serialize_index(index), counted as it is written (no copy of a 2 GB index in memory)."""
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    writer = faiss.PyCallbackIOWriter(count)
    faiss.write_index(index, writer)
    del writer
    return total


def reranked(index: faiss.Index, x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Top K ids after re-scoring the index's top RERANK exactly against the float32 descriptors ``x``."""
    _, ids = index.search(queries, RERANK)
    scores = np.einsum("qd,qkd->qk", queries, x[np.maximum(ids, 0)])
    scores[ids < 0] = -np.inf
    return np.take_along_axis(ids, np.argsort(-scores, axis=1, kind="stable")[:, :K], axis=1)


def one_at_a_time_ms(search, queries: np.ndarray, threads: int) -> float:
    """Median milliseconds of ``search`` (one query's top K), with ``threads`` OpenMP threads."""
    faiss.omp_set_num_threads(threads)
    search(queries[:2])  # warm-up
    times = []
    for q in queries:
        start = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def run_size(n: int, mixture: Mixture, queries: np.ndarray, threads: list[int], hnsw_max: int, all_threads: int) -> list[dict]:
    t = time.perf_counter()
    x = mixture.sample(n, seed=1)
    print(f"\n## N = {n:,}  ({time.perf_counter() - t:.0f} s to draw {x.nbytes / 2**30:.2f} GiB)", flush=True)
    rows = []
    exact_ids = None
    for name, kind, float16 in INDEXES:
        if kind == "hnsw" and n > hnsw_max:
            rows.append({"n": n, "index": name, "skipped": f"N > --hnsw-max {hnsw_max:,}"})
            continue
        faiss.omp_set_num_threads(all_threads)
        start = time.perf_counter()
        index = build_search_index(x, kind, float16=float16)
        build_s = time.perf_counter() - start
        faiss.omp_set_num_threads(all_threads)
        _, ids = index.search(queries, K)
        if exact_ids is None:  # the first index is exact float32: the ground truth
            exact_ids = ids
        row = {
            "n": n,
            "index": name,
            "kind": index_kind(index),
            "settings": search_settings(index),
            "build_s": round(build_s, 2),
            "bytes_per_image": round(serialised_bytes(index) / n, 1),
            "recall@100": round(recall_at(exact_ids, ids, K), 4),
        }
        for th in threads:
            row[f"ms_{th}t"] = round(one_at_a_time_ms(lambda q, index=index: index.search(q, K), queries, th), 3)
        rows.append(row)
        if kind == "ivfpq":
            faiss.omp_set_num_threads(all_threads)
            rows.append({**row, "index": f"ivfpq + re-rank {RERANK}", "bytes_per_image": row["bytes_per_image"] + 4 * x.shape[1],
                         "recall@100": round(recall_at(exact_ids, reranked(index, x, queries), K), 4)})
            for th in threads:
                rows[-1][f"ms_{th}t"] = round(one_at_a_time_ms(lambda q, index=index: reranked(index, x, q), queries, th), 3)
        for r in rows[-2 if kind == "ivfpq" else -1 :]:
            print(f"  {r['index']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("n", "index", "settings")), flush=True)
        del index
    sims = np.sort(queries[:50] @ x.T, axis=1)[:, ::-1]
    print(f"  query top-1/10/100 cosine: {sims[:, 0].mean():.2f} / {sims[:, 9].mean():.2f} / {sims[:, 99].mean():.2f}, "
          f"median {np.median(sims):.2f}")
    return rows


def markdown(rows: list[dict], threads: list[int]) -> str:
    label = lambda th: f"{th} thread{'s' if th != 1 else ''}"  # noqa: E731
    head = ["N", "index", "build s", "bytes / image", "recall@100"] + [f"ms / query, {label(th)}" for th in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']:,} | {r['index']} | skipped: {r['skipped']} |" + " |" * (len(head) - 3))
            continue
        cells = [f"{r['n']:,}", r["index"], f"{r['build_s']:.1f}", f"{r['bytes_per_image']:.0f}", f"{r['recall@100']:.3f}"]
        cells += [f"{r[f'ms_{th}t']:.2f}" for th in threads]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], threads: list[int]) -> str:
    """Each index against exact float32 at the same N: memory, latency (first thread count) and speed-up."""
    th = threads[0]
    out = []
    exact = {r["n"]: r for r in rows if r["index"] == "exact"}
    for r in rows:
        if "skipped" in r or r["index"] == "exact":
            continue
        e = exact[r["n"]]
        out.append(f"- N {r['n']:,}, {r['index']}: memory x{r['bytes_per_image'] / e['bytes_per_image']:.3f}, "
                   f"{e[f'ms_{th}t'] / r[f'ms_{th}t']:.1f}x faster ({th} thread), recall@100 {r['recall@100']:.3f}")
    return "\n".join(out)


def hnsw_extrapolation(rows: list[dict]) -> str:
    built = [r for r in rows if r["index"] == "hnsw" and "skipped" not in r]
    skipped = sorted({r["n"] for r in rows if r["index"] == "hnsw" and "skipped" in r})
    if not built or not skipped:
        return ""
    ref = max(built, key=lambda r: r["n"])
    # HNSW insertion costs about log(N) per vector: extrapolate build time as N log N from the largest built size
    est = lambda n: ref["build_s"] * n * np.log(n) / (ref["n"] * np.log(ref["n"]))  # noqa: E731
    return "\n".join(f"- HNSW at N {n:,} not built; N log N extrapolation from {ref['n']:,}: about {est(n) / 60:.0f} min "
                     f"to build on this machine, {ref['bytes_per_image']:.0f} bytes / image" for n in skipped)


def eth80_float16(data: Path) -> None:
    """mAP of unwhitened lite0 descriptors (size 256) of ETH-80-dev, each view a query against all other views
    (positives: the same object folder), with the descriptors in float32 and rounded to float16."""
    from camretrieval import Describer, load_backbone
    from camretrieval.evaluation.metrics import labels_mean_average_precision
    from camretrieval.extraction.images import find_images

    root = data / "eth80-dev"
    paths = find_images(root)
    d, done, _ = Describer(load_backbone("efficientnet_lite0"), size=256).describe_files(paths, root, progress=False)
    labels = np.array([paths[i].split("/")[0] for i in done])
    ids = range(len(labels))
    for name, x, index in [("float32", d, None), ("float16", d.astype(np.float16).astype(np.float32), None),
                           ("exact-float16 FAISS index", None, build_search_index(d, float16=True))]:
        if index is not None:  # the scores as the float16 index computes them (all N, so the ranking is complete)
            scores, order = index.search(d, len(d))
            similarity = np.empty_like(scores)
            np.put_along_axis(similarity, order, scores, axis=1)
        else:
            similarity = x @ x.T
        print(f"ETH-80-dev, {len(d)} images x {d.shape[1]}, {name}: mAP {labels_mean_average_precision(similarity, labels, ids)[0]:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="collection sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", default="1,0", help="thread counts for latency, comma-separated; 0 = all")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="build HNSW only up to this N")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--eth80", action="store_true", help="instead: float32 vs float16 mAP on ETH-80-dev")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    if args.eth80:
        eth80_float16(args.data)
        return
    all_threads = faiss.omp_get_max_threads()
    threads = [int(t) or all_threads for t in args.threads.split(",")]
    mixture = Mixture()
    queries = mixture.sample(args.queries, seed=2)
    print(f"d={DIM}, {N_CENTRES} mixture centres, {args.queries} held-out queries, k={K}, {all_threads} threads available, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    rows: list[dict] = []
    for n in [int(s) for s in args.sizes.split(",")]:
        rows += run_size(n, mixture, queries, threads, args.hnsw_max, all_threads)
    print("\n" + markdown(rows, threads) + "\n")
    print(ratios(rows, threads))
    print(hnsw_extrapolation(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
