"""What class weighting costs, and how close indexing runs to the backbone's own speed (issue: dynamic collections).

On the same images, backbone and size, one run, each measurement repeated ``--repeats`` times interleaved (the
fastest kept: the machine is shared), printing seconds per image and the ratios:

- (a) ``index`` with 64 CAMs (the paper's descriptor) over ``index`` with raw sum pooling, both without stored maps.
  The paper's Table 1b reports 3x (0.49 s -> 1.5 s per image); here the CAM arithmetic is two small matrix
  products per image.
- (b) end-to-end ``index`` throughput (listing, decoding in DataLoader workers, forward, CAMs, pooling, whitening,
  writing shards and committing them; with and without the stored maps) over a bare forward pass of the backbone
  on the same images, already decoded and resized, in full same-shape batches (channels-last, as ``index`` runs it).

    python benchmarks/extraction_cost.py [--images ../shared/data/clutter-dev] [--limit 200] [--size 448]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from camretrieval import Describer, ExtractionSettings, PCAWhitening, load_backbone
from camretrieval.extraction.images import ImageFileDataset, find_images
from camretrieval.storage.writer import update_index


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_images = Path(__file__).resolve().parents[2] / "shared" / "data" / "clutter-dev"
    parser.add_argument("--images", type=Path, default=default_images)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="float32", help="the forward pass: float32, bfloat16 or float16 (GPU)")
    args = parser.parse_args()

    paths = find_images(args.images)[: args.limit]
    backbone = load_backbone(args.backbone)
    # Any whitening of the right shape: its cost, not its quality, is measured.
    rng = np.random.default_rng(0)
    settings = Describer(backbone, args.size).settings.to_dict()
    workdir = Path(tempfile.mkdtemp(prefix="camretrieval-extraction-"))
    images = workdir / "images"  # exactly the images measured, linked
    for path in paths:
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        (images / path).symlink_to((args.images / path).resolve())
    whitening = {
        pooling: PCAWhitening(512, settings | {"pooling": pooling}).fit(np.abs(rng.normal(size=(600, 1280))))
        for pooling in ("cam", "sum")
    }

    def index(pooling: str, keep_maps: bool) -> None:
        target = workdir / "index"
        shutil.rmtree(target, ignore_errors=True)
        extraction = ExtractionSettings(size=args.size, n_classes=64, pooling=pooling)
        update_index(
            target, images, whitening[pooling], extraction, keep_maps=keep_maps, batch_size=args.batch_size,
            workers=args.workers, device=args.device, progress=False, precision=args.precision,
        )

    # The bare forward pass: the same images, decoded and resized beforehand, in full same-shape batches.
    describer = Describer(backbone, args.size, device=args.device, precision=args.precision)
    dataset = ImageFileDataset(paths, args.size, backbone.mean, backbone.std, backbone.stride, args.images)
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for item in (dataset[i] for i in range(len(dataset))):
        by_shape.setdefault(tuple(item.tensor.shape), []).append(item.tensor)
    batches = [
        torch.stack(group[start : start + args.batch_size])
        for group in by_shape.values()
        for start in range(0, len(group), args.batch_size)
    ]

    def bare_forward() -> None:
        for batch in batches:
            describer.feature_maps(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    bare_forward()  # warm-up: first-call allocations and kernel selection
    runs = {
        "bare forward": bare_forward,
        "index, raw sum pooling": lambda: index("sum", False),
        "index, 64 CAMs": lambda: index("cam", False),
        "index, 64 CAMs + maps": lambda: index("cam", True),
    }
    seconds = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], timed(run))
    shutil.rmtree(workdir, ignore_errors=True)
    n = len(paths)
    print(f"{n} images from {args.images} ({len(by_shape)} shapes after resizing), {args.backbone}, size {args.size}, "
          f"{torch.get_num_threads()} threads, {args.workers} decoding workers, {args.device} {args.precision}, "
          f"best of {args.repeats}")
    for name, value in seconds.items():
        print(f"  {name:<24} {value / n:.4f} s/image  ({n / value:.1f} images/s)")
    print(f"(a) 64 CAMs / raw sum pooling:                   {seconds['index, 64 CAMs'] / seconds['index, raw sum pooling']:.3f}x")
    print(f"(b) index throughput / bare forward pass:        {seconds['bare forward'] / seconds['index, 64 CAMs']:.3f}")
    print(f"    the same, storing the maps (the default):    {seconds['bare forward'] / seconds['index, 64 CAMs + maps']:.3f}")


if __name__ == "__main__":
    main()
