"""Issue 12's defects of ``camretrieval serve``, each reproduced over real HTTP (a real server process): uploads that
decode to many bytes (memory grew by about 1 GB per 16-bit PNG of 77 kB, 4.6 GB for four at once), POSTs from
other sites, the Host check on loopback addresses other than 127.0.0.1, and indexed file names holding a newline, a
backslash or bytes that are not UTF-8 (404 from the image and thumbnail routes), with thumbnail errors that showed
absolute paths."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.parse
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camretrieval.extraction.images import to_rgb
from camretrieval.search import Index
from camretrieval.web import files
from camretrieval.web.files import (
    MAX_DECODED_BYTES,
    DecodePool,
    RequestError,
    bytes_per_pixel,
    decode_upload,
    rgb_image,
)
from camretrieval.web.server import is_loopback_host

SIZE = 96
NOT_UTF8 = os.fsdecode(b"odd/caf\xe9.jpg")  # what Python gets for such a name: a str with a surrogate escape
ODD_NAMES = ("odd/new\nline.jpg", "odd/back\\slash.jpg", NOT_UTF8, "odd/what?#%20&=.jpg")


# --- a server over an index with odd names --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collection(tmp_path_factory, eth80_dir):
    """Images named as a file system allows (``ODD_NAMES``), a few plain ones, ``broken/damaged.jpg`` (garbage
    since it was indexed), ``alias.jpg`` (a symlink to it, inside the root) and ``gone.jpg`` (deleted since)."""
    root = tmp_path_factory.mktemp("hardening")
    images = root / "images"
    (images / "odd").mkdir(parents=True)
    (images / "plain").mkdir()
    (images / "broken").mkdir()
    sources = {obj: sorted((eth80_dir / obj).glob("*.jpg")) for obj in ("cup2", "horse2", "apple2", "car1")}
    for name, obj in zip(ODD_NAMES, ("cup2", "horse2", "apple2", "car1")):
        source = sources[obj][0]
        shutil.copy(source, os.path.join(images, name))
    for obj in ("cup2", "horse2", "apple2"):
        shutil.copy(sources[obj][20], images / "plain" / f"{obj}.jpg")
    shutil.copy(sources["car1"][20], images / "broken" / "damaged.jpg")
    shutil.copy(sources["car1"][30], images / "gone.jpg")
    (images / "alias.jpg").symlink_to(Path("broken") / "damaged.jpg")
    index, failures = Index.build(images, None, size=SIZE, n_classes=8, workers=0, progress=False)
    assert not failures and set(ODD_NAMES) <= set(index.paths)
    index_dir = root / "index"
    index.save(index_dir)
    (images / "broken" / "damaged.jpg").write_bytes(b"no longer an image " * 100)
    (images / "gone.jpg").unlink()
    return root, images, index_dir


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """``camretrieval serve INDEX --host HOST --port PORT`` in its own process."""

    def __init__(self, index_dir: Path, log: Path, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = _free_port(host)
        self.log = open(log, "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "camretrieval.cli", "serve", str(index_dir)]
            + ["--host", host, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                pytest.fail(f"camretrieval serve exited with {self.process.returncode}:\n{self.log.read()}")
            try:
                if self.request("GET", "/api/info")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("camretrieval serve not ready after 120 s")
            time.sleep(0.3)

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def request(self, method: str, target: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, body) of one request, the target sent exactly as given."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=300)
        try:
            connection.request(method, target, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def search(self, fields: dict[str, str], upload: tuple[str, bytes] | None = None, headers: dict | None = None):
        body, content_type = multipart(fields, upload)
        status, _, data = self.request("POST", "/api/search", body, {"Content-Type": content_type} | (headers or {}))
        return status, json.loads(data)

    def rss(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} for the server")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def multipart(fields: dict[str, str], upload: tuple[str, bytes] | None = None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    if upload is not None:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{upload[0]}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode() + upload[1] + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server(collection):
    root, _, index_dir = collection
    running = Server(index_dir, root / "serve.log")
    yield running
    running.stop()


def url_path(name: str) -> str:
    """An indexed name in a URL: its bytes (``os.fsencode``), percent-encoded, the slashes kept."""
    return urllib.parse.quote(os.fsencode(name), safe="/")


# --- 11: file names ---------------------------------------------------------------------------------------------


def test_names_with_a_newline_a_backslash_or_other_bytes_are_listed_and_found(server, collection):
    _, images, index_dir = collection
    status, _, body = server.request("GET", "/api/images?q=odd/&limit=500")
    assert status == 200
    assert sorted(json.loads(body)["paths"]) == sorted(ODD_NAMES)  # JSON carries the surrogate escape as \udce9
    for name in ODD_NAMES:
        data = (images / name).read_bytes()
        status, answer = server.search({"top": "3"}, ("query.jpg", data))
        assert status == 200, answer
        assert answer[0]["results"][0]["path"] == name and answer[0]["results"][0]["score"] > 0.99
        expected = Index.open(index_dir).search([images / name], top=3)[0]
        assert [hit["path"] for hit in answer[0]["results"]] == [hit.path for hit in expected]


@pytest.mark.parametrize("name", ODD_NAMES, ids=["newline", "backslash", "not-utf8", "url-characters"])
def test_names_with_a_newline_a_backslash_or_other_bytes_are_served(server, collection, name):
    _, images, _ = collection
    status, headers, body = server.request("GET", "/api/images/" + url_path(name))
    assert status == 200, body[:300]
    assert body == (images / name).read_bytes() and headers["content-type"] == "image/jpeg"
    status, headers, body = server.request("GET", f"/api/thumbnails/{url_path(name)}?size=128")
    assert status == 200, body[:300]
    assert headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(body)).size) == 128


def test_explanations_of_names_that_are_not_utf8(server, collection):
    """The query and the result as the client sent their bytes; the overlay URLs carry them back."""
    pairs = ((NOT_UTF8, "plain/cup2.jpg"), ("plain/horse2.jpg", NOT_UTF8), ("odd/new\nline.jpg", NOT_UTF8))
    for query, result in pairs:
        target = "/api/explain?" + urllib.parse.urlencode({"path": query, "result": result}, errors="surrogateescape")
        status, _, body = server.request("GET", target)
        assert status == 200, body[:300]
        explanation = json.loads(body)
        assert explanation["result"]["path"] == result
        for side in ("query", "result"):
            status, headers, png = server.request("GET", explanation["overlays"][side])
            assert status == 200 and headers["content-type"] == "image/png" and png.startswith(b"\x89PNG")


def test_the_exact_name_is_needed(server):
    """A name is served only as indexed: the same bytes decoded otherwise, or a backslash for a slash, are not."""
    for target in (
        "/api/images/odd/caf%C3%A9.jpg",  # the UTF-8 spelling of what is Latin-1 on disk
        "/api/images/odd/caf%EF%BF%BD.jpg",  # U+FFFD, what a lossy decoding gives
        "/api/images/odd%5Cnew%0Aline.jpg",
        "/api/images/odd/new%0Aline.jpg%00",
        "/api/images/odd/back/slash.jpg",
    ):
        status, _, body = server.request("GET", target)
        assert status == 404 and json.loads(body) == {"detail": "not an indexed image"}, (target, body)


_ABSOLUTE = re.compile(r"(^|[\s'\"(=:])/[^\s'\")]")  # a path that starts at the root, anywhere in a message


@pytest.mark.parametrize("name", ["broken/damaged.jpg", "alias.jpg", "gone.jpg"])
def test_thumbnail_errors_name_the_image_relative_to_the_root(server, collection, name):
    root, images, _ = collection
    status, headers, body = server.request("GET", f"/api/thumbnails/{url_path(name)}?size=128")
    assert status == 404 and headers["content-type"] == "application/json"
    detail = json.loads(body)["detail"]
    assert repr(name) in detail, detail
    assert str(root) not in detail and str(images.resolve()) not in detail and not _ABSOLUTE.search(detail), detail


# --- 6: the Host check on every loopback address ------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True), ("127.0.0.2", True), ("127.255.255.254", True), ("localhost", True), ("::1", True),
        ("[::1]", True), ("0.0.0.0", False), ("::", False), ("192.168.1.2", False), ("example.org", False),
        ("localhost.example.org", False), ("::2", False),
    ],
)
def test_which_serve_hosts_are_loopback(host, loopback):
    assert is_loopback_host(host) is loopback


def _host_headers(port: int) -> tuple[list[str], list[str]]:
    """(Host headers a loopback server answers, Host headers it refuses)."""
    answered = ["localhost", f"localhost:{port}", "LocalHost", "127.0.0.1", f"127.0.0.1:{port}", f"127.3.4.5:{port}",
                "[::1]", f"[::1]:{port}", f"[0:0:0:0:0:0:0:1]:{port}", "::1"]
    refused = ["attacker.example", f"attacker.example:{port}", f"localhost.attacker.example:{port}",
               f"127.0.0.1.attacker.example:{port}", f"[::2]:{port}", f"[::1].attacker.example:{port}",
               f"[::1]:{port}:1", "[::1", "10.0.0.1", f"{port}", ""]
    return answered, refused


@pytest.mark.parametrize("host", ["::1", "127.0.0.2"])
def test_host_check_holds_on_every_loopback_address(collection, tmp_path, host):
    """DNS rebinding: on any loopback address a page elsewhere must not reach the server under a name of its own.
    (Before, only 127.0.0.1 and localhost were checked: ``--host ::1`` or ``127.0.0.2`` answered any Host.)"""
    _, _, index_dir = collection
    running = Server(index_dir, tmp_path / "serve.log", host=host)
    try:
        answered, refused = _host_headers(running.port)
        for value in answered:
            status, _, body = running.request("GET", "/api/info", headers={"Host": value})
            assert status == 200 and json.loads(body)["count"] > 0, value
        for value in refused:
            status, _, body = running.request("GET", "/api/info", headers={"Host": value})
            assert status == 400 and b"count" not in body, value
        # A POST under a foreign name is refused as well, before its body is read.
        body, content_type = multipart({"path": "plain/cup2.jpg", "top": "2"})
        headers = {"Content-Type": content_type, "Host": "evil.example"}
        status, _, _ = running.request("POST", "/api/search", body, headers)
        assert status == 400
        status, _, _ = running.request("POST", "/api/search", body, {"Content-Type": content_type})
        assert status == 200
    finally:
        running.stop()


def test_host_check_on_127_0_0_1_reads_ipv6_literals(server):
    """Starlette's check cut the Host at its first colon, so that ``[::1]:PORT`` was refused (and any name
    starting with ``[`` compared as ``[``)."""
    answered, refused = _host_headers(server.port)
    for value in answered:
        assert server.request("GET", "/api/info", headers={"Host": value})[0] == 200, value
    for value in refused:
        assert server.request("GET", "/api/info", headers={"Host": value})[0] == 400, value


# --- 5: cross-site requests -------------------------------------------------------------------------------------


def test_cross_site_posts_are_refused(server, collection):
    _, images, _ = collection
    upload = ("query.jpg", (images / "plain" / "cup2.jpg").read_bytes())
    own = f"http://{server.netloc}"
    refused = [
        {"Origin": "http://attacker.example"},
        {"Origin": "https://attacker.example"},
        {"Origin": f"http://attacker.example:{server.port}"},
        {"Origin": f"http://127.0.0.1:{server.port + 1}"},  # another origin on the same machine
        {"Origin": "null"},  # a sandboxed frame, a file:// page
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": f"http://localhost:{server.port + 1}"},
        {"Sec-Fetch-Site": "cross-site", "Origin": own},
    ]
    for headers in refused:
        for fields, file in (({"top": "2"}, upload), ({"path": "plain/cup2.jpg", "top": "2"}, None)):
            status, answer = server.search(fields, file, headers)
            assert status == 403 and "refused" in answer["detail"], (headers, answer)
    # Nothing of a refused upload was kept: its id is unknown.
    upload_id = hashlib.sha256(upload[1]).hexdigest()[:32]
    status, answer = server.search({"query_id": upload_id})
    assert status == 404
    # The page's own requests, and those without a browser's headers (curl, scripts), are served.
    for headers in ({}, {"Origin": own}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"},
                    {"Origin": f"http://localhost:{server.port}", "Host": f"localhost:{server.port}"}):
        status, answer = server.search({"top": "2"}, upload, headers)
        assert status == 200 and answer[0]["results"], (headers, answer)
    # Reading stays open to any page (a browser lets no other site read the answer without CORS headers).
    assert server.request("GET", "/api/info", headers={"Origin": "http://attacker.example"})[0] == 200


# --- 5: uploads that decode to many bytes -----------------------------------------------------------------------


def png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG of zeros written row by row: 16-bit ones too, which Pillow does not write."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + width * channels * bit_depth // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def png16() -> bytes:
    """The tester's file: a 16-bit greyscale PNG of 6300 x 6300 pixels (39.7 megapixels), 77 kB."""
    data = png(6300, 6300, 16, 0)
    assert len(data) < 80_000
    return data


def test_parallel_16_bit_uploads_stay_in_bounded_memory(server, png16):
    """Eight at once: the server's RSS must not rise by 1.5 GB (it rose by about 1 GB per upload, all at once)."""
    time.sleep(1)
    idle = server.rss()
    peak = idle
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, server.rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: server.search({"top": "2"}, (f"q{i}.png", png16)), range(8)))
    finally:
        done.set()
        sampler.join()
    assert all(status == 200 for status, _ in answers), answers
    assert peak - idle < 1.5e9, f"idle {idle / 1e6:.0f} MB, peak {peak / 1e6:.0f} MB"


def test_decoded_bytes_are_bounded_from_the_header(server):
    """Pixels x bytes per pixel (bands x bit depth) over 120 MB: 413 before decoding, though under 40 megapixels."""
    for data, per_pixel in ((png(4000, 4000, 16, 6), 8), (png(4500, 4500, 16, 2), 6), (png(5500, 5500, 8, 6), 4)):
        status, answer = server.search({"top": "2"}, ("big.png", data))
        assert status == 413, answer
        assert f"at {per_pixel} bytes per pixel" in answer["detail"] and "120 MB" in answer["detail"]
    status, answer = server.search({"top": "2"}, ("fits.png", png(4400, 4400, 16, 2)))  # 116 MB: searched
    assert status == 200, answer
    status, _, body = server.request("GET", "/api/info")
    assert json.loads(body)["limits"]["decoded_bytes"] == MAX_DECODED_BYTES == 120_000_000


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_bytes_per_pixel_come_from_the_header():
    tiff = io.BytesIO()
    Image.new("F", (8, 8)).save(tiff, "TIFF", compression="tiff_adobe_deflate")
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16)).save(cmyk, "JPEG")
    cases = {
        png(8, 8, 16, 0): 2, png(8, 8, 16, 2): 6, png(8, 8, 16, 4): 4, png(8, 8, 16, 6): 8, png(8, 8, 8, 2): 3,
        png(8, 8, 8, 6): 4, png(8, 8, 8, 0): 1, tiff.getvalue(): 4, cmyk.getvalue(): 4,
    }
    for data, expected in cases.items():
        with _opened(data) as image:
            assert bytes_per_pixel(image) == expected, (image.format, image.mode, image.tile)


def test_a_16_bit_upload_is_scaled_in_strips(png16):
    """``to_rgb`` scaled a 16-bit image through float64 copies of all of it (about 1 GB here); the server scales it
    a strip at a time. numpy reports its buffers to tracemalloc: the largest at any time stays small."""
    tracemalloc.start()
    try:
        picture = decode_upload(png16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert picture.mode == "RGB" and picture.size == (6300, 6300)
    assert peak < 64e6, f"{peak / 1e6:.0f} MB traced"


def _sample_image(mode: str, rng: np.random.Generator, width: int = 37, height: int = 23) -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    if mode == "I;16 dark":  # under 256: scaled by 255, not 65535
        return Image.fromarray(rng.integers(0, 200, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5, 70000, (height, width), dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(100, 80, (height, width)).astype(np.float32))
    if mode == "P transparent":
        picture = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert("P")
        picture.info["transparency"] = 5
        return picture
    return Image.fromarray(rng.integers(0, 255, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)


@pytest.mark.parametrize(
    "mode", ["I;16", "I;16 dark", "I", "F", "P transparent", "P", "L", "1", "LA", "PA", "RGBA", "RGB", "CMYK", "YCbCr"]
)
def test_the_bounded_decoding_gives_the_pixels_the_index_saw(mode, monkeypatch):
    """``rgb_image`` (strips, each orientation turned strip by strip) equals ``to_rgb`` bit for bit."""
    monkeypatch.setattr(files, "_STRIP_BYTES", 8 * 37 * 4)  # strips of 4 rows: many of them, and a short last one
    rng = np.random.default_rng(len(mode))
    for orientation in range(1, 9):
        picture = _sample_image(mode, rng)
        exif = picture.getexif()
        exif[0x0112] = orientation
        picture.info["exif"] = exif.tobytes()
        copy = picture.copy()
        expected = to_rgb(picture)
        got = rgb_image(copy)
        assert got.mode == "RGB" and got.size == expected.size, (orientation, got.size, expected.size)
        assert got.tobytes() == expected.tobytes(), orientation


def test_decode_pool_runs_a_few_at_a_time_and_says_when_busy():
    pool = DecodePool(workers=2, wait=30)
    running, most = 0, 0
    lock = threading.Lock()

    def job(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return i

    with ThreadPoolExecutor(8) as callers:
        assert list(callers.map(lambda i: pool.run(job, i), range(16))) == list(range(16))
    assert most == 2
    with pytest.raises(ValueError):
        pool.run(int, "not a number")  # the job's own error comes back
    pool.close()
    busy = DecodePool(workers=1, wait=0.2)
    release = threading.Event()
    first = threading.Thread(target=busy.run, args=(release.wait, 10))
    first.start()
    time.sleep(0.05)
    with pytest.raises(RequestError) as error:
        busy.run(int, "1")
    assert error.value.status == 503 and "busy" in str(error.value)
    release.set()
    first.join()
    busy.close()


# --- the page, with odd names -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (skipped, or failed under CAMRETRIEVAL_REQUIRE_BROWSER=1, when missing)."""
    missing = pytest.fail if os.environ.get("CAMRETRIEVAL_REQUIRE_BROWSER") == "1" else pytest.skip
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        missing("playwright not installed (pip install -e '.[test]')")
    candidates = (os.environ.get("CAMRETRIEVAL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome")
    executable = next((shutil.which(c) for c in candidates if c and shutil.which(c)), None)
    if executable is None:
        missing("no Chromium installed (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            yield launched
        finally:
            launched.close()


def test_page_shows_searches_and_explains_odd_names(browser, server):
    """The page's URLs carry each name's bytes: thumbnails of the picker, a search by a picked image whose name is
    not UTF-8, and its explanation."""
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://{server.netloc}/")
    page.click("#pick-button")
    page.fill("#picker-filter", "odd/")
    page.wait_for_function("document.querySelectorAll('#picker-grid img').length === 4")
    page.wait_for_function(
        "[...document.querySelectorAll('#picker-grid img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    titles = page.eval_on_selector_all("#picker-grid img", "images => images.map(i => i.title)")
    assert len(titles) == 4 and "odd/new\nline.jpg" in titles and "odd/back\\slash.jpg" in titles
    not_utf8 = next(i for i, t in enumerate(titles) if t.startswith("odd/caf"))
    page.locator("#picker-grid img").nth(not_utf8).click()
    page.wait_for_function("!document.getElementById('search-button').disabled")
    page.fill("#top", "3")
    page.click("#search-button")
    page.wait_for_selector("#results[data-state=done]", timeout=60_000)
    first = page.locator("#results .hit").first
    assert page.evaluate("document.querySelector('#results .hit').dataset.path") == NOT_UTF8
    page.wait_for_function("document.querySelector('#results .hit img').naturalWidth > 0")
    first.click()
    page.wait_for_selector("#explain[data-state=done]", timeout=60_000)
    page.wait_for_function(
        "['explain-query', 'explain-result'].every(i => document.getElementById(i).complete "
        "&& document.getElementById(i).naturalWidth > 0)"
    )
    assert not errors, errors
    page.close()
