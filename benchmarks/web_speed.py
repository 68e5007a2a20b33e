"""How fast ``camretrieval serve`` answers (docs/web.md, "Speed"): the server is started as a user starts it, on the
index of benchmarks/refinement.py (built once under ``--workdir``, or ``--index DIR``: clutter-dev's 400 images with
their maps, efficientnet_lite0 at 448 px, 512-d PCA-whitening learned on eth80-dev), and timed over real HTTP from
this process, one request at a time:

- start-up: from launching ``camretrieval serve`` to its first answer (``GET /api/info``; the model is loaded then);
- ``POST /api/search``: an uploaded image (clutter-dev's, ``--repeat`` different ones), top 100; an indexed image by
  path with its boxes.json box, top 100; the same with OnA and re-ranking of the top 100;
- ``GET /api/images?q=...`` (a filter over every path); 40 thumbnails the first time and again (cached);
- ``GET /api/explain`` of a search's first result, then each of its two overlay PNGs.

Printed: the fastest and slowest of ``--repeat`` requests of each kind (thumbnails: the 40 together), the torch
thread count of the server (its default: one per core; ``--omp-threads N`` sets OMP_NUM_THREADS) and the load
average, as the times depend on both.

    python benchmarks/web_speed.py [--workdir /tmp/camretrieval-refinement] [--repeat 5] [--port 8791]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


def camretrieval_command() -> list[str]:
    script = Path(sys.executable).parent / "camretrieval"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "camretrieval.cli"]


def multipart(fields: dict[str, str], file: Path | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type (the form of ``POST /api/search``)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file.name}"\r\n'
                     f"Content-Type: image/jpeg\r\n\r\n".encode() + file.read_bytes() + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def timed(url: str, body: bytes | None = None, content_type: str | None = None) -> tuple[float, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as answer:
        data = answer.read()
    return time.perf_counter() - started, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/camretrieval-refinement"))
    parser.add_argument("--index", type=Path, help="an index of clutter-dev (default: built under --workdir)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--port", type=int, default=8791)
    parser.add_argument("--omp-threads", type=int, default=0, help="OMP_NUM_THREADS for the server (0: torch's default)")
    args = parser.parse_args()

    if args.index is None:
        from refinement import prepare  # builds (once) the index of benchmarks/refinement.py

        args.backbone, args.size, args.distractors = "efficientnet_lite0", 448, None
        _, args.index = prepare(args)
    boxes = json.loads((args.data / "clutter-dev" / "boxes.json").read_text())
    queries = sorted(boxes)[:: max(1, len(boxes) // args.repeat)][: args.repeat]
    base = f"http://127.0.0.1:{args.port}"
    load_before = os.getloadavg()
    started = time.perf_counter()
    log = tempfile.TemporaryFile()  # the server's log (a pipe left unread could fill and block it)
    env = dict(os.environ) | ({"OMP_NUM_THREADS": str(args.omp_threads)} if args.omp_threads else {})
    server = subprocess.Popen([*camretrieval_command(), "serve", str(args.index), "--port", str(args.port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=log)
    rows: dict[str, list[float]] = {}
    try:
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"serve exited with {server.returncode}:\n{log.read().decode()[-2000:]}")
            try:
                _, info = timed(f"{base}/api/info")
                break
            except OSError:
                time.sleep(0.05)
        rows["start-up: launch to first answer (model loaded)"] = [time.perf_counter() - started]
        count = json.loads(info)["count"]

        def search(fields: dict[str, str], file: Path | None = None) -> tuple[float, dict]:
            seconds, answer = timed(f"{base}/api/search", *multipart(fields, file))
            return seconds, json.loads(answer)[0]

        for query in queries:
            box = ",".join(str(v) for v in boxes[query])
            seconds, _ = search({"top": "100"}, args.data / "clutter-dev" / query)
            rows.setdefault("POST /api/search, upload, top 100", []).append(seconds)
            seconds, answer = search({"path": query, "box": box, "top": "100"})
            rows.setdefault("POST /api/search, indexed path + box, top 100", []).append(seconds)
            seconds, _ = search({"path": query, "box": box, "top": "100", "online": "true", "rerank": "100"})
            rows.setdefault("POST /api/search, path + box, OnA + rerank 100", []).append(seconds)
            rows.setdefault("GET /api/images?q=... (filter over every path)", []).append(
                timed(f"{base}/api/images?" + urllib.parse.urlencode({"q": query.split("/")[0], "limit": 60}))[0])
            explain = urllib.parse.urlencode({"result": answer["results"][0]["path"], "path": query, "box": box})
            seconds, record = timed(f"{base}/api/explain?{explain}")
            rows.setdefault("GET /api/explain", []).append(seconds)
            for side in ("query", "result"):
                rows.setdefault("GET /api/explain/overlay (one PNG, after explain)", []).append(
                    timed(base + json.loads(record)["overlays"][side])[0])
        _, listing = timed(f"{base}/api/images?limit=40")
        paths = json.loads(listing)["paths"]
        for label in ("first time", "cached"):
            thumbnails = [timed(f"{base}/api/thumbnails/{urllib.parse.quote(p)}?size=256")[0] for p in paths]
            rows[f"40 thumbnails, {label} (sum)"] = [sum(thumbnails)]
        threads = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                                 capture_output=True, text=True, check=True).stdout.strip()
    finally:
        server.terminate()
        server.wait(timeout=30)
    load_after = os.getloadavg()
    print(f"camretrieval serve {args.index} ({count} images), torch threads {threads}, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after; {args.repeat} requests of each kind")
    print(f"{'request':<52} {'fastest s':>9} {'slowest s':>9}")
    for name, values in rows.items():
        print(f"{name:<52} {min(values):9.3f} {max(values):9.3f}")


if __name__ == "__main__":
    main()
