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

Per size and index: build seconds (all threads), calibration seconds, bytes of the serialised index per image,
search latency of one query at a time (median over the queries; with 1 thread and with all threads), and recall@100
of the index's top 100 against exact float32 search on the fresh queries. The recall-targeted rows ("target 0.95")
are calibrated at build time by camretrieval.storage.ann.calibrate on 500 held-out members of the collection (their
recall there is shown too, "held-out"); the fresh queries check that the target holds on queries calibration never
saw. One more row re-scores IVF-PQ's top 400 exactly with the float32 descriptors (which a camretrieval Index keeps
anyway; its bytes / image count them). HNSW is built only up to --hnsw-max vectors (default 100k): on the 2 shared
cores of docs/search_scale.md a 1M x 512 HNSW graph took 25 min, as long as the rest of the 1M run (measured with
--indexes hnsw --hnsw-max 1000000); when larger sizes are skipped in a run that built a smaller one, their build
time is extrapolated instead.

--sweep instead prints the trade-off calibration navigates: recall@100 (fresh queries) and latency (1 thread) of
the "ivf" index, or of any FAISS factory string (--factory), over nprobe x k_factor.

    python benchmarks/search_scale.py [--sizes 10000,100000,1000000] [--threads 1,0] [--indexes ...] [--json out.json]
    python benchmarks/search_scale.py --sweep --sizes 100000 [--factory "IVF1265_HNSW32,PQ256x4fs,Refine(SQfp16)"]
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

from camretrieval.storage.ann import (  # noqa: E402
    IVF_MAX_TRAIN,
    IVF_TRAIN_PER_LIST,
    build_search_index,
    calibrate,
    index_kind,
    recall_at,
    search_settings,
    set_search_effort,
)

DIM = 512
N_CENTRES = 4000
K = 100
RERANK = 400  # ivfpq + exact re-scoring of its top 400 with the float32 descriptors (which an Index keeps anyway)
# (row name, kind, float16, recall targets): one build per entry, one row per target (None: the default effort)
INDEXES = [
    ("exact", None, False, [None]),
    ("exact-float16", None, True, [None]),
    ("hnsw", "hnsw", False, [None, 0.95]),
    ("ivfpq", "ivfpq", False, [None]),
    ("ivf", "ivf", False, [0.9, 0.95, 0.98]),
]
EFFORT_KEYS = ("nprobe", "k_factor", "ef_search")


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


def run_size(n: int, mixture: Mixture, queries: np.ndarray, threads: list[int], hnsw_max: int, all_threads: int,
             wanted: set[str]) -> list[dict]:
    t = time.perf_counter()
    x = mixture.sample(n, seed=1)
    print(f"\n## N = {n:,}  ({time.perf_counter() - t:.0f} s to draw {x.nbytes / 2**30:.2f} GiB)", flush=True)
    faiss.omp_set_num_threads(all_threads)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, exact_ids = exact.search(queries, K)  # the ground truth: exact float32 search
    del exact
    rows = []
    for name, kind, float16, targets in INDEXES:
        if name not in wanted:
            continue
        if kind == "hnsw" and n > hnsw_max:
            rows.append({"n": n, "index": name, "skipped": f"N > --hnsw-max {hnsw_max:,}"})
            continue
        faiss.omp_set_num_threads(all_threads)
        start = time.perf_counter()
        index = build_search_index(x, kind, float16=float16)
        build_s = time.perf_counter() - start
        nbytes = serialised_bytes(index)
        for target in targets:
            row = {"n": n, "index": name if target is None else f"{name}, target {target:.2f}", "kind": index_kind(index),
                   "build_s": round(build_s, 2), "bytes_per_image": round(nbytes / n, 1)}
            faiss.omp_set_num_threads(all_threads)
            if target is not None:
                start = time.perf_counter()
                calibration = calibrate(index, x, target)
                row |= {"calibrate_s": round(time.perf_counter() - start, 2), "held_out_recall": round(calibration.recall, 4)}
            row["settings"] = search_settings(index)
            row["effort"] = {key: row["settings"][key] for key in EFFORT_KEYS if key in row["settings"]}
            _, ids = index.search(queries, K)
            row["recall@100"] = round(recall_at(exact_ids, ids, K), 4)
            for th in threads:
                row[f"ms_{th}t"] = round(one_at_a_time_ms(lambda q, index=index: index.search(q, K), queries, th), 3)
            rows.append(row)
            _print_row(row)
        if kind == "ivfpq":
            faiss.omp_set_num_threads(all_threads)
            row = {**rows[-1], "index": f"ivfpq + re-rank {RERANK}", "bytes_per_image": rows[-1]["bytes_per_image"] + 4 * x.shape[1],
                   "recall@100": round(recall_at(exact_ids, reranked(index, x, queries), K), 4)}
            for th in threads:
                row[f"ms_{th}t"] = round(one_at_a_time_ms(lambda q, index=index: reranked(index, x, q), queries, th), 3)
            rows.append(row)
            _print_row(row)
        del index
    sims = np.sort(queries[:50] @ x.T, axis=1)[:, ::-1]
    print(f"  query top-1/10/100 cosine: {sims[:, 0].mean():.2f} / {sims[:, 9].mean():.2f} / {sims[:, 99].mean():.2f}, "
          f"median {np.median(sims):.2f}")
    return rows


def _print_row(row: dict) -> None:
    print(f"  {row['index']}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("n", "index", "settings")), flush=True)


def effort_text(row: dict) -> str:
    names = {"nprobe": "nprobe", "k_factor": "re-score", "ef_search": "efSearch"}
    return ", ".join(f"{names[key]} {value}" + ("k" if key == "k_factor" else "") for key, value in row.get("effort", {}).items())


def sweep(n: int, mixture: Mixture, queries: np.ndarray, factory: str | None, all_threads: int) -> None:
    """recall@100 (fresh queries) and latency (1 thread, one query at a time) over nprobe x k_factor."""
    x = mixture.sample(n, seed=1)
    faiss.omp_set_num_threads(all_threads)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, exact_ids = exact.search(queries, K)
    del exact
    start = time.perf_counter()
    if factory is None:
        index = build_search_index(x, "ivf")
    else:  # trained like "ivf": on IVF_TRAIN_PER_LIST vectors per list (at least IVF_MAX_TRAIN)
        index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        lists = faiss.extract_index_ivf(index).nlist
        size = min(n, max(IVF_MAX_TRAIN, IVF_TRAIN_PER_LIST * lists))
        index.train(x[np.sort(np.random.default_rng(0).choice(n, size, replace=False))])
        index.add(x)
    settings = search_settings(index)
    print(f"\n## sweep, N = {n:,}: {factory or 'ivf'} ({settings}), built in {time.perf_counter() - start:.0f} s, "
          f"{serialised_bytes(index) / n:.0f} bytes / image")
    refines = isinstance(faiss.downcast_index(index), faiss.IndexRefine)
    factors = (1, 2, 4, 8) if refines else (None,)
    print("| nprobe | " + " | ".join(f"re-score {f}k: recall@100, ms" if f else "recall@100, ms" for f in factors) + " |")
    print("|---|" + "---|" * len(factors))
    for nprobe in (8, 16, 32, 64, 128, 256):
        if nprobe > settings["nlist"]:
            break
        cells = []
        for factor in factors:
            set_search_effort(index, nprobe=nprobe, k_factor=factor)
            faiss.omp_set_num_threads(all_threads)
            _, ids = index.search(queries, K)
            ms = one_at_a_time_ms(lambda q: index.search(q, K), queries, 1)
            cells.append(f"{recall_at(exact_ids, ids, K):.3f}, {ms:.2f}")
        print(f"| {nprobe} | " + " | ".join(cells) + " |", flush=True)


def markdown(rows: list[dict], threads: list[int]) -> str:
    label = lambda th: f"{th} thread{'s' if th != 1 else ''}"  # noqa: E731
    head = ["N", "index", "search effort", "build s", "calibrate s", "bytes / image", "held-out recall", "recall@100"]
    head += [f"ms / query, {label(th)}" for th in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['n']:,} | {r['index']} | skipped: {r['skipped']} |" + " |" * (len(head) - 3))
            continue
        held = r.get("held_out_recall")
        cells = [f"{r['n']:,}", r["index"], effort_text(r), f"{r['build_s']:.1f}", f"{r.get('calibrate_s', 0):.1f}",
                 f"{r['bytes_per_image']:.0f}", f"{held:.3f}" if held is not None else "", f"{r['recall@100']:.3f}"]
        cells += [f"{r[f'ms_{th}t']:.2f}" for th in threads]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict], threads: list[int]) -> str:
    """Each index against exact float32 at the same N: memory, latency (first thread count) and speed-up."""
    th = threads[0]
    out = []
    exact = {r["n"]: r for r in rows if r["index"] == "exact"}
    for r in rows:
        if "skipped" in r or r["index"] == "exact" or r["n"] not in exact:
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
    parser.add_argument("--indexes", default=",".join(name for name, *_ in INDEXES),
                        help="which indexes, comma-separated (exact float32 is always the ground truth)")
    parser.add_argument("--sweep", action="store_true", help="instead: recall and latency over nprobe x k_factor")
    parser.add_argument("--factory", help="with --sweep: a FAISS index_factory string instead of the ivf kind")
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
    wanted = set(args.indexes.split(","))
    unknown = wanted - {name for name, *_ in INDEXES}
    if unknown:
        parser.error(f"unknown --indexes {', '.join(sorted(unknown))}: choose from {', '.join(name for name, *_ in INDEXES)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.sweep:
        for n in sizes:
            sweep(n, mixture, queries, args.factory, all_threads)
        return
    rows: list[dict] = []
    for n in sizes:
        rows += run_size(n, mixture, queries, threads, args.hnsw_max, all_threads, wanted)
    print("\n" + markdown(rows, threads) + "\n")
    print(ratios(rows, threads))
    print(hnsw_extrapolation(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
