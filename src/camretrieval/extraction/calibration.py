"""The machine's limit for extraction: the fastest bare forward pass of a backbone, measured once and cached.

How many images go through the backbone together, and in which memory layout, decides extraction speed more than
anything around it, and the best choice depends on the machine: on a 2-core CPU a batch of one image in channels-last
runs 1.5x faster per image than a batch of 16 (the batch's activations no longer fit in the cache), on a GPU large
batches win. :func:`fastest_forward` times the backbone's forward pass alone (no decoding, no CAMs, no writing) on a
synthetic 4:3 image at the extraction size for each candidate (batch size x memory format), keeps the fastest, and
caches the result per (backbone, feature layer, size, device, precision, torch threads, torch version) in a JSON file
(``$CAMRETRIEVAL_CACHE`` or ``~/.cache/camretrieval``), so a machine pays it once: about 10-20 s on a 2-core CPU.

The describer uses the calibrated batch size and layout whenever it is not given one
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

from camretrieval.extraction.backbones import Backbone

BATCH_SIZES = (1, 2, 4, 8, 16)
CACHE_VERSION = 1
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

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


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
            torch.get_num_threads(), torch.__version__,
        )
    )


def time_forward(
    backbone: Backbone, size: int, device: torch.device, precision: str, batch_size: int, channels_last: bool
) -> float:
    """Seconds per image of the bare forward pass on a synthetic 4:3 batch whose shorter side is ``size``."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = backbone.to(device).to(memory_format=memory_format).eval()
    images = torch.randn(batch_size, 3, size, size * 4 // 3, device=device).contiguous(memory_format=memory_format)

    def run() -> float:
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

    run()  # warm-up
    times, images_done, spent = [], 0, 0.0
    while images_done < MIN_IMAGES or spent < MIN_SECONDS:
        seconds = run()
        times.append(seconds)
        images_done += batch_size
        spent += seconds
    return min(times) / batch_size


def measure_forward(
    backbone: Backbone, size: int, device: torch.device, precision: str = "float32", progress: bool = True
) -> list[ForwardSpeed]:
    """Every candidate's cost, fastest first: each batch size in channels-last, and without it at the smallest and
    largest batch (channels-last wins on CPUs with oneDNN and on GPU tensor cores; checked, not assumed)."""
    candidates = [(b, True) for b in BATCH_SIZES] + [(BATCH_SIZES[0], False), (BATCH_SIZES[-1], False)]
    if progress:
        print(
            f"measuring the fastest forward pass of {backbone.name} at {size} px on {device} (once; cached in "
            f"{cache_path()})",
            file=sys.stderr,
        )
    speeds = [ForwardSpeed(b, cl, time_forward(backbone, size, device, precision, b, cl)) for b, cl in candidates]
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
