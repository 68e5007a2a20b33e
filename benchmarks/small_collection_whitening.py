"""Whitening learned on a small collection itself, against none (docs/method.md: why ``index`` without ``--pca``
whitens only from 1 000 images).

Two small label folders of eth80-dev views (links, under ``--workdir``): every fourth object (10 objects) and the
near-identical cup1, cup2, tomato1, tomato2, 10 views of each (every fourth view, in name order). Each is evaluated
with the command line, every image a query against the others, at ``--size`` 256:

    camretrieval eval --images DIR --size 256 --pca-images DIR --json     # whitening learned on DIR itself
    camretrieval eval --images DIR --size 256 --json                      # no whitening

    python benchmarks/small_collection_whitening.py [--workdir /tmp/camretrieval-small-whitening] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(os.environ.get("CAMRETRIEVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
VIEWS = 10


def camretrieval_command() -> list[str]:
    script = Path(sys.executable).parent / "camretrieval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "camretrieval.cli"]


def link_folder(folder: Path, eth80: Path, objects: list[str]) -> int:
    """``folder/<object>/<view>.jpg`` links to every fourth view of each object, ``VIEWS`` of them."""
    count = 0
    for name in objects:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for view in sorted((eth80 / name).glob("*.jpg"))[::4][:VIEWS]:
            target = folder / name / view.name
            if not target.exists():
                target.symlink_to(view.resolve())
            count += 1
    return count


def evaluate(folder: Path, size: int, whitened: bool) -> float:
    command = [*camretrieval_command(), "eval", "--images", str(folder), "--size", str(size), "--json", "--quiet"]
    if whitened:
        command += ["--pca-images", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return float(json.loads(result.stdout)["map"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-small-whitening"))
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()

    eth80 = args.data / "eth80-dev"
    objects = sorted(p.name for p in eth80.iterdir() if p.is_dir())
    sets = {"every fourth object": objects[::4], "cup1, cup2, tomato1, tomato2": ["cup1", "cup2", "tomato1", "tomato2"]}
    print(f"{'folder':<30} {'images':>6} {'whitened on itself':>18} {'no whitening':>12}")
    for name, chosen in sets.items():
        folder = args.workdir / name.replace(", ", "_").replace(" ", "_")
        count = link_folder(folder, eth80, chosen)
        print(f"{name:<30} {count:6d} {evaluate(folder, args.size, True):18.3f} {evaluate(folder, args.size, False):12.3f}",
              flush=True)


if __name__ == "__main__":
    main()
