"""Distractor images for a ~5 000-image index around clutter-dev (docs/refinement.md, "At 5 000 images").

Writes, deterministically (fixed seeds, the same files on every run), into OUTPUT (not into the repository):

- ``eth80/<object>/<file>``: links to eth80-dev's 1 640 views (40 objects on plain backgrounds);
- ``eth80-aug/<object>/<file>``: one augmented copy of each view (1 640): horizontal flip with probability 1/2,
  then a zoom in (a square crop of 60-90% of the side, anywhere) or a zoom out (the view pasted at a random place on
  a canvas 1.15-1.5 times larger, filled with the view's median border colour), resized to a side of 200-320 px,
  JPEG quality 85-95;
- ``landmarks/<file>``: links to the 23 landmark photos (clutter-dev's backgrounds);
- ``landmarks-aug/<photo>-<n>.jpg``: ``--landmark-copies`` (default 1 297, so that the distractors number 4 600) crops
  of the landmark photos, taken in turn: 30-80% of the photo's area, aspect 3:4 to 4:3, anywhere, flipped with
  probability 1/2, resized to a shorter side of 360-600 px, JPEG quality 85-95.

clutter-dev's objects ARE eth80-dev's objects (the same 40, even the same views), so an eth80 view or copy of a
query's own object is not a distractor for that query: ``benchmarks/refinement.py --distractors`` ignores every
distractor under a folder named like the query's object (junk, as Oxford's junk images), and counts every other
distractor as a negative. The landmark crops share clutter-dev's backgrounds: hard distractors for a descriptor that
encodes the scene.

    python benchmarks/make_distractors.py /tmp/camretrieval-5k/distractors [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from camretrieval.extraction.images import find_images

SEED = 2017


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(source.resolve(), target)


def eth80_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    width, height = image.size
    if rng.random() < 0.5:  # zoom in
        side = int(round(min(width, height) * rng.uniform(0.6, 0.9)))
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        image = image.crop((x, y, x + side, y + side))
    else:  # zoom out on the view's own background colour
        border = np.concatenate([np.asarray(image)[[0, -1]].reshape(-1, 3), np.asarray(image)[:, [0, -1]].reshape(-1, 3)])
        colour = tuple(int(v) for v in np.median(border, axis=0))
        factor = rng.uniform(1.15, 1.5)
        canvas = Image.new("RGB", (int(width * factor), int(height * factor)), colour)
        x = int(rng.integers(0, canvas.width - width + 1))
        y = int(rng.integers(0, canvas.height - height + 1))
        canvas.paste(image, (x, y))
        image = canvas
    side = int(rng.integers(200, 321))
    return image.resize((side, side), Image.BILINEAR)


def landmark_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    area = rng.uniform(0.3, 0.8) * width * height
    aspect = rng.uniform(0.75, 4 / 3)
    crop_w = min(width, int(round(np.sqrt(area * aspect))))
    crop_h = min(height, int(round(np.sqrt(area / aspect))))
    x, y = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    image = image.crop((x, y, x + crop_w, y + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    shorter = int(rng.integers(360, 601))
    scale = shorter / min(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--landmark-copies", type=int, default=1297)
    args = parser.parse_args()
    eth80, landmarks = args.data / "eth80-dev", args.data / "landmarks"
    views, photos = find_images(eth80), find_images(landmarks)
    for number, path in enumerate(views):
        _link(eth80 / path, args.output / "eth80" / path)
        target = (args.output / "eth80-aug" / path).with_suffix(".jpg")
        if not target.exists():
            rng = np.random.default_rng([SEED, 1, number])
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(eth80 / path) as image:
                eth80_copy(image.convert("RGB"), rng).save(target, quality=int(rng.integers(85, 96)))
    for path in photos:
        _link(landmarks / path, args.output / "landmarks" / path)
    opened = {path: Image.open(landmarks / path).convert("RGB") for path in photos}
    (args.output / "landmarks-aug").mkdir(parents=True, exist_ok=True)
    for number in range(args.landmark_copies):
        path = photos[number % len(photos)]
        target = args.output / "landmarks-aug" / f"{Path(path).stem}-{number // len(photos):03d}.jpg"
        if not target.exists():
            rng = np.random.default_rng([SEED, 2, number])
            landmark_crop(opened[path], rng).save(target, quality=int(rng.integers(85, 96)))
    total = len(find_images(args.output))
    print(f"{total} distractors under {args.output}: {len(views)} eth80-dev views and as many copies, "
          f"{len(photos)} landmark photos and {args.landmark_copies} crops of them")


if __name__ == "__main__":
    main()
