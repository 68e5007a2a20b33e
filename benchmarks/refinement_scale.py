"""Query-time refinement at 100 000 images, maps stored in format 2 (issue 14, docs/refinement.md "At 100 000 images").

A SIMULATED index: clutter-dev's 400 real images (their real maps and descriptors, from the index that
``benchmarks/refinement.py`` builds in the same --workdir) plus synthetic distractors up to --images. No distractor
image exists: each distractor's maps are drawn from the real maps of a pool of landmark photos (clutter-dev's own
backgrounds, so hard negatives for a descriptor of the scene):

- the pool: the 23 landmark photos and --pool-crops crops of them (``make_distractors.landmark_crop``: 30-80% of the
  area, aspect 3:4 to 4:3, flipped with probability 1/2, shorter side 360-600 px), forwarded through
  efficientnet_lite0 at 448 px like any indexed image: real maps of real photos, of many map shapes;
- each distractor: a pool map, flipped left-right with probability 1/2; a random rectangle of 20-50% of its cells
  replaced by the same cells of another pool map of the same shape (CutMix); every non-zero value below 6 of
  channel k multiplied by a factor drawn per channel in [0.8, 1.25] and clipped to [0, 6]. Zeros stay zeros and
  saturated values stay 6, so the sparsity (95% zeros), the value histogram and the spatial runs the codec relies
  on are those of real maps (the bytes per image of both are printed);
- its descriptor computed from those maps exactly as the indexing pipeline computes it from a forward pass (the
  index's N_c = 64 classes, Eq. 1-4, PCA-whitening, aggregation), and written with the index's own writer
  (``ShardWriter``: shards of 10 000 images, maps encoded on its background thread).

Build time is reported without the forward passes a real collection would need (their cost per image is printed,
measured on clutter-dev). Queries: --queries of clutter-dev's 400 box queries (every 4th: all 40 objects), positives
the other 9 views of the object, the query's own image excluded, every distractor a negative. Latency per query with
one torch thread (plus the thread that decodes the next batch of maps), each pipeline timed end to end from the
query's description: OfA (exact search), OnA (N_c = 8) over the OfA top 100, 300 and 1000, OfA + R100, OfA + R100 +
QE2; the query's forward pass is shown separately.

    python benchmarks/refinement_scale.py [--workdir /tmp/camretrieval-refinement] [--images 100000] [--queries 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from camretrieval import Index
from camretrieval.extraction.images import find_images, load_image
from camretrieval.method.feature_maps import FeatureMaps
from camretrieval.search.refinement import SearchOptions
from camretrieval.storage.catalog import FileState, IndexStore
from camretrieval.storage.shards import ShardWriter
from camretrieval.storage.writer import index_meta
from make_distractors import SEED, landmark_crop
from refinement import bytes_per_image, mean_average_precision, prepare, similarity_row

SHARD = 10_000
NO_FILE = FileState(-1, -1)


def pool_maps(args: argparse.Namespace, index: Index) -> list[np.ndarray]:
    """Real float16 maps (H x W x K) of the landmark photos and of --pool-crops crops of them."""
    folder = args.workdir / f"pool_{args.pool_crops}"
    photos = sorted((args.data / "landmarks").glob("*.jpg"))
    if not folder.is_dir():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(SEED)
        for photo in photos:
            shutil.copy(photo, folder / photo.name)
        for number in range(args.pool_crops):
            photo = photos[number % len(photos)]
            landmark_crop(load_image(photo), rng).save(folder / f"{photo.stem}-crop{number}.jpg", quality=90)
    cache = args.workdir / f"pool_{args.pool_crops}.npz"
    if cache.is_file():
        stored = np.load(cache, allow_pickle=False)
        return [stored[f"map{i}"] for i in range(len(stored.files))]
    paths = find_images(folder)
    found: dict[int, np.ndarray] = {}
    for indices, maps in index.describer.iterate_files(paths, folder, lambda m: m.features, 8, 2, False):
        for i, features in zip(indices, maps):
            found[i] = features.permute(1, 2, 0).to(torch.float16).numpy()
    pool = [found[i] for i in sorted(found)]
    np.savez(cache, **{f"map{i}": maps for i, maps in enumerate(pool)})
    return pool


def synthetic(pool: list[torch.Tensor], by_shape: dict, rng: np.random.Generator, sources: list[int]) -> torch.Tensor:
    """Distractors' maps (B x H x W x K, float32 holding float16 values) from same-shape pool maps ``sources`` (see
    the module docstring)."""
    maps = torch.stack([pool[source] for source in sources])
    batch, height, width, channels = maps.shape
    partners = by_shape[(height, width)]
    for row in range(batch):
        if rng.random() < 0.5:
            maps[row] = maps[row].flip(1)
        if len(partners) > 1:
            other = pool[partners[rng.integers(len(partners))]]
            area = rng.uniform(0.2, 0.5) * height * width
            box_h = int(np.clip(round(np.sqrt(area * rng.uniform(0.5, 2))), 1, height))
            box_w = int(np.clip(round(area / box_h), 1, width))
            top, left = int(rng.integers(height - box_h + 1)), int(rng.integers(width - box_w + 1))
            maps[row, top : top + box_h, left : left + box_w] = other[top : top + box_h, left : left + box_w]
    scale = torch.from_numpy(rng.uniform(0.8, 1.25, size=(batch, 1, 1, channels)).astype(np.float32))
    unsaturated = (maps > 0) & (maps < 6)
    return torch.where(unsaturated, (maps * scale).clamp(max=6), maps).half().float()


def build(args: argparse.Namespace, real: Index, index_dir: Path, pool: list[np.ndarray]) -> dict:
    """Write the simulated index (see the module docstring); returns timings."""
    rng = np.random.default_rng(SEED)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for number, maps in enumerate(pool):
        by_shape.setdefault(maps.shape[:2], []).append(number)
    describer = real.describer
    meta = index_meta(real.settings, None, False) | {"dim": int(real.descriptors.shape[1])}
    started = time.perf_counter()
    seconds = {"synthesis": 0.0}
    with IndexStore.writing(index_dir) as store:
        meta["whitening"] = store.save_whitening(real.whitening)
        shard = ShardWriter(store.directory, len(real), True, False)
        for row, path in enumerate(real.paths):  # the 400 real images, as stored
            shard.add("clutter-dev/" + path, NO_FILE, real.descriptors[row], real.maps.image_tensors(row)[0])
        store.commit(shard.name, shard.publish(), meta=meta)
        count = args.images - len(real)
        sources = np.sort(rng.integers(len(pool), size=count))  # in batches of one map shape
        pool_tensors = [torch.from_numpy(maps.astype(np.float32)) for maps in pool]
        shard, start = None, 0
        while start < count:
            end = start + 1
            shape = pool[sources[start]].shape
            while end < count and end - start < 32 and pool[sources[end]].shape == shape:
                end += 1
            tick = time.perf_counter()
            maps = synthetic(pool_tensors, by_shape, rng, sources[start:end].tolist())
            seconds["synthesis"] += time.perf_counter() - tick
            features = maps.permute(0, 3, 1, 2)
            descriptors = describer.descriptors_of_maps(FeatureMaps(features, features)).numpy()
            for number, descriptor, image_maps in zip(range(start, end), descriptors, features):
                if shard is None:
                    shard = ShardWriter(store.directory, SHARD, True, False)
                shard.add(f"synthetic/{number:06d}.jpg", NO_FILE, descriptor, image_maps)
                if len(shard) == SHARD:
                    store.commit(shard.name, shard.publish())
                    shard = None
                    print(f"  {len(real) + number + 1} images, {time.perf_counter() - started:.0f} s", flush=True)
            start = end
        if shard is not None:
            store.commit(shard.name, shard.publish())
    seconds["total"] = time.perf_counter() - started
    return seconds


def forward_seconds(real: Index, count: int = 20) -> float:
    """Seconds per image of the indexing forward pass at the index's size (one image at a time, clutter-dev)."""
    paths = [real.image_root / p for p in real.paths[:count]]
    real.describer.image_maps(paths[0])
    started = time.perf_counter()
    for path in paths:
        real.describer.image_maps(path)
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-refinement"))
    parser.add_argument("--images", type=int, default=100_000, help="images in the simulated index (default 100 000)")
    parser.add_argument("--pool-crops", type=int, default=200, help="landmark crops forwarded for the pool")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.backbone, args.size, args.distractors = "efficientnet_lite0", 448, None

    real, _ = prepare(args)  # the 400-image index of benchmarks/refinement.py (and its PCA-whitening)
    if real.maps.formats != {2}:
        sys.exit(f"the index in {args.workdir} keeps format 1 maps: run camretrieval index on it first (it upgrades them)")
    index_dir = args.workdir / f"index_scale_{args.images}"
    built = None
    if not IndexStore.exists(index_dir):
        pool = pool_maps(args, real)
        print(f"pool: {len(pool)} real maps of {len({m.shape[:2] for m in pool})} shapes; building {args.images} images")
        built = build(args, real, index_dir, pool)
    index = Index.open(index_dir)
    if len(index) != args.images:
        sys.exit(f"{index_dir} holds {len(index)} images, not {args.images} (an interrupted build?): delete it and run again")
    stored = bytes_per_image(index_dir, len(index))
    maps_bytes = [stored.get(name, 0.0) for name in ("features_maps.blocks", "features_maps_blocks.npy")]
    torch.set_num_threads(1)
    forward = forward_seconds(real)
    boxes = json.loads((args.data / "clutter-dev" / "boxes.json").read_text())
    labels = [p.split("/")[1] if p.startswith("clutter-dev/") else "distractor" for p in index.paths]
    query_ids = [i for i, p in enumerate(index.paths) if p.startswith("clutter-dev/")]
    query_ids = query_ids[:: max(1, len(query_ids) // args.queries)][: args.queries]
    print(f"{len(index)} images ({len(index) - 400} synthetic), {len(query_ids)} queries; stored per image "
          f"{stored['total'] / 1e3:.1f} kB, of which maps {sum(maps_bytes) / 1e3:.1f} kB (real images' maps: "
          f"{real.maps.nbytes() / len(real) / 1e3:.1f} kB)")
    if built:
        print(f"build without forward passes: {built['total']:.0f} s ({1e3 * built['total'] / len(index):.2f} ms per "
              f"image, of which synthesis {1e3 * built['synthesis'] / len(index):.2f} ms); a forward pass at 448 px: "
              f"{1e3 * forward:.0f} ms per image here")

    needed = SearchOptions(online=True, online_classes=8, rerank=100)
    refinement = index.refinement
    index.describe_query(args.data / "clutter-dev" / index.paths[query_ids[0]].split("/", 1)[1], None, needed)  # warm-up
    def online(top):
        return lambda q, x: refinement.initial_ranking(q, SearchOptions(online=True, online_classes=8, online_top=top), x)

    pipelines = {
        "OfA": lambda q, x: refinement.initial_ranking(q, SearchOptions(), x),
        "OnA N_c=8, top 100": online(100),
        "OnA N_c=8, top 300": online(300),
        "OnA N_c=8, top 1000": online(1000),
        "--refine (OnA N_c=8 unwhitened, top 1000)": lambda q, x: refinement.initial_ranking(q, SearchOptions.refine(), x),
        "OfA + R100": lambda q, x: refinement.rerank(q, refinement.initial_ranking(q, SearchOptions(), x), 100),
        "OfA + R100 + QE2": lambda q, x: refinement.expand(
            refinement.rerank(q, refinement.initial_ranking(q, SearchOptions(), x), 100), 2),
    }
    rows = {name: [] for name in pipelines}
    seconds = {name: [] for name in pipelines}
    cpu_seconds = {name: [] for name in pipelines}  # of all threads: what an idle machine's 2 cores would take
    forwards = []
    for count, query_id in enumerate(query_ids, start=1):
        relative = index.paths[query_id].split("/", 1)[1]
        started = time.perf_counter()
        query = index.describe_query(args.data / "clutter-dev" / relative, tuple(boxes[relative]), needed)
        forwards.append(time.perf_counter() - started)
        for name, pipeline in pipelines.items():
            started, cpu = time.perf_counter(), time.process_time()
            ranking = pipeline(query, [query_id])
            seconds[name].append(time.perf_counter() - started)
            cpu_seconds[name].append(time.process_time() - cpu)
            rows[name].append(similarity_row(ranking, len(index)))
        if count % 10 == 0:
            print(f"  {count} queries", flush=True)
    print(f"\nquery forward pass (box region, top-64 class vectors): {1e3 * np.mean(forwards):.0f} ms per query")
    print(f"{'method':<24} {'mAP':>6} {'ms per query':>13} {'median':>7} {'max':>7} {'CPU ms':>7}")
    table = []
    for name in pipelines:
        mean_ap = mean_average_precision(rows[name], labels, query_ids, {})
        times = 1e3 * np.array(seconds[name])
        cpu = 1e3 * float(np.mean(cpu_seconds[name]))
        table.append({"method": name, "mAP": mean_ap, "ms": float(times.mean()), "median_ms": float(np.median(times)),
                      "max_ms": float(times.max()), "cpu_ms": cpu})
        print(f"{name:<24} {mean_ap:6.3f} {times.mean():13.0f} {np.median(times):7.0f} {times.max():7.0f} {cpu:7.0f}")
    print(f"load average after the queries: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps({"images": len(index), "queries": len(query_ids), "bytes_per_image": stored,
                                         "build_seconds": built, "forward_ms": 1e3 * float(np.mean(forwards)),
                                         "index_forward_ms": 1e3 * forward, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
