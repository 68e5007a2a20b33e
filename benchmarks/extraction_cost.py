"""What class weighting costs, and how close indexing runs to the backbone's own speed (issue: dynamic collections).

On the same images, backbone and size, one run, printing seconds per image and two ratios:

- (a) indexing with 64 CAMs (the paper's descriptor) over indexing with raw sum pooling. The paper's Table 1b
  reports 3x (0.49 s -> 1.5 s per image); here the CAM arithmetic is two small matrix products per image.
- (b) end-to-end indexing throughput (decoding in DataLoader workers, forward, CAMs, pooling, whitening) over a
  bare forward pass of the backbone on the same images, already decoded and resized, in the same batches.

    python benchmarks/extraction_cost.py [--images ../shared/data/clutter-dev] [--limit 200] [--size 448]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from camretrieval import Describer, PCAWhitening, load_backbone
from camretrieval.images import ImageFileDataset, find_images


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
    args = parser.parse_args()

    paths = find_images(args.images)[: args.limit]
    backbone = load_backbone(args.backbone)
    # Any whitening of the right shape: its cost, not its quality, is measured.
    rng = np.random.default_rng(0)
    settings = Describer(backbone, args.size).settings.to_dict()
    whitening = {
        pooling: PCAWhitening(512, settings | {"pooling": pooling}).fit(np.abs(rng.normal(size=(600, 1280))))
        for pooling in ("cam", "sum")
    }

    def index(pooling: str) -> None:
        describer = Describer(backbone, args.size, 64, whitening[pooling], args.device, pooling)
        describer.describe_files(paths, args.images, args.batch_size, args.workers, progress=False)

    # The bare forward pass: the same images, decoded and resized beforehand, in the same same-shape batches.
    dataset = ImageFileDataset(paths, args.size, backbone.mean, backbone.std, backbone.stride, args.images)
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for item in (dataset[i] for i in range(len(dataset))):
        by_shape.setdefault(tuple(item.tensor.shape), []).append(item.tensor)
    batches = [
        torch.stack(group[start : start + args.batch_size])
        for group in by_shape.values()
        for start in range(0, len(group), args.batch_size)
    ]
    model = backbone.to(args.device)

    def bare_forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch.to(args.device))

    bare_forward()  # warm-up: first-call allocations and kernel selection
    seconds = {
        "bare forward": timed(bare_forward),
        "index, raw sum pooling": timed(lambda: index("sum")),
        "index, 64 CAMs": timed(lambda: index("cam")),
    }
    n = len(paths)
    print(f"{n} images from {args.images}, {args.backbone}, size {args.size}, {torch.get_num_threads()} threads")
    for name, value in seconds.items():
        print(f"  {name:<24} {value / n:.4f} s/image  ({n / value:.1f} images/s)")
    print(f"(a) 64 CAMs / raw sum pooling:            {seconds['index, 64 CAMs'] / seconds['index, raw sum pooling']:.3f}x")
    print(f"(b) index throughput / bare forward pass: {seconds['bare forward'] / seconds['index, 64 CAMs']:.3f}")


if __name__ == "__main__":
    main()
