"""How far off the original code's query boxes were: it divided a box in ORIGINAL pixels by the stride, forgetting
that it had first resized every image to a fixed 1024 x 720 (width x height; METHOD.md section 4).

A box coordinate v then lands at v / stride cells instead of v * (1024 / W or 720 / H) / stride: it is off by the
factor W / 1024 horizontally and H / 720 vertically. Read from the true image sizes of Oxford5k and Paris6k
(``gnd/*_sizes_gallery.txt`` of the shared data; no images needed), this prints, for the most common sizes, each
axis's error and the share of images of that size, and over every image the share whose cells differ for a random
box (at VGG-16's stride 16 on the 64 x 45 grid of a 1024 x 720 input), against this project's mapping
(``camretrieval.method.regions``: the box scaled through the resize, then divided by the stride).

    python benchmarks/box_mapping.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import math
import os
import random
from collections import Counter
from pathlib import Path

from camretrieval.method.regions import box_to_cells, scale_box

DATA = Path(os.environ.get("CAMRETRIEVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ORIGINAL_INPUT = (1024, 720)  # the original code's forced input size, width x height
STRIDE = 16  # VGG-16-CAM's


def real_sizes(gnd: Path) -> list[tuple[int, int]]:
    sizes = []
    for name in ("roxford5k", "rparis6k"):
        lines = (gnd / f"{name}_sizes_gallery.txt").read_text().splitlines()
        sizes += [(int(line.split(",")[2]), int(line.split(",")[3])) for line in lines if line.strip()]
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--top", type=int, default=4, help="the most common sizes listed")
    args = parser.parse_args()

    sizes = real_sizes(args.data / "gnd")
    width_in, height_in = ORIGINAL_INPUT
    print(f"{len(sizes)} Oxford5k + Paris6k images; the original code's input: {width_in} x {height_in}, stride {STRIDE}")
    print(f"{'size (W x H)':<14} {'share':>6} {'x off by':>9} {'y off by':>9}")
    for (width, height), count in Counter(sizes).most_common(args.top):
        print(f"{f'{width} x {height}':<14} {count / len(sizes):6.1%} {abs(width / width_in - 1):9.1%} "
              f"{abs(height / height_in - 1):9.1%}")
    worst = [max(abs(w / width_in - 1), abs(h / height_in - 1)) for w, h in sizes]
    print(f"images with both axes off by at most 7%: {sum(e <= 0.07 for e in worst) / len(sizes):.1%}; "
          f"median of the worse axis: {sorted(worst)[len(worst) // 2]:.1%}")

    rng = random.Random(0)
    grid = (math.ceil(width_in / STRIDE), math.ceil(height_in / STRIDE))
    differ = 0
    for width, height in sizes:
        x1, y1 = rng.uniform(0, width * 0.6), rng.uniform(0, height * 0.6)
        box = (x1, y1, rng.uniform(x1 + 1, width), rng.uniform(y1 + 1, height))
        naive = box_to_cells(box, STRIDE, grid)  # clipped to the grid, as the original's slicing is
        mapped = box_to_cells(scale_box(box, (width, height), ORIGINAL_INPUT), STRIDE, grid)
        differ += naive != mapped
    print(f"random boxes whose cells differ from the mapped box's: {differ / len(sizes):.1%}")


if __name__ == "__main__":
    main()
