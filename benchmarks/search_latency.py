"""How long one ``camretrieval search`` takes from the command line, start-up included: a fresh process per query, as
a user runs it (the interpreter, torch and the model loaded, the index opened, the query forwarded, the search and its
refinement, the results printed).

The index is benchmarks/refinement.py's (built once under ``--workdir``, or ``--index DIR``): clutter-dev's 400
images with their maps, efficientnet_lite0 at 448 px, 512-d PCA-whitening learned on eth80-dev. Each command runs
``--repeat`` times in turn (round-robin over the commands, so that a busy machine slows each alike), each time with
the next of clutter-dev's images as query and its boxes.json box; printed: the median and fastest wall time of each.
Torch runs with its default threads (one per core) unless ``--omp-threads N`` sets OMP_NUM_THREADS for the searches;
the thread count and the load average before and after are printed, as the times depend on both. On a shared machine
compare each row with the yardstick run beside them, ``python -c "import torch, timm"`` (what any search must import),
and with the CPU seconds each process used (user + system, which other jobs disturb far less than the wall time).

``search --html`` with ``--explain-top 3`` against ``--explain-top 1`` gives the cost of one explanation (the first
one also pays for importing what explanations need).

    python benchmarks/search_latency.py [--workdir /tmp/camretrieval-refinement] [--repeat 3] [--omp-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

YARDSTICK = 'python -c "import torch, timm"'
VARIANTS = {
    "plain (OfA)": [],
    "--online (OnA, 8 classes)": ["--online", "--online-classes", "8"],
    "--rerank 100": ["--rerank", "100"],
    "--rerank 100 --qe 2": ["--rerank", "100", "--qe", "2"],
    "--html, --explain-top 1": ["--html", "{html}", "--explain-top", "1"],
    "--html, --explain-top 3": ["--html", "{html}", "--explain-top", "3"],
}


def camretrieval_command() -> list[str]:
    script = Path(sys.executable).parent / "camretrieval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "camretrieval.cli"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-refinement"))
    parser.add_argument("--index", type=Path, help="an index of clutter-dev to search (default: built under --workdir)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--omp-threads", type=int, default=0, help="OMP_NUM_THREADS for the searches (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-yardstick", action="store_true", help=f"do not time {YARDSTICK}")
    args = parser.parse_args()

    if args.index is None:
        from refinement import prepare  # builds (once) the index of benchmarks/refinement.py

        args.backbone, args.size, args.distractors = "efficientnet_lite0", 448, None
        _, args.index = prepare(args)
    boxes = json.loads((args.data / "clutter-dev" / "boxes.json").read_text())
    queries = sorted(boxes)[:: max(1, len(boxes) // (args.repeat * len(args.variants)))]
    env = dict(os.environ)
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    load_before = os.getloadavg()
    names = ([] if args.no_yardstick else [YARDSTICK]) + args.variants
    seconds: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as scratch:
        html = str(Path(scratch) / "results.html")
        count = 0
        for _ in range(args.repeat):
            for name in names:
                if name == YARDSTICK:
                    command = [sys.executable, "-c", "import torch, timm"]
                else:
                    query = queries[count % len(queries)]
                    count += 1
                    box = ",".join(str(v) for v in boxes[query])
                    command = [*camretrieval_command(), "search", str(args.index),
                               str(args.data / "clutter-dev" / query), "--box", box, "--top", "10",
                               *[part.format(html=html) for part in VARIANTS[name]]]
                used_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                result = subprocess.run(command, env=env, capture_output=True, text=True)
                seconds[name].append(time.perf_counter() - started)
                used = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append(used.ru_utime + used.ru_stime - used_before.ru_utime - used_before.ru_stime)
                if result.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    load_after = os.getloadavg()
    print(f"camretrieval search on {args.index} (a fresh process per query, start-up included), torch threads: "
          f"{threads}, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    yardstick = statistics.median(seconds[YARDSTICK]) if YARDSTICK in seconds else float("nan")
    print(f"{'command':<30} {'median s':>9} {'fastest s':>10} {'/ import':>9} {'CPU s':>6}")
    for name, values in seconds.items():
        print(f"{name:<30} {statistics.median(values):9.2f} {min(values):10.2f} "
              f"{statistics.median(values) / yardstick:9.2f} {statistics.median(cpu[name]):6.2f}")
    if "--html, --explain-top 1" in seconds and "--html, --explain-top 3" in seconds:
        def per_explanation(values: dict[str, list[float]]) -> float:
            return (statistics.median(values["--html, --explain-top 3"])
                    - statistics.median(values["--html, --explain-top 1"])) / 2

        print(f"one explanation: {per_explanation(seconds):.2f} s wall, {per_explanation(cpu):.2f} CPU s "
              "(the median difference between 3 and 1, / 2)")


if __name__ == "__main__":
    main()
