"""``camretrieval demo``: the whole job on photos that ship with scikit-image, needing nothing from the user.

Eight real photos are the *subjects*. The database holds four edited copies of each (a crop, a small rotation, a
downscaled copy, a darker re-encoded copy) among distractor photos; the queries are the untouched originals, and
one box query around the cat's head. PCA-whitening is learned on random crops of the distractor photos, never
on the subjects. The run prints each query's ranked results and the mean average precision.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from camretrieval.evaluation.metrics import average_precision
from camretrieval.extraction.backbones import load_backbone
from camretrieval.extraction.describer import Describer
from camretrieval.extraction.fitting import fit_whitening
from camretrieval.extraction.images import find_images
from camretrieval.extraction.settings import DEFAULT_SIZE
from camretrieval.search.index import Index

SUBJECTS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle"]
DISTRACTORS = ["camera", "coins", "moon", "clock", "page", "text", "brick", "grass", "gravel", "cell", "colorwheel"]
BOX_QUERY = ("chelsea", (140, 20, 330, 200))  # the cat's head, in chelsea's 451 x 300 pixels
PCA_CROPS = 160
PCA_DIM = 64  # the demo's whitening set is small; real collections use 512


def sample_photo(name: str) -> Image.Image:
    from skimage import data

    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return Image.fromarray(np.asarray(pixels)).convert("RGB")


def edited_copies(photo: Image.Image) -> dict[str, Image.Image]:
    """Four edits that keep the same object: the relevant matches of the original."""
    width, height = photo.size
    return {
        "crop": photo.crop((width // 8, height // 10, width * 7 // 8, height * 9 // 10)),
        "rotated": photo.rotate(12, resample=Image.BILINEAR, expand=True, fillcolor=(255, 255, 255)),
        "small": photo.resize((max(width * 2 // 5, 64), max(height * 2 // 5, 64)), Image.BILINEAR),
        "dark": ImageEnhance.Contrast(ImageEnhance.Brightness(photo).enhance(0.6)).enhance(1.3),
    }


def random_crops(photos: list[Image.Image], count: int, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = photo.size
        crop_w, crop_h = int(width * rng.uniform(0.4, 0.9)), int(height * rng.uniform(0.4, 0.9))
        x, y = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        crop = photo.crop((x, y, x + crop_w, y + crop_h))
        crops.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return crops


def write_demo_images(workdir: Path) -> tuple[Path, Path, Path]:
    """Writes the database, query and whitening folders; returns their paths."""
    database, queries, whitening = workdir / "database", workdir / "queries", workdir / "whitening"
    for folder in (database, queries, whitening):
        folder.mkdir(parents=True, exist_ok=True)
    for name in SUBJECTS:
        photo = sample_photo(name)
        photo.save(queries / f"{name}.png")
        for edit, copy in edited_copies(photo).items():
            copy.save(database / f"{name}_{edit}.jpg", quality=80 if edit == "dark" else 92)
    distractors = [sample_photo(name) for name in DISTRACTORS]
    for name, photo in zip(DISTRACTORS, distractors):
        photo.save(database / f"distractor_{name}.png")
    for i, crop in enumerate(random_crops(distractors, PCA_CROPS)):
        crop.save(whitening / f"crop_{i:03d}.jpg", quality=92)
    return database, queries, whitening


def run_demo(workdir: Path | None = None, size: int = DEFAULT_SIZE, top: int = 5) -> int:
    with tempfile.TemporaryDirectory(prefix="camretrieval-demo-") as temporary:
        workdir = Path(workdir) if workdir else Path(temporary)
        started = time.perf_counter()
        database, queries, whitening_dir = write_demo_images(workdir)
        print(f"demo images in {workdir}: {len(SUBJECTS)} photos x 4 edited copies + {len(DISTRACTORS)} distractors")

        backbone = load_backbone("efficientnet_lite0")
        whitening, _ = fit_whitening(
            Describer(backbone, size=size), find_images(whitening_dir), whitening_dir, dim=PCA_DIM, progress=False
        )
        whitening.save(workdir / "pca.npz")
        print(f"learned {whitening.input_dim} -> {whitening.dim_} PCA-whitening on {PCA_CROPS} crops of the distractors")

        index, _ = Index.build(database, whitening, size=size, progress=False, index_dir=workdir / "index")
        print(f"indexed {len(index)} images with efficientnet_lite0, 64 CAMs, size {size}\n")

        query_list = [(name, queries / f"{name}.png", None) for name in SUBJECTS]
        query_list.append((BOX_QUERY[0], queries / f"{BOX_QUERY[0]}.png", BOX_QUERY[1]))
        aps = []
        for subject, path, box in query_list:
            scores, ids = index.search_descriptors(index.describer.describe([path], [box]), len(index))
            ranked = [index.paths[i] for i in ids[0]]
            relevant = [p.startswith(subject + "_") for p in ranked]
            aps.append(average_precision(np.flatnonzero(relevant), sum(relevant)))
            label = f"{path.name}" + (f" box {box}" if box else "")
            print(f"query {label}: AP {aps[-1]:.3f}")
            for rank in range(top):
                mark = "+" if relevant[rank] else "-"
                print(f"  {rank + 1}. {mark} {scores[0][rank]:.3f}  {ranked[rank]}")
        print(f"\nmAP over {len(aps)} queries: {np.mean(aps):.3f} (1.0 = every edited copy ranked above every other image)")
        print(f"demo took {time.perf_counter() - started:.0f} s; search it yourself with:")
        print(f"  camretrieval search {workdir / 'index'} {queries / 'coffee.png'}" if workdir != Path(temporary) else
              "  camretrieval demo --workdir DIR   (keeps the index to search afterwards)")
    return 0
