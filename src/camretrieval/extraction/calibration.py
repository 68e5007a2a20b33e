"""The machine's limit for extraction: the fastest bare forward pass of a backbone, measured once and cached.

How many images go through the backbone together, in which memory layout, and on how many cores at once decides
extraction speed more than anything around it, and the best choice depends on the machine: on a 2-core CPU a batch of
one image in channels-last runs 1.5x faster per image than a batch of 16 (the batch's activations no longer fit in the
cache), and one single-threaded forward pass per core, in as many processes, beats one pass using both cores (a small
network's layers do not split well over threads: two threads make a pass only about 1.35x faster); on a GPU large
batches win. :func:`fastest_forward` times the backbone's forward pass alone (no decoding, no CAMs, no writing) on a
synthetic 4:3 image at the extraction size for each candidate (batch size x memory format x processes), the three
fastest again in a second round (a shared machine's load drifts: a second, interleaved look keeps one unlucky
measurement from deciding), keeps the fastest, and caches the result per (backbone, feature layer, size, device, precision,
torch threads, cores, torch version) in a JSON file (``$CAMRETRIEVAL_CACHE`` or ``~/.cache/camretrieval``), so a
machine pays it once: about a minute on a 2-core CPU.

The describer uses the calibrated batch size, layout and processes whenever it is not given a batch size
(:meth:`camretrieval.extraction.describer.Describer.iterate_files`); ``benchmarks/extraction_cost.py`` measures
``camretrieval index`` against the same limit.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from camretrieval.extraction.backbones import Backbone

BATCH_SIZES = (1, 2, 4, 8, 16)
CACHE_VERSION = 2
ROUNDS = 2
FINALISTS = 3
# Each candidate is timed on at least this many images and this many seconds (after one warm-up batch, which pays
# for the first-call allocations and kernel selection), and the fastest of its batches is kept.
MIN_IMAGES = 4
MIN_SECONDS = 0.3


@dataclass(frozen=True)
class ForwardSpeed:
    """One way of running the forward pass and its measured cost per image."""

    batch_size: int
    channels_last: bool
    seconds_per_image: float
    processes: int = 1  # > 1: that many single-threaded forward passes at once, one per process (CPU only)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, where the system says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def forward_processes_possible(device: torch.device) -> bool:
    """Whether forward passes may run in parallel processes: on a CPU with more than one core, where workers are
    forked (they then share the loaded network; a spawned worker would have to pickle it, and the caller's code)."""
    return device.type == "cpu" and usable_cores() > 1 and torch.multiprocessing.get_start_method() == "fork"


def cache_path() -> Path:
    """The calibration cache: ``$CAMRETRIEVAL_CACHE/calibration.json`` or ``~/.cache/camretrieval/calibration.json``."""
    root = os.environ.get("CAMRETRIEVAL_CACHE") or (Path.home() / ".cache" / "camretrieval")
    return Path(root) / "calibration.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the processor model here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def calibration_key(backbone: Backbone, size: int, device: torch.device, precision: str) -> str:
    """What the fastest way depends on: the network and its input size, the device, precision and threads."""
    return "|".join(
        str(part)
        for part in (
            CACHE_VERSION, backbone.name, backbone.feature_layer, size, device.type, _device_name(device), precision,
            torch.get_num_threads(), usable_cores(), torch.__version__,
        )
    )


def _timed_forward(model: Backbone, images: torch.Tensor, precision: str) -> float:
    """Seconds of one bare forward pass of ``images``."""
    device = images.device
    started = time.perf_counter()
    with torch.inference_mode():
        if precision == "float32":
            model(images)
        else:
            with torch.autocast(device.type, dtype=getattr(torch, precision)):
                model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def _synthetic_batch(size: int, batch_size: int, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size * 4 // 3, device=device).contiguous(memory_format=memory_format)


def time_forward(
    backbone: Backbone, size: int, device: torch.device, precision: str, batch_size: int, channels_last: bool
) -> float:
    """Seconds per image of the bare forward pass on a synthetic 4:3 batch whose shorter side is ``size``."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = backbone.to(device).to(memory_format=memory_format).eval()
    images = _synthetic_batch(size, batch_size, device, memory_format)
    _timed_forward(model, images, precision)  # warm-up
    times, images_done, spent = [], 0, 0.0
    while images_done < MIN_IMAGES or spent < MIN_SECONDS:
        seconds = _timed_forward(model, images, precision)
        times.append(seconds)
        images_done += batch_size
        spent += seconds
    return min(times) / batch_size


class _SyntheticForwards(Dataset):
    """Items that each time one forward pass of a synthetic batch, in a DataLoader worker (one torch thread)."""

    def __init__(self, model: Backbone, size: int, batch_size: int, memory_format, precision: str, count: int) -> None:
        self.model, self.size, self.batch_size, self.count = model, size, batch_size, count
        self.memory_format, self.precision = memory_format, precision

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[int, float]:
        images = _synthetic_batch(self.size, self.batch_size, torch.device("cpu"), self.memory_format)
        return os.getpid(), _timed_forward(self.model, images, self.precision)


def time_forward_in_processes(
    backbone: Backbone, size: int, precision: str, batch_size: int, channels_last: bool, processes: int
) -> float:
    """Seconds per image when ``processes`` single-threaded CPU processes run forward passes at once (what
    :meth:`~camretrieval.extraction.describer.Describer.iterate_files` does with a calibrated ``processes`` > 1): the
    images per second of all of them together, each process's first pass (its warm-up) left out."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = backbone.to(memory_format=memory_format).eval()
    per_process = 1 + max(2, -(-MIN_IMAGES // batch_size))
    loader = DataLoader(
        _SyntheticForwards(model, size, batch_size, memory_format, precision, processes * per_process),
        batch_size=None, num_workers=processes,
    )
    times: dict[int, list[float]] = {}
    for pid, seconds in loader:
        times.setdefault(int(pid), []).append(float(seconds))
    # Each process's best pass after its first; together they describe sum(batch / seconds) images per second.
    rate = sum(batch_size / min(values[1:]) for values in times.values() if len(values) > 1)
    return 1 / rate if rate > 0 else float("inf")


def measure_forward(
    backbone: Backbone, size: int, device: torch.device, precision: str = "float32", progress: bool = True
) -> list[ForwardSpeed]:
    """Every candidate's cost, fastest first: each batch size in channels-last, and without it at the smallest and
    largest batch (channels-last wins on CPUs with oneDNN and on GPU tensor cores; checked, not assumed); on a CPU
    with several cores, also one single-threaded process per core at batches 1 and 2. Every candidate is measured
    once, then the :data:`FINALISTS` fastest again in :data:`ROUNDS` - 1 more rounds, interleaved, the best of each
    candidate's rounds kept."""
    candidates = [(b, True, 1) for b in BATCH_SIZES] + [(BATCH_SIZES[0], False, 1), (BATCH_SIZES[-1], False, 1)]
    if forward_processes_possible(device):
        candidates += [(b, True, usable_cores()) for b in BATCH_SIZES[:2]]
    if progress:
        print(
            f"measuring the fastest forward pass of {backbone.name} at {size} px on {device} (once; cached in "
            f"{cache_path()})",
            file=sys.stderr,
        )
    best = {candidate: float("inf") for candidate in candidates}
    for round_number in range(ROUNDS):
        if round_number:
            candidates = sorted(candidates, key=best.get)[:FINALISTS]
        for candidate in candidates:
            batch_size, channels_last, processes = candidate
            if processes == 1:
                seconds = time_forward(backbone, size, device, precision, batch_size, channels_last)
            else:
                seconds = time_forward_in_processes(backbone, size, precision, batch_size, channels_last, processes)
            best[candidate] = min(best[candidate], seconds)
    speeds = [ForwardSpeed(b, cl, seconds, processes) for (b, cl, processes), seconds in best.items()]
    return sorted(speeds, key=lambda speed: speed.seconds_per_image)


def fastest_forward(
    backbone: Backbone, size: int, device: torch.device, precision: str = "float32", progress: bool = True
) -> ForwardSpeed:
    """The fastest way to run ``backbone`` at ``size`` on ``device``, from the cache or measured now (and cached).
    The backbone is left in the memory format it was in."""
    path, key = cache_path(), calibration_key(backbone, size, device, precision)
    cached = _read_cache(path)
    if key in cached:
        try:
            return ForwardSpeed(**cached[key])
        except TypeError:
            pass  # an entry of another layout: measure again
    was_channels_last = next(backbone.parameters()).is_contiguous(memory_format=torch.channels_last)
    try:
        best = measure_forward(backbone, size, device, precision, progress)[0]
    finally:
        backbone.to(memory_format=torch.channels_last if was_channels_last else torch.contiguous_format)
    cached[key] = asdict(best)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cached, indent=1))
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home: measured again next time, nothing lost
    return best


def _read_cache(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}
