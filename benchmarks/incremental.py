"""A growing collection: what adding 10% more images costs next to a full build, and SIGKILL at random moments.

One run, on the same images, backbone and size, each step a real ``camretrieval index`` process (as a user runs it):

1. full build of all N images into a new index (time T_full);
2. build of a folder holding the first 90% (links to them) into another new index; the last 10% are added to
   that folder and the same command run again, which describes only them (time T_add; T_add / T_full should be
   about 0.1, plus the fixed cost of a run: starting Python, loading the model, listing and stat-ing the folder);
3. a rerun with nothing new (the fixed cost alone);
4. ``--kills`` times: start ``index`` on a new index folder, SIGKILL it at a random moment, open the index (it must
   open, complete and consistent, with descriptors equal to the full build's), and start again; then a last run
   completes it, and the result must equal the full build.

    python benchmarks/incremental.py [--images ../shared/data/clutter-dev] [--size 448] [--kills 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from camretrieval import Index
from camretrieval.extraction.images import find_images


def run_index(images: Path, index_dir: Path, pca: Path, extra: list[str]) -> float:
    started = time.perf_counter()
    args = [sys.executable, "-m", "camretrieval.cli", "index", str(images), str(index_dir), "--pca", str(pca), "--quiet"]
    result = subprocess.run(args + extra, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"index failed: {result.stderr}")
    return time.perf_counter() - started


def same_descriptors(index: Index, reference: dict[str, np.ndarray]) -> float:
    """The largest difference between the index's descriptors and the reference's, image by image."""
    return max((float(np.abs(d - reference[p]).max()) for p, d in zip(index.paths, index.descriptors)), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_images = Path(__file__).resolve().parents[2] / "shared" / "data" / "clutter-dev"
    parser.add_argument("--images", type=Path, default=default_images)
    parser.add_argument("--pca-images", type=Path, default=default_images.parent / "eth80-dev")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--commit-every", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keeps pca.npz between runs (default: a new folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="camretrieval-incremental-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pca = workdir / "pca.npz"
    if not pca.is_file():
        subprocess.run(
            [sys.executable, "-m", "camretrieval.cli", "fit-pca", str(args.pca_images), str(pca), "--size", str(args.size), "--quiet"],
            check=True,
        )
    paths = find_images(args.images)
    n_first = int(round(len(paths) * 0.9))
    collection = workdir / "collection"  # a folder of links to the images: it grows by 10% between two runs
    shutil.rmtree(collection, ignore_errors=True)
    link(paths[:n_first], args.images, collection)
    options = ["--commit-every", str(args.commit_every)]

    full_dir = workdir / "full"
    shutil.rmtree(full_dir, ignore_errors=True)
    t_full = run_index(args.images, full_dir, pca, options)
    full = Index.open(full_dir)
    reference = dict(zip(full.paths, full.descriptors))

    grown = workdir / "grown"
    shutil.rmtree(grown, ignore_errors=True)
    t_first = run_index(collection, grown, pca, options)
    link(paths[n_first:], args.images, collection)
    t_add = run_index(collection, grown, pca, options)
    t_nothing = run_index(collection, grown, pca, options)
    grown_index = Index.open(grown)
    print(f"{len(paths)} images of {args.images}, size {args.size}, commits of {args.commit_every}")
    print(f"full build:                 {t_full:7.1f} s")
    print(f"first 90% ({n_first}):          {t_first:7.1f} s")
    print(f"adding the last 10% ({len(paths) - n_first}):   {t_add:7.1f} s   = {t_add / t_full:.3f} x the full build")
    print(f"rerun, nothing new:         {t_nothing:7.1f} s   = {t_nothing / t_full:.3f} x (the fixed cost of a run)")
    print(f"grown index: {len(grown_index)} images, largest descriptor difference from the full build "
          f"{same_descriptors(grown_index, reference):.2e}")

    chance = random.Random(args.seed)
    killed_dir = workdir / "killed"
    shutil.rmtree(killed_dir, ignore_errors=True)
    command = [sys.executable, "-m", "camretrieval.cli", "index", str(args.images), str(killed_dir), "--pca", str(pca),
               "--quiet", *options]
    counts = []
    for attempt in range(args.kills):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(chance.uniform(2.0, 2.0 + t_full / args.kills))
        if process.poll() is not None:
            error = process.stderr.read().strip().splitlines()[-1:] if process.returncode else ["complete"]
            print(f"kill {attempt + 1}: the run had already ended (exit {process.returncode}: {error})")
            if process.returncode == 0:
                break
            continue
        process.send_signal(signal.SIGKILL)
        process.wait()
        try:
            index = Index.open(killed_dir)
        except Exception as error:  # noqa: BLE001 - reported: nothing committed yet is fine, anything else is a bug
            print(f"kill {attempt + 1}: {type(error).__name__}: {error}")
            continue
        difference = same_descriptors(index, reference)
        counts.append(len(index))
        print(f"kill {attempt + 1}: index opens with {len(index)} images, max difference {difference:.2e}")
        assert difference < 1e-4, "a committed descriptor differs from the full build's"
    run_index(args.images, killed_dir, pca, options)
    final = Index.open(killed_dir)
    print(f"after {len(counts)} kills and a last run: {len(final)} images (full build: {len(reference)}), "
          f"max difference {same_descriptors(final, reference):.2e}; progress after each kill: {counts}")
    assert final.paths == sorted(reference)


def link(paths: list[str], source: Path, target: Path) -> None:
    for path in paths:
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).symlink_to((source / path).resolve())


if __name__ == "__main__":
    main()
