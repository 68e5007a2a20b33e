"""What the stored maps hold, and what it costs to store them (issue 14, docs/refinement.md "What is stored").

Extracts efficientnet_lite0's head maps at --size 448 (the maps the index stores, float16, cell-major) of clutter-dev
(all 400 images) and eth80-dev (every 4th image: 410), then prints per set:

- the value histogram: the fractions exactly 0, exactly 6 (ReLU6's saturation), negative, and other;
- empirical entropies: order 0 of the float16 values (bits per value and kB per image: what a coder of independent
  values could reach), of the code {0, 6, other} alone and given the same channel's code in the cell to the left,
  and of the other values' high and low bytes;
- the bytes per image of candidate codecs, each per image (so that one image decodes alone): float16 as stored in
  format 1, zstd (level 3) on the float16 bytes (cell-major; byte-shuffled channel-major), a bitmap of the non-zero
  values plus the values, format 2 (storage/map_codec.py: gap-coded positions plus the values' byte planes), and for
  reference a lossy 8-bit quantisation of [0, 6] (not used: format 2 is lossless and small enough);
- the time to decode format 2 into float32 (what a search does), against reading format 1, per image, best of 5
  passes over the set's first 80 images, one thread: wall-clock and the thread's CPU time; and OnA (N_c = 8, random
  classes, a 512-d whitening) over the first 160 images stored in either format, in one process.

    python benchmarks/map_entropy.py [--data ../shared/data] [--cache /tmp/camretrieval-maps] [--size 448]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

from camretrieval import Describer, PCAWhitening, load_backbone
from camretrieval.extraction.images import find_images
from camretrieval.search.online import online_descriptors
from camretrieval.storage.map_codec import decode_block, decode_into, encode_block
from camretrieval.storage.maps import MapStoreWriter


def extract(data: Path, name: str, every: int, size: int, cache: Path | None) -> list[np.ndarray]:
    """The float16 cell-major maps (H x W x K) of every ``every``-th image of ``data/name``, cached as .npz."""
    file = cache / f"{name}_{every}_{size}.npz" if cache else None
    if file is not None and file.is_file():
        stored = np.load(file, allow_pickle=False)
        cells, table = stored["cells"], stored["table"]
        return [cells[start : start + h * w].reshape(h, w, -1) for start, h, w in table]
    root = data / name
    paths = find_images(root)[::every]
    describer = Describer(load_backbone("efficientnet_lite0"), size=size)
    found = {}
    for indices, maps in describer.iterate_files(paths, root, lambda m: m.features, 8, 2, False):
        for index, features in zip(indices, maps):
            found[index] = features.permute(1, 2, 0).to(torch.float16).numpy()
    images = [found[i] for i in sorted(found)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        sizes = [m.shape[0] * m.shape[1] for m in images]
        table = np.array([[start, m.shape[0], m.shape[1]] for start, m in zip(np.cumsum([0] + sizes[:-1]), images)])
        np.savez(file, cells=np.concatenate([m.reshape(-1, m.shape[2]) for m in images]), table=table)
    return images


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def codes_of(values: np.ndarray) -> np.ndarray:
    return np.where(values == 0, 0, np.where(values == 6, 1, 2)).astype(np.uint8)


def statistics(images: list[np.ndarray]) -> None:
    values = np.concatenate([m.reshape(-1) for m in images])
    bits = values.view(np.uint16)
    per_image = len(values) / len(images)
    codes = codes_of(values)
    other = bits[codes == 2]
    print(f"  {per_image:.0f} values per image: exactly 0 {np.mean(codes == 0):.4f}, exactly 6 {np.mean(codes == 1):.4f}, "
          f"other {np.mean(codes == 2):.4f} (negative {np.mean(values < 0):.4f}; {len(np.unique(other))} distinct)")
    h0 = entropy(np.bincount(bits, minlength=65536))
    print(f"  order-0 entropy of the float16 values: {h0:.3f} bits per value = {h0 * per_image / 8e3:.1f} kB per image")
    pairs = np.concatenate([(codes_of(m)[:, 1:] * 3 + codes_of(m)[:, :-1]).reshape(-1) for m in images])
    joint = np.bincount(pairs, minlength=9)
    conditional = entropy(joint) - entropy(joint.reshape(3, 3).sum(axis=0))
    print(f"  code (0 / 6 / other): {entropy(np.bincount(codes)):.3f} bits per value, {conditional:.3f} given the "
          f"left cell's code; other values: {entropy(np.bincount(other, minlength=65536)):.2f} bits each (high byte "
          f"{entropy(np.bincount(other >> 8, minlength=256)):.2f}, low byte {entropy(np.bincount(other & 255, minlength=256)):.2f})")


def byte_planes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values.view(np.uint8).reshape(-1, 2).T).tobytes()


def codec_sizes(images: list[np.ndarray]) -> dict[str, float]:
    compress = zstandard.ZstdCompressor(level=3).compress
    sizes: dict[str, list[int]] = {}
    for maps in images:
        height, width, channels = maps.shape
        cells = maps.reshape(-1, channels)
        by_channel = np.ascontiguousarray(cells.T).reshape(-1)
        nonzero = by_channel.view(np.uint16) != 0
        quantised = np.rint(np.clip(by_channel.astype(np.float32), 0, 6) * (255 / 6)).astype(np.uint8)
        for name, size in [
            ("float16 (format 1)", cells.nbytes),
            ("zstd, float16 bytes, cell-major", len(compress(cells.tobytes()))),
            ("zstd, byte planes, channel-major", len(compress(byte_planes(by_channel)))),
            ("zstd, bitmap + value byte planes", len(compress(np.packbits(nonzero).tobytes())) + len(compress(byte_planes(by_channel[nonzero])))),
            ("format 2 (gap-coded positions + value byte planes)", len(encode_block(cells, height, width))),
            ("lossy reference: 8 bits on [0, 6], zstd, channel-major", len(compress(quantised.tobytes()))),
        ]:
            sizes.setdefault(name, []).append(size)
    return {name: float(np.mean(values)) for name, values in sizes.items()}


def decode_times(images: list[np.ndarray], repeats: int = 5) -> dict[str, float]:
    """Seconds per image to read format 1 (float16 -> float32 copy) and format 2 (decode) into float32 buffers:
    wall-clock and this thread's CPU time (less sensitive to other processes on a shared machine), best of
    ``repeats``."""
    blocks = [encode_block(m.reshape(-1, m.shape[2]), m.shape[0], m.shape[1]) for m in images]
    outs = [np.empty((m.shape[0] * m.shape[1], m.shape[2]), np.float32) for m in images]

    def read_dense():
        for maps, out in zip(images, outs):
            out[...] = maps.reshape(out.shape)

    def read_blocks():
        for maps, block, out in zip(images, blocks, outs):
            decode_into(decode_block(block, 0, maps.shape[0], maps.shape[1], maps.shape[2]), out)

    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, read in (("format 1", read_dense), ("format 2", read_blocks)):
            started, cpu = time.perf_counter(), time.thread_time()
            read()
            for key, value in ((name, time.perf_counter() - started), (name + " cpu", time.thread_time() - cpu)):
                best[key] = min(best.get(key, np.inf), value / len(images))
    return best


def online_times(images: list[np.ndarray], repeats: int = 3) -> dict[str, float]:
    """Seconds per image of OnA (N_c = 8: decoding plus Eq. 1-4 and a 1280 -> 512 whitening) over ``images`` stored in
    format 1 and in format 2, alternating in one process (best of ``repeats``; CPU: all threads, the decoding thread
    of ``MapStore.batches`` included)."""
    rng = np.random.default_rng(0)
    weight = load_backbone("efficientnet_lite0").classifier_weight
    whitening = PCAWhitening(512).fit(np.abs(rng.normal(size=(2000, 1280))).astype(np.float32))
    classes = rng.choice(weight.shape[0], 8, replace=False).tolist()
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        stores = {}
        for maps_format in (1, 2):
            (Path(folder) / str(maps_format)).mkdir()
            writer = MapStoreWriter(len(images), False, Path(folder) / str(maps_format), maps_format)
            for number, maps in enumerate(images):
                writer.add_cells("features", number, maps.reshape(-1, maps.shape[2]), maps.shape[0], maps.shape[1])
            stores[f"format {maps_format}"] = writer.finish(range(len(images)))
        for _ in range(repeats):
            for name, store in stores.items():
                started, cpu = time.perf_counter(), time.process_time()
                online_descriptors(store, np.arange(len(images)), classes, weight, whitening)
                for key, value in ((name, time.perf_counter() - started), (name + " cpu", time.process_time() - cpu)):
                    best[key] = min(best.get(key, np.inf), value / len(images))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/camretrieval-maps"))
    parser.add_argument("--size", type=int, default=448)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, every in (("clutter-dev", 1), ("eth80-dev", 4)):
        images = extract(args.data, name, every, args.size, args.cache)
        print(f"\n{name} ({len(images)} images), efficientnet_lite0 head at {args.size} px")
        statistics(images)
        print("  bytes per image:")
        for codec, size in codec_sizes(images).items():
            print(f"    {codec:<58} {size / 1e3:7.1f} kB")
        times = decode_times(images[:80])
        print("  into float32, per image (one thread, best of 5): " + ", ".join(
            f"{name} {1e3 * times[name]:.2f} ms (CPU {1e3 * times[name + ' cpu']:.2f} ms)" for name in ("format 1", "format 2")))
        times = online_times(images[:160])
        print("  OnA N_c = 8 over 160 images, per image (one torch thread + the decoding thread): " + ", ".join(
            f"{name} {1e3 * times[name]:.2f} ms (CPU {1e3 * times[name + ' cpu']:.2f} ms)" for name in ("format 1", "format 2")))
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
