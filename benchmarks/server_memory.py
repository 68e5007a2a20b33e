"""The memory ``camretrieval serve`` takes for hostile uploads: small files that decode to many bytes, sent at once.

One run builds (once, under ``--workdir``) an index of ``--count`` images of ETH-80 at ``--size``, starts
``camretrieval serve`` on it (127.0.0.1, a free port), searches once with an ordinary photo, records the server's
idle RSS, then sends ``--parallel`` copies of the first file below at once, then one of each other file, ``--parallel``
at a time (``--rounds`` times over). The files are made here, in memory, each within the 40-megapixel limit:

- ``png16-grey``: a 16-bit greyscale PNG of 6300 x 6300 pixels, 77 kB (issue 12: about 1 GB per upload, and 4.6 GB
  for four at once, before the server decoded uploads in bounded memory and a few at a time);
- ``png16-grey-alpha``, ``png16-rgb``, ``png16-rgba``: 16-bit PNGs with alpha or colour (alpha is composited over
  white), each just under the server's bound on decoded bytes (pixels x bytes per pixel, 120 MB);
- ``png-rgba``, ``png-palette-alpha``: 8-bit RGBA, and a palette with a transparent colour (made RGBA, then composited);
- ``jpeg-cmyk``: a CMYK JPEG; ``jpeg-rotated``: an RGB JPEG of 6300 x 6300 turned by its EXIF orientation;
- ``tiff-float``: a 32-bit float TIFF (deflate), scaled to 8 bits like a 16-bit image;
- ``png16-rgba-over``: a 16-bit RGBA PNG of 6300 x 6300, over the bound: refused (413) from its header.

The server's RSS (``/proc/PID/status``) is sampled every 5 ms from the first upload to the last answer; its
high-water mark (``VmHWM``, reset after the idle reading where the kernel allows it) is read at the end. Prints each
file's answers and times, then idle, peak and peak - idle. Target (issue 12): peak - idle under 1.5 GB. Traffic
goes to 127.0.0.1 only; the number of requests is bounded (rounds x files); the server is stopped at the end.

    python benchmarks/server_memory.py [--images ../shared/data/eth80-dev] [--count 20] [--size 96]
        [--parallel 8] [--rounds 1] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

DATA = Path(os.environ.get("CAMRETRIEVAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TARGET = 1.5e9  # bytes above idle


# --- the files ------------------------------------------------------------------------------------------------------


def png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG of zeros written row by row (never the whole image in memory): any bit depth Pillow cannot write."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + width * channels * bit_depth // 8)  # filter byte 0, then the samples
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def saved(picture: Image.Image, kind: str, **options) -> bytes:
    output = io.BytesIO()
    picture.save(output, kind, **options)
    return output.getvalue()


def hostile_files() -> dict[str, bytes]:
    """Small files that decode to many bytes, each within the 40-megapixel limit."""
    files = {
        "png16-grey": png(6300, 6300, 16, 0),
        "png16-grey-alpha": png(5400, 5400, 16, 4),
        "png16-rgb": png(4400, 4400, 16, 2),
        "png16-rgba": png(3800, 3800, 16, 6),
        "png-rgba": png(5400, 5400, 8, 6),
    }
    palette = Image.new("P", (6300, 6300), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255])
    files["png-palette-alpha"] = saved(palette, "PNG", transparency=0)
    del palette
    files["jpeg-cmyk"] = saved(Image.new("CMYK", (5400, 5400)), "JPEG", quality=90)
    rotated = Image.new("RGB", (6300, 6300))
    exif = rotated.getexif()
    exif[0x0112] = 6  # turned by 90 degrees when decoded
    files["jpeg-rotated"] = saved(rotated, "JPEG", quality=90, exif=exif.tobytes())
    del rotated
    files["tiff-float"] = saved(Image.new("F", (5400, 5400)), "TIFF", compression="tiff_adobe_deflate")
    files["png16-rgba-over"] = png(6300, 6300, 16, 6)
    return files


# --- the server -----------------------------------------------------------------------------------------------------


def camretrieval_command() -> list[str]:
    script = Path(sys.executable).parent / "camretrieval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "camretrieval.cli"]


def build_index(images: Path, workdir: Path, count: int, size: int) -> Path:
    """An index of ``count`` images of ``images`` (spread over its objects), built once under ``workdir``."""
    index_dir = workdir / f"index-{count}-{size}"
    if (index_dir / "catalog.sqlite").is_file():
        return index_dir
    from camretrieval import Index

    photos = workdir / f"photos-{count}"
    shutil.rmtree(photos, ignore_errors=True)
    every = sorted(images.rglob("*.jpg"))
    for source in every[:: max(1, len(every) // count)][:count]:
        target = photos / source.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    print(f"building an index of {count} images at size {size} (once)", file=sys.stderr)
    index, failures = Index.build(photos, None, size=size, n_classes=8, workers=0, progress=False)
    if failures:
        raise SystemExit(f"could not index {failures}")
    index.save(index_dir)
    return index_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload(port: int, name: str, data: bytes) -> tuple[int, str, float]:
    """POST /api/search with ``data`` as the query file: (status, detail or "", seconds)."""
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="top"\r\n\r\n5\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", "/api/search", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    detail = "" if response.status == 200 else json.loads(answer).get("detail", "")
    return response.status, str(detail), time.perf_counter() - started


def status_value(pid: int, field: str) -> int:
    """A memory field of /proc/PID/status, in bytes (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """The largest VmRSS of a process, sampled every ``interval`` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, status_value(self.pid, "VmRSS"))
            time.sleep(self.interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DATA / "eth80-dev")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="times the whole set of uploads is sent")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the index here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"no images at {args.images} (set CAMRETRIEVAL_DATA or --images)")
    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="server-memory-")
        args.workdir = Path(temporary.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    index_dir = build_index(args.images, args.workdir, args.count, args.size)
    files = hostile_files()
    ordinary = sorted(args.images.rglob("*.jpg"))[0].read_bytes()

    port = free_port()
    log = open(args.workdir / "serve.log", "w+")
    server = subprocess.Popen(
        [*camretrieval_command(), "serve", str(index_dir), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise SystemExit(f"camretrieval serve did not start:\n{log.read()[-3000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/api/info")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        status, detail, _ = upload(port, "photo.jpg", ordinary)  # the first search: what is loaded lazily, loaded
        if status != 200:
            raise SystemExit(f"an ordinary search failed: {status} {detail}")
        time.sleep(2)
        readings = []
        for _ in range(5):
            readings.append(status_value(server.pid, "VmRSS"))
            time.sleep(0.2)
        idle = sorted(readings)[2]  # the median of a second's readings
        try:  # reset the high-water mark to the current RSS (Linux: "5" > clear_refs)
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            hwm_reset = True
        except OSError:
            hwm_reset = False
        sampler = Sampler(server.pid)
        sampler.start()
        # Each round: --parallel copies of the tester's file at once (the case), then one of every other
        # kind, --parallel at a time.
        jobs = []
        for _ in range(args.rounds):
            jobs += [("png16-grey", files["png16-grey"])] * args.parallel
            jobs += [(name, data) for name, data in files.items() if name != "png16-grey"]
        started = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            answers = list(pool.map(lambda job: (job[0], *upload(port, *job)), jobs))
        wall = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        hwm = status_value(server.pid, "VmHWM")
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        if temporary is not None:
            temporary.cleanup()

    print(f"{len(jobs)} uploads, {args.parallel} at a time, in {wall:.1f} s "
          f"(index of {args.count} images, size {args.size})")
    print(f"{'file':<20} {'kB':>7}  answers (status: count)  seconds (max)  detail")
    for name, data in files.items():
        mine = [a for a in answers if a[0] == name]
        counts = ", ".join(f"{s}: {sum(1 for a in mine if a[1] == s)}" for s in sorted({a[1] for a in mine}))
        detail = next((a[2] for a in mine if a[2]), "")
        print(f"{name:<20} {len(data) / 1e3:7.0f}  {counts:<23}  {max(a[3] for a in mine):13.1f}  {detail[:90]}")
    peak = max(sampler.peak, hwm if hwm_reset else 0)
    mb = 1e6
    print(f"idle RSS {idle / mb:.0f} MB; peak RSS {peak / mb:.0f} MB (sampled {sampler.peak / mb:.0f}, "
          f"VmHWM {hwm / mb:.0f}{'' if hwm_reset else ' since start'}); peak - idle {(peak - idle) / mb:.0f} MB")
    met = peak - idle < TARGET and alive
    print(f"target: peak - idle under {TARGET / 1e9:.1f} GB: {'met' if met else 'MISSED'}"
          + ("" if alive else " (the server died)"))
    if args.json:
        print(json.dumps({"idle": idle, "peak": peak, "peak_minus_idle": peak - idle, "seconds": wall,
                          "answers": {name: [a[1] for a in answers if a[0] == name] for name in files}}))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
