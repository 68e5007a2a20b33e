"""How long the command line takes to start: ``--help`` and one search, beside importing torch and timm.

One run measures, each as a fresh process (as a user runs it), ``--repeat`` times in turn (round-robin, so that a
busy machine slows every row alike), and prints the median and the fastest run of each:

- ``python -c "import torch"`` and ``python -c "import torch, timm"`` (the yardsticks);
- ``camretrieval --help``, ``camretrieval search --help`` and an argument error (``search`` with no query), none of
  which may import torch;
- one ``camretrieval search`` on an index of the 400 images of clutter-dev (one query, with its box), built once
  at ``--size`` with the whitening learned on the collection itself and kept under ``--workdir``.

Targets (issue 11): ``--help`` under a third of ``import torch``; one search at most 1.5 x ``import torch, timm``
(a search needs both: the backbone is timm's, and timm imports torchvision itself).

    python benchmarks/startup.py [--images ../shared/data/clutter-dev] [--size 256] [--repeat 5] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(os.environ.get("CAMRETRIEVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def camretrieval_command() -> list[str]:
    """The installed ``camretrieval`` script next to this Python (what a user runs), else ``python -m``."""
    script = Path(sys.executable).parent / "camretrieval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "camretrieval.cli"]


def timed(command: list[str], expect: int = 0) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != expect:
        raise SystemExit(f"{' '.join(command)} exited with {result.returncode}, not {expect}:\n{result.stderr[-2000:]}")
    return seconds


def build_index(images: Path, index_dir: Path, size: int) -> None:
    """The index of ``images`` (built once: a complete index under ``index_dir`` is reused)."""
    if (index_dir / "catalog.sqlite").is_file():
        return
    print(f"building the index of {images} at size {size} into {index_dir} (once)", file=sys.stderr)
    started = time.perf_counter()
    result = subprocess.run(
        [*camretrieval_command(), "index", str(images), str(index_dir), "--size", str(size), "--quiet"],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise SystemExit(f"index failed:\n{result.stderr[-2000:]}")
    print(f"built in {time.perf_counter() - started:.0f} s: {result.stdout.strip()}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DATA / "clutter-dev", help="the folder indexed (400 images)")
    parser.add_argument("--size", type=int, default=256, help="the index's image size")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command")
    parser.add_argument("--workdir", type=Path, help="keeps the index between runs (default: a new folder)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON there")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="camretrieval-startup-"))
    index_dir = workdir / f"index-{args.images.name}-{args.size}"
    build_index(args.images, index_dir, args.size)

    boxes_file = args.images / "boxes.json"
    boxes = json.loads(boxes_file.read_text()) if boxes_file.is_file() else {}
    query_name = sorted(boxes)[0] if boxes else None
    query = args.images / query_name if query_name else next(p for p in sorted(args.images.rglob("*.jpg")))
    search = [*camretrieval_command(), "search", str(index_dir), str(query), "--top", "10"]
    if query_name:
        search += ["--box", ",".join(str(v) for v in boxes[query_name])]
    python = sys.executable
    rows = {
        'python -c "import torch"': ([python, "-c", "import torch"], 0),
        'python -c "import torch, timm"': ([python, "-c", "import torch, timm"], 0),
        "camretrieval --help": ([*camretrieval_command(), "--help"], 0),
        "camretrieval search --help": ([*camretrieval_command(), "search", "--help"], 0),
        "camretrieval search INDEX (no query: an argument error)": ([*camretrieval_command(), "search", str(index_dir)], 2),
        "camretrieval search INDEX QUERY --box ... (400 images)": (search, 0),
    }
    timed(search)  # once before measuring: the index's files and the weights in the page cache, as after any use
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeat):
        for name, (command, expect) in rows.items():
            times[name].append(timed(command, expect))
    median = {name: statistics.median(values) for name, values in times.items()}
    torch_s, timm_s = median['python -c "import torch"'], median['python -c "import torch, timm"']
    help_s, search_s = median["camretrieval --help"], median["camretrieval search INDEX QUERY --box ... (400 images)"]
    print(f"\nStart-up, median (fastest) of {args.repeat} runs each, {os.cpu_count()} CPUs, index of "
          f"{args.images.name} at size {args.size}\n")
    print("| command | seconds | / import torch | / import torch, timm |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {median[name]:.2f} ({min(values):.2f}) | {median[name] / torch_s:.2f} | {median[name] / timm_s:.2f} |")
    help_ok, search_ok = help_s < torch_s / 3, search_s <= 1.5 * timm_s
    print(f"\n--help: {help_s / torch_s:.2f} x import torch (target < 0.33): {'met' if help_ok else 'NOT met'}")
    print(f"search: {search_s / timm_s:.2f} x import torch, timm (target <= 1.5): {'met' if search_ok else 'NOT met'}")
    if args.json is not None:
        args.json.write_text(json.dumps({"size": args.size, "images": str(args.images), "seconds": times}, indent=2))


if __name__ == "__main__":
    main()
