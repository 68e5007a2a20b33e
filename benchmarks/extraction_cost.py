"""How close `camretrieval index` runs to the machine's limit, and to the peers' way of extracting (issue 13).

On the same images, backbone and size, in one run, every measurement repeated ``--repeats`` times interleaved (the
fastest of each kept: the machine is shared), seconds per image of:

- **the limit**: the backbone's bare forward pass (no decoding, no CAMs, no writing) on the same images, decoded and
  resized beforehand, grouped by shape, for every batch size (1, 2, 4, 8, 16) with and without channels-last, in
  this process with all torch threads, and at batches 1 and 2 (channels-last) in one single-threaded process per
  core at once; the fastest of them is the machine's limit (what :mod:`camretrieval.extraction.calibration` looks
  for on a synthetic image);
- **a cirtorch-style loop**: what ``cirtorch.networks.imageretrievalnet.extract_vectors`` does: a DataLoader of batch 1
  (``--workers`` decoding processes), the forward pass in the default memory layout, GeM pooling, l2; the image
  resized as ``index`` does (so the forward passes are the same);
- **`index`** through :func:`camretrieval.storage.writer.update_index` (listing, decoding in DataLoader workers,
  forward, CAMs, pooling, whitening, writing and committing shards) with its defaults (the calibrated batch size, 64
  CAMs, maps stored), and without the maps, and with GeM pooling (the cirtorch loop's descriptor).

Ratios printed: the limit / ``index`` (1.0 = index costs nothing but the forward pass), and the cirtorch loop /
``index`` (above 1: index is faster).

    python benchmarks/extraction_cost.py [--images ../shared/data/clutter-dev] [--limit 120] [--size 448] [--repeats 2]
        [--batch-sizes 1,2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from camretrieval import Describer, ExtractionSettings, PCAWhitening, load_backbone
from camretrieval.extraction.calibration import BATCH_SIZES, fastest_forward, forward_processes_possible, usable_cores
from camretrieval.extraction.images import ImageFileDataset, find_images, load_image, preprocess
from camretrieval.storage.writer import update_index


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


class ImagesFromList(Dataset):
    """cirtorch's ImagesFromList: one decoded, resized, normalised image per item."""

    def __init__(self, paths: list[Path], size: int, mean, std) -> None:
        self.paths, self.size, self.mean, self.std = paths, size, mean, std

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return preprocess(load_image(self.paths[index]), self.size, self.mean, self.std)


class BareForwards(Dataset):
    """Pre-made batches, each forwarded bare in a DataLoader worker (one torch thread): one process per core."""

    def __init__(self, backbone, batches: list[torch.Tensor]) -> None:
        self.backbone, self.batches = backbone, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> int:
        with torch.inference_mode():
            self.backbone(self.batches[index])
        return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_images = Path(__file__).resolve().parents[2] / "shared" / "data" / "clutter-dev"
    parser.add_argument("--images", type=Path, default=default_images)
    parser.add_argument("--limit", type=int, default=120)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", default="float32", help="the forward pass: float32, bfloat16 or float16 (GPU)")
    parser.add_argument(
        "--batch-sizes", default=",".join(map(str, BATCH_SIZES)),
        help="the bare forward's batch sizes (default: all that calibration tries; fewer make a long run shorter)",
    )
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    paths = find_images(args.images)[: args.limit]
    backbone = load_backbone(args.backbone)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    settings = Describer(backbone, args.size).settings.to_dict()
    workdir = Path(tempfile.mkdtemp(prefix="camretrieval-extraction-"))
    images = workdir / "images"  # exactly the images measured, linked
    for path in paths:
        (images / path).parent.mkdir(parents=True, exist_ok=True)
        (images / path).symlink_to((args.images / path).resolve())
    # Any whitening of the right shape: its cost, not its quality, is measured.
    whitening = {
        pooling: PCAWhitening(512, settings | {"pooling": pooling}).fit(np.abs(rng.normal(size=(600, 1280))))
        for pooling in ("cam", "gem")
    }
    calibrated = fastest_forward(backbone, args.size, device, args.precision)

    def index(pooling: str, keep_maps: bool) -> None:
        target = workdir / "index"
        shutil.rmtree(target, ignore_errors=True)
        extraction = ExtractionSettings(size=args.size, n_classes=64, pooling=pooling)
        update_index(
            target, images, whitening[pooling], extraction, keep_maps=keep_maps, workers=args.workers,
            device=args.device, progress=False, precision=args.precision,
        )

    # The bare forward pass: the same images, decoded and resized beforehand, grouped by shape.
    dataset = ImageFileDataset(paths, args.size, backbone.mean, backbone.std, backbone.stride, args.images)
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for item in (dataset[i] for i in range(len(dataset))):
        by_shape.setdefault(tuple(item.tensor.shape), []).append(item.tensor)

    def bare_forward(batch_size: int, channels_last: bool):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        batches = [
            torch.stack(group[start : start + batch_size]).to(device).contiguous(memory_format=layout)
            for group in by_shape.values()
            for start in range(0, len(group), batch_size)
        ]

        def run() -> None:
            backbone.to(memory_format=layout)
            with torch.inference_mode():
                for batch in batches:
                    if args.precision == "float32":
                        backbone(batch)
                    else:
                        with torch.autocast(device.type, dtype=getattr(torch, args.precision)):
                            backbone(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    def cirtorch_loop() -> None:
        backbone.to(memory_format=torch.contiguous_format)
        loader = DataLoader(
            ImagesFromList([args.images / p for p in paths], args.size, backbone.mean, backbone.std),
            batch_size=1, num_workers=args.workers,
        )
        with torch.inference_mode():
            for image in loader:
                features = backbone(image.to(device)).features
                F.normalize(features.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3), dim=1).cpu()

    def bare_forward_in_processes(batch_size: int):
        batches = [
            torch.stack(group[start : start + batch_size]).contiguous(memory_format=torch.channels_last)
            for group in by_shape.values()
            for start in range(0, len(group), batch_size)
        ]

        def run() -> None:
            backbone.to(memory_format=torch.channels_last)
            for _ in DataLoader(BareForwards(backbone, batches), batch_size=None, num_workers=usable_cores()):
                pass

        return run

    limits = {f"bare forward, batch {b}{', channels-last' if cl else ''}": bare_forward(b, cl)
              for cl in (True, False) for b in batch_sizes}
    if forward_processes_possible(device) and args.precision == "float32":
        limits |= {f"bare forward, batch {b}, channels-last, {usable_cores()} processes x 1 thread":
                   bare_forward_in_processes(b) for b in batch_sizes if b <= 2}
    for run in limits.values():
        run()  # warm-up: first-call allocations and kernel selection for every shape
    runs = limits | {
        "cirtorch-style loop (batch 1, GeM)": cirtorch_loop,
        "index, GeM, no maps": lambda: index("gem", False),
        "index, 64 CAMs, no maps": lambda: index("cam", False),
        "index, defaults (64 CAMs + maps)": lambda: index("cam", True),
    }
    seconds = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], timed(run))
    shutil.rmtree(workdir, ignore_errors=True)
    n = len(paths)
    limit_name = min(limits, key=lambda name: seconds[name])
    limit = seconds[limit_name]
    print(f"{n} images from {args.images} ({len(by_shape)} shapes after resizing), {args.backbone}, size {args.size}, "
          f"{torch.get_num_threads()} threads, {args.workers} decoding workers, {args.device} {args.precision}, "
          f"best of {args.repeats}; calibrated: batch {calibrated.batch_size}"
          f"{', channels-last' if calibrated.channels_last else ''}"
          f"{f', {calibrated.processes} processes' if calibrated.processes > 1 else ''}")
    for name, value in seconds.items():
        print(f"  {name:<62} {value / n:.4f} s/image  ({n / value:5.1f} images/s)")
    default = seconds["index, defaults (64 CAMs + maps)"]
    print(f"the limit: {limit_name}")
    print(f"limit / index with its defaults (64 CAMs + maps):  {limit / default:.3f}")
    print(f"limit / index, 64 CAMs, no maps:                  {limit / seconds['index, 64 CAMs, no maps']:.3f}")
    print(f"cirtorch-style loop / index with its defaults:      {seconds['cirtorch-style loop (batch 1, GeM)'] / default:.3f}")
    print(f"cirtorch-style loop / index, GeM, no maps:          "
          f"{seconds['cirtorch-style loop (batch 1, GeM)'] / seconds['index, GeM, no maps']:.3f}")


if __name__ == "__main__":
    main()
