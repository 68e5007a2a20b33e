"""``camretrieval serve`` over real HTTP (a real server process), its security limits, the page in a real headless
browser, ``camretrieval explain`` and ``camretrieval eval --report``. Small images (size 128), a dozen of them."""

from __future__ import annotations

import base64
import csv
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from camretrieval.cli import main
from camretrieval.constants import DEFAULT_QE_GATE
from camretrieval.evaluation.metrics import mean_interpolated_precision, precision_recall
from camretrieval.evaluation.report import draw_outlined_box, metric_name
from camretrieval.search import Index, SearchOptions
from camretrieval.web.files import MAX_UPLOAD_BYTES, RequestError, decode_upload

SIZE = 128
OBJECTS = ("apple2", "cup2", "horse2")


@pytest.fixture(scope="module")
def collection(tmp_path_factory, eth80_dir):
    """Four images of three ETH-80 objects, plus ``escape.jpg``: a symlink inside the image root to a file outside
    it (indexed like any image, never to be served), indexed at size 128 with its maps."""
    root = tmp_path_factory.mktemp("web")
    images = root / "images"
    for obj in OBJECTS:
        (images / obj).mkdir(parents=True)
        for image in sorted((eth80_dir / obj).glob("*.jpg"))[::10][:4]:
            shutil.copy(image, images / obj / image.name)
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(sorted((eth80_dir / "car1").glob("*.jpg"))[0], outside / "secret.jpg")
    (images / "escape.jpg").symlink_to(outside / "secret.jpg")
    index, failures = Index.build(images, None, size=SIZE, n_classes=8, workers=0, progress=False)
    assert not failures and "escape.jpg" in index.paths
    index_dir = root / "index"
    index.save(index_dir)
    return root, images, index_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(collection):
    """``camretrieval serve`` in its own process on a free port; yields its base URL once /api/info answers."""
    root, _, index_dir = collection
    port = _free_port()
    log = open(root / "serve.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "camretrieval.cli", "serve", str(index_dir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"camretrieval serve exited with {process.returncode}:\n{log.read()}")
            try:
                if request("GET", base + "/api/info")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"camretrieval serve not ready after 120 s:\n{log.read()}")
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One HTTP request, the path sent exactly as written (no client-side normalisation of ``..``)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]] | None = None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields.items():
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in (files or {}).items():
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def search(base: str, fields: dict[str, str], files=None) -> tuple[int, object]:
    body, headers = multipart(fields, files)
    status, _, data = request("POST", base + "/api/search", body, headers)
    return status, json.loads(data)


def first_image(images: Path, obj: str = "cup2") -> Path:
    return sorted((images / obj).glob("*.jpg"))[0]


# --- the API ---


def test_page_openapi_and_info(server):
    status, headers, page = request("GET", server + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'<canvas id="query-canvas"' in page and b"/static/app.js" in page
    status, _, script = request("GET", server + "/static/app.js")
    assert status == 200 and b"/api/search" in script
    status, _, spec = request("GET", server + "/openapi.json")
    paths = json.loads(spec)["paths"]
    for path in (
        "/api/search",
        "/api/explain",
        "/api/explain/overlay",
        "/api/images/{path}",
        "/api/thumbnails/{path}",
        "/api/info",
        "/api/images",
    ):
        assert path in paths, path
    status, _, info = request("GET", server + "/api/info")
    info = json.loads(info)
    assert info["count"] == 13 and info["settings"]["size"] == SIZE
    assert info["refinement"] == {"online": True, "rerank": True, "qe": True}
    # What the page needs to warn about a box smaller than one feature cell (efficientnet_lite0: stride 32).
    assert info["network"] == {"input_size": SIZE, "stride": 32}
    status, _, listing = request("GET", server + "/api/images?q=CUP&limit=2&offset=1")
    listing = json.loads(listing)
    assert listing["total"] == 4 and len(listing["paths"]) == 2 and all(p.startswith("cup2/") for p in listing["paths"])


def test_search_by_path_and_upload_is_the_cli_search(server, collection):
    _, images, index_dir = collection
    query = first_image(images)
    relative = query.relative_to(images).as_posix()
    index = Index.open(index_dir)
    expected = index.search([query], top=5)[0]
    status, by_path = search(server, {"path": relative, "top": "5"})
    assert status == 200
    assert [sorted(entry) for entry in by_path] == [["box", "query", "query_id", "refinement", "results", "seconds"]]
    assert by_path[0]["query"] == relative and by_path[0]["query_id"] is None
    assert by_path[0]["refinement"] == {
        "refine": False, "online": False, "online_classes": None, "online_whitening": True, "rerank": 0, "rerank_classes": SearchOptions().rerank_classes, "qe": 0, "qe_alpha": 0.0,
        "qe_gate": 0,
    }
    hits = by_path[0]["results"]
    assert all(sorted(hit) == ["path", "score"] for hit in hits)
    assert [h["path"] for h in hits] == [h.path for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in expected], abs=1e-5)
    status, uploaded = search(
        server, {"top": "5", "box": "20,20,230,230"}, {"file": ("my query.jpg", query.read_bytes())}
    )
    assert status == 200 and uploaded[0]["query"] == "my query.jpg" and uploaded[0]["box"] == [20, 20, 230, 230]
    boxed = index.search([query], [(20, 20, 230, 230)], top=5)[0]
    assert [h["path"] for h in uploaded[0]["results"]] == [h.path for h in boxed]
    # The upload is kept (in the server's temporary folder) for a later search or explanation by its id.
    query_id = uploaded[0]["query_id"]
    status, again = search(server, {"query_id": query_id, "top": "5", "box": "20,20,230,230"})
    assert status == 200 and again[0]["results"] == uploaded[0]["results"]


def test_search_options_are_the_index_options(server, collection):
    _, images, index_dir = collection
    query = first_image(images, "horse2")
    options = SearchOptions(online=True, rerank=5, qe=2)
    expected = Index.open(index_dir).search([query], top=6, options=options)[0]
    status, result = search(
        server, {"path": query.relative_to(images).as_posix(), "top": "6", "online": "true", "rerank": "5", "qe": "2"}
    )
    assert status == 200
    assert [h["path"] for h in result[0]["results"]] == [h.path for h in expected]
    assert [h["score"] for h in result[0]["results"]] == pytest.approx([h.score for h in expected], abs=1e-4)
    assert result[0]["refinement"] == {"refine": False, "online": True, "online_classes": None, "online_whitening": True, "rerank": 5, "rerank_classes": 6,
                                       "qe": 2, "qe_alpha": 0.0, "qe_gate": DEFAULT_QE_GATE}
    # R and K past the index's 13 images are clipped to it, and the answer says what was applied.
    status, result = search(
        server, {"path": query.relative_to(images).as_posix(), "top": "3", "rerank": "100", "qe": "50", "qe_alpha": "3",
                 "qe_gate": "4"}
    )
    assert status == 200
    assert result[0]["refinement"] == {"refine": False, "online": False, "online_classes": None, "online_whitening": True, "rerank": 13,
                                       "rerank_classes": 6, "qe": 13, "qe_alpha": 3.0, "qe_gate": 4}
    gated = Index.open(index_dir).search([query], top=3, options=SearchOptions(rerank=100, qe=50, qe_alpha=3.0, qe_gate=4))[0]
    assert [h["path"] for h in result[0]["results"]] == [h.path for h in gated]
    # refine: the measured best, as search --refine; alone
    refined = Index.open(index_dir).search([query], top=6, options=SearchOptions.refine())[0]
    status, result = search(server, {"path": query.relative_to(images).as_posix(), "top": "6", "refine": "true"})
    assert status == 200
    assert [h["path"] for h in result[0]["results"]] == [h.path for h in refined]
    assert result[0]["refinement"] == {"refine": True, "online": True, "online_classes": 8, "online_whitening": False,
                                       "rerank": 0, "rerank_classes": 6, "qe": 0, "qe_alpha": 0.0, "qe_gate": 0}
    status, error = search(server, {"path": query.relative_to(images).as_posix(), "refine": "true", "qe": "2"})
    assert status == 400 and "refine" in str(error)
    for alone in ({"refine": "true", "qe_gate": "3"}, {"qe_gate": "3"}, {"qe_alpha": "3"}):  # as the CLI refuses them
        status, error = search(server, {"path": query.relative_to(images).as_posix()} | alone)
        assert status == 400 and "go with query expansion" in str(error), alone


def test_explain_gives_classes_region_and_png_overlays(server, collection):
    _, images, _ = collection
    query = first_image(images, "horse2").relative_to(images).as_posix()
    result = sorted((images / "horse2").glob("*.jpg"))[1].relative_to(images).as_posix()
    params = urllib.parse.urlencode({"path": query, "result": result, "box": "10,10,240,240"})
    status, _, body = request("GET", f"{server}/api/explain?{params}")
    assert status == 200, body
    explanation = json.loads(body)
    classes = explanation["query"]["classes"]
    assert len(classes) == 5 and all(isinstance(c["name"], str) and c["name"] for c in classes)
    assert [c["probability"] for c in classes] == sorted((c["probability"] for c in classes), reverse=True)
    assert explanation["query"]["heatmap_classes"] == classes[:2]
    width, height = explanation["result"]["size"]
    x1, y1, x2, y2 = explanation["result"]["region"]
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert -1 <= explanation["result"]["region_score"] <= 1 and explanation["result"]["path"] == result
    for side in ("query", "result"):
        status, headers, png = request("GET", server + explanation["overlays"][side])
        assert status == 200 and headers["content-type"] == "image/png" and png.startswith(b"\x89PNG")
        assert Image.open(io.BytesIO(png)).size[0] >= 256


_URL = re.compile(rb"https?://", re.IGNORECASE)


def test_api_docs_are_served_with_nothing_from_another_host(server):
    """/docs is our own page over /openapi.json: it and every file it loads hold no http(s):// URL (FastAPI's Swagger
    UI, which loads its scripts from a CDN, and ReDoc are off)."""
    status, headers, page = request("GET", server + "/docs")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"swagger" not in page.lower() and b"cdn" not in page.lower()
    assets = re.findall(rb'(?:src|href)="([^"#]+)"', page)
    assert b"/static/api.js" in assets and b"/static/style.css" in assets
    served = {"/docs": page}
    for asset in assets:
        assert asset.startswith(b"/"), asset  # same host: every reference is a path on this server
        status, _, body = request("GET", server + asset.decode())
        assert status == 200, asset
        served[asset.decode()] = body
    assert b'fetch("/openapi.json")' in served["/static/api.js"]
    for name, body in served.items():
        assert not _URL.search(body), (name, _URL.search(body))
    # The description it renders: every path, and no URL to another host in it either.
    status, _, spec = request("GET", server + "/openapi.json")
    assert status == 200 and not _URL.search(spec)
    assert "/docs" not in json.loads(spec)["paths"]
    for gone in ("/redoc", "/docs/oauth2-redirect"):
        assert request("GET", server + gone)[0] == 404
    # The search page links to it.
    assert b'href="/docs"' in request("GET", server + "/")[2]


def test_images_and_thumbnails_are_served(server, collection):
    _, images, _ = collection
    path = first_image(images)
    relative = urllib.parse.quote(path.relative_to(images).as_posix())
    status, _, data = request("GET", f"{server}/api/images/{relative}")
    assert status == 200 and data == path.read_bytes()
    status, headers, data = request("GET", f"{server}/api/thumbnails/{relative}?size=128")
    assert status == 200 and headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(data)).size) == 128
    assert request("GET", f"{server}/api/thumbnails/{relative}?size=100")[0] == 400


# --- security ---


@pytest.mark.parametrize(
    "target",
    [
        "/api/images/../../../../etc/passwd",
        "/api/images/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/api/images/%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/api/images/cup2/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/api/images//etc/passwd",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/thumbnails/..%2Findex%2Findex.json",
        "/api/thumbnails/../outside/secret.jpg",
        "/api/images/cup2/./../cup2",
        "/api/images/C:%5Cwindows%5Cwin.ini",
    ],
)
def test_path_traversal_is_refused(server, target):
    status, headers, body = request("GET", server + target)
    assert status in (400, 403, 404), (status, body[:200])
    assert b"root:" not in body and b"camretrieval-index" not in body
    if target.startswith("/api/"):
        assert headers["content-type"] == "application/json" and "detail" in json.loads(body)


def test_foreign_host_header_is_refused(server):
    """DNS rebinding: a page elsewhere must not reach the loopback server under a name of its own."""
    status, _, body = request("GET", server + "/api/info", headers={"Host": "attacker.example:8000"})
    assert status == 400 and b"count" not in body
    assert request("GET", server + "/api/info", headers={"Host": "localhost"})[0] == 200


def test_absolute_paths_of_indexed_images_are_refused(server, collection):
    _, images, _ = collection
    absolute = first_image(images).resolve()
    for target in (f"/api/images{absolute}", f"/api/images/{urllib.parse.quote(str(absolute), safe='')}"):
        status, _, body = request("GET", server + target)
        assert status == 404 and json.loads(body) == {"detail": "not an indexed image"}
    status, body = search(server, {"path": str(absolute)})
    assert status == 404


def test_symlink_escaping_the_image_root_is_refused(server, collection):
    root, images, _ = collection
    secret = (root / "outside" / "secret.jpg").read_bytes()
    for target in ("/api/images/escape.jpg", "/api/thumbnails/escape.jpg"):
        status, _, body = request("GET", server + target)
        assert status == 403 and secret not in body and "symlink" in json.loads(body)["detail"]
    status, body = search(server, {"path": "escape.jpg"})
    assert status == 403
    query = "cup2/" + first_image(images).name
    status, _, _ = request(
        "GET", server + "/api/explain?" + urllib.parse.urlencode({"path": query, "result": "escape.jpg"})
    )
    assert status == 403


def test_oversized_upload_is_413(server):
    data = os.urandom(MAX_UPLOAD_BYTES + 2**20)
    status, body = search(server, {"top": "3"}, {"file": ("big.jpg", data)})
    assert status == 413 and "20 MB" in body["detail"]
    # Few bytes, too many pixels: refused from the header, before decoding.
    picture = io.BytesIO()
    Image.new("1", (7000, 6000)).save(picture, "PNG")
    status, body = search(server, {"top": "3"}, {"file": ("huge.png", picture.getvalue())})
    assert status == 413 and "megapixels" in body["detail"]


def test_bad_uploads_get_clear_json_errors(server, collection):
    _, images, _ = collection
    status, body = search(server, {}, {"file": ("evil.jpg", b"#!/bin/sh\necho this is no image\n")})
    assert status == 415 and "not an image" in body["detail"]
    status, body = search(server, {}, {"file": ("cut.jpg", first_image(images).read_bytes()[:300])})
    assert status == 400 and "corrupt or truncated" in body["detail"]
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    status, body = search(server, {}, {"file": ("a.gif", gif.getvalue())})
    assert status == 415 and "GIF" in body["detail"]
    status, body = search(server, {}, {"file": ("empty.jpg", b"")})
    assert status == 400
    status, body = search(server, {"path": "cup2/" + first_image(images).name, "box": "1,2,3"})
    assert status == 400 and "four numbers" in body["detail"]
    status, body = search(server, {"path": "cup2/" + first_image(images).name, "box": "500,500,600,600"})
    assert status == 400 and "outside" in body["detail"]
    status, body = search(server, {"query_id": "0" * 32})
    assert status == 404 and "search again" in body["detail"]
    status, body = search(server, {"path": "cup2/" + first_image(images).name, "top": "0"})
    assert status == 422 and "detail" in body
    for status_body in (body,):
        assert "Traceback" not in json.dumps(status_body)


def test_decode_upload_limits_in_process():
    with pytest.raises(RequestError) as error:
        decode_upload(b"x" * (MAX_UPLOAD_BYTES + 1))
    assert error.value.status == 413
    png = io.BytesIO()
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(png, "PNG")
    picture = decode_upload(png.getvalue())
    assert picture.mode == "RGB" and picture.size == (40, 30) and picture.getpixel((0, 0)) == (255, 255, 255)


# --- the page in a real browser ---


@pytest.fixture(scope="module")  # module scope: set up before the (module-scoped) server, so a skip costs nothing
def chromium() -> tuple[object, str]:
    """Playwright's sync API and a Chromium to drive, or a skip saying what is missing (before a server starts).

    CI sets CAMRETRIEVAL_REQUIRE_BROWSER=1 (``.ci/run``), which turns that skip into a failure: a green CI run then
    proves the page was driven in a real browser."""
    required = os.environ.get("CAMRETRIEVAL_REQUIRE_BROWSER") == "1"
    missing = pytest.fail if required else pytest.skip
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        missing("playwright not installed (pip install -e '.[test]')")
    for candidate in (os.environ.get("CAMRETRIEVAL_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return sync_api, shutil.which(candidate)
    missing("no Chromium installed (Debian: apt-get install chromium; .ci/run installs it when root)")


@pytest.fixture(scope="module")
def browser(chromium):
    """One headless Chromium for the page tests of this module."""
    sync_api, executable = chromium
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable,
            # As root (CI) Chromium needs --no-sandbox; the rest keeps it off a network that is not there.
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield launched
        finally:
            launched.close()


def _open_page(browser, server: str, width: int = 1280, height: int = 860, path: str = "/"):
    """A page of the server in a fresh context (downloads accepted), its script errors collected in ``page.errors``."""
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(server + path)
    if path == "/":
        page.wait_for_function("document.getElementById('index-info').textContent.includes('13 images')")
    return page


def _drag_box(page, left: float, top: float, right: float, bottom: float) -> None:
    """Drag with the mouse on the query canvas, from and to fractions of its size."""
    box = page.locator("#query-canvas").bounding_box()
    page.mouse.move(box["x"] + left * box["width"], box["y"] + top * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + right * box["width"], box["y"] + bottom * box["height"], steps=8)
    page.mouse.up()


def _search_and_wait(page) -> None:
    page.click("#search-button")
    page.wait_for_selector("#results[data-state=done]", timeout=60_000)
    # Every thumbnail loads, but escape.jpg's (a symlink out of the image root: refused, shown as unavailable).
    page.wait_for_function(
        "[...document.querySelectorAll('#results .hit')].every(h => h.dataset.path === 'escape.jpg' "
        "? h.classList.contains('unavailable') : h.querySelector('img').complete "
        "&& h.querySelector('img').naturalWidth > 0 && !h.classList.contains('loading'))"
    )


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("CAMRETRIEVAL_SCREENSHOTS")  # a folder: save the page as docs/web.md shows it
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))


def test_page_in_headless_chromium(browser, server, collection):
    _, images, _ = collection
    query = first_image(images, "horse2")
    page = _open_page(browser, server)
    page.set_input_files("#file-input", str(query))
    page.wait_for_function("!document.getElementById('search-button').disabled")
    # A box smaller than one feature cell: the query (256 px) is seen at 128 px, one cell per 32 px = 64 query px.
    _drag_box(page, 0.40, 0.40, 0.55, 0.60)
    assert page.inner_text("#box-info").startswith("Box: ")
    warning = page.locator("#box-warning")
    assert warning.is_visible() and "smaller than one feature cell (64 × 64 px" in warning.inner_text()
    _drag_box(page, 0.15, 0.2, 0.85, 0.8)
    assert page.inner_text("#box-info").startswith("Box: ") and not warning.is_visible()
    page.fill("#top", "6")
    page.check("#online")
    page.fill("#rerank", "4")
    # Thumbnails held back: each tile shows its animated placeholder until its image comes.
    held = []
    page.route("**/api/thumbnails/**", lambda route: held.append(route))
    page.click("#search-button")
    page.wait_for_selector("#results[data-state=done]", timeout=60_000)
    hits = page.locator("#results .hit")
    assert hits.count() == 6
    page.wait_for_function("document.querySelectorAll('#results .hit.loading').length === 6")
    animation = page.evaluate("getComputedStyle(document.querySelector('#results .hit .thumb')).animationName")
    assert animation == "placeholder-shimmer"
    for route in held:
        route.continue_()
    page.unroute("**/api/thumbnails/**")
    page.wait_for_function(
        "[...document.querySelectorAll('#results .hit')].every(h => h.dataset.path === 'escape.jpg' "
        "? h.classList.contains('unavailable') : h.querySelector('img').complete "
        "&& h.querySelector('img').naturalWidth > 0 && !h.classList.contains('loading'))"
    )
    scores = [float(s) for s in page.locator("#results .hit .score").all_inner_texts()]
    assert len(scores) == 6 and scores == sorted(scores, reverse=True) and all(-1 <= s <= 1.0001 for s in scores)
    assert page.locator("#results .hit .path").first.inner_text().startswith("horse2/")
    # The refinement the server applied, shown with the results.
    used = page.inner_text("#results-refinement")
    assert "online aggregation (OnA)" in used and "re-ranked the top 4" in used and "query expansion" not in used
    _screenshot(page, "web_search.png")

    # Export: the JSON is the API's answer to the same search; the CSV holds the same rows.
    with page.expect_download() as download:
        page.click("#export-json")
    assert download.value.suggested_filename == f"camretrieval-{query.stem}.json"
    exported = json.loads(Path(download.value.path()).read_text())
    [entry] = exported
    assert sorted(entry) == ["box", "query", "refinement", "results"] and entry["query"] == query.name
    assert entry["refinement"]["online"] is True and entry["refinement"]["rerank"] == 4
    status, answer = search(
        server,
        {"top": "6", "box": ",".join(map(str, entry["box"])), "online": "true", "rerank": "4", "qe": "0"},
        {"file": (query.name, query.read_bytes())},
    )
    assert status == 200 and [h["path"] for h in entry["results"]] == [h["path"] for h in answer[0]["results"]]
    assert [h["score"] for h in entry["results"]] == pytest.approx([h["score"] for h in answer[0]["results"]], abs=1e-6)
    assert [h["path"] for h in entry["results"]] == hits.evaluate_all("hs => hs.map(h => h.dataset.path)")
    with page.expect_download() as download:
        page.click("#export-csv")
    assert download.value.suggested_filename == f"camretrieval-{query.stem}.csv"
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text(), newline="")))
    assert rows[0] == ["query", "box", "rank", "path", "score"] and len(rows) == 7
    for rank, (row, hit) in enumerate(zip(rows[1:], entry["results"]), start=1):
        assert row[:4] == [query.name, " ".join(map(str, entry["box"])), str(rank), hit["path"]]
        assert float(row[4]) == hit["score"]

    hits.first.click()
    page.wait_for_selector("#explain[data-state=done]", timeout=60_000)
    page.wait_for_function(
        "['explain-query', 'explain-result'].every(id => document.getElementById(id).complete "
        "&& document.getElementById(id).naturalWidth > 0)"
    )
    assert page.locator("#explain-classes li").count() == 5
    assert "Region that matched" in page.inner_text("#explain-region")
    _screenshot(page, "web_explain.png")
    assert not page.errors, page.errors
    page.context.close()


def _transfer(page, files: list[tuple[str, bytes, str]], data: dict[str, str] | None = None):
    """A DataTransfer in the page holding these files (name, bytes, type) and these strings (type: value)."""
    encoded = [[name, base64.b64encode(content).decode(), kind] for name, content, kind in files]
    return page.evaluate_handle(
        """([files, data]) => {
            const transfer = new DataTransfer();
            for (const [name, encoded, type] of files) {
                const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, { type }));
            }
            for (const [type, value] of Object.entries(data)) transfer.setData(type, value);
            return transfer;
        }""",
        [encoded, data or {}],
    )


def _search_result_entry(page) -> dict:
    """The search the page last made, as its JSON export holds it."""
    with page.expect_download() as download:
        page.click("#export-json")
    return json.loads(Path(download.value.path()).read_text())[0]


def test_page_takes_a_dropped_or_pasted_query(browser, server, collection):
    _, images, _ = collection
    dropped = first_image(images, "cup2")
    page = _open_page(browser, server)
    transfer = _transfer(page, [(dropped.name, dropped.read_bytes(), "image/jpeg")])
    page.dispatch_event("#query-panel", "dragenter", {"dataTransfer": transfer})
    assert "drop-target" in page.get_attribute("#query-panel", "class")  # the panel shows where the file goes
    page.dispatch_event("#query-canvas", "drop", {"dataTransfer": transfer})
    assert "drop-target" not in (page.get_attribute("#query-panel", "class") or "")
    page.wait_for_function("!document.getElementById('search-button').disabled")
    assert page.inner_text("#status") == f"query: {dropped.name} (dropped)"
    page.fill("#top", "4")
    _search_and_wait(page)
    entry = _search_result_entry(page)
    status, answer = search(server, {"top": "4"}, {"file": (dropped.name, dropped.read_bytes())})
    assert entry["query"] == dropped.name
    assert [h["path"] for h in entry["results"]] == [h["path"] for h in answer[0]["results"]]
    assert entry["results"][0]["path"] == dropped.relative_to(images).as_posix()  # itself, first

    # Something that is no image is refused with a sentence, and the query stays.
    page.dispatch_event("#query-panel", "drop", {"dataTransfer": _transfer(page, [("notes.txt", b"hello", "text/plain")])})
    assert "notes.txt is not an image" in page.inner_text("#status")

    # Paste: a screenshot on the clipboard comes as "image.png"; it is searched as "pasted.png".
    pasted = first_image(images, "horse2")
    png = io.BytesIO()
    Image.open(pasted).save(png, "PNG")
    page.evaluate(
        """(transfer) => document.body.dispatchEvent(
            new ClipboardEvent("paste", { clipboardData: transfer, bubbles: true, cancelable: true }))""",
        _transfer(page, [("image.png", png.getvalue(), "image/png")]),
    )
    page.wait_for_function("document.getElementById('status').textContent === 'query: pasted.png (pasted)'")
    page.wait_for_function("!document.getElementById('search-button').disabled")
    _search_and_wait(page)
    entry = _search_result_entry(page)
    assert entry["query"] == "pasted.png" and entry["results"][0]["path"].startswith("horse2/")

    # A result's thumbnail dragged onto the query: that indexed image becomes the query, searched by its path.
    path = page.locator("#results .hit").nth(1).get_attribute("data-path")
    page.dispatch_event(
        "#query-panel", "drop", {"dataTransfer": _transfer(page, [], {"application/x-camretrieval-path": path})}
    )
    page.wait_for_function(f"document.getElementById('status').textContent === {json.dumps('query: ' + path)}")
    page.wait_for_function("!document.getElementById('search-button').disabled")
    _search_and_wait(page)
    assert _search_result_entry(page)["query"] == path
    assert not page.errors, page.errors
    page.context.close()


_OVERFLOW = "document.documentElement.scrollWidth <= innerWidth"
# Elements that stick out past the window's right edge (not counting those inside a box that scrolls sideways).
_OVERFLOWING = """[...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > innerWidth + 0.5
    && e.getClientRects().length && !e.closest('.table-wrap')).map((e) => e.tagName + '#' + e.id + '.' + e.className)"""


def test_page_fits_a_phone(browser, server, collection):
    """At a phone's width (360 px) nothing overflows sideways: the page, its results, an explanation, the API page."""
    _, images, _ = collection
    page = _open_page(browser, server, width=360, height=740)
    assert page.evaluate(_OVERFLOW) and page.evaluate(_OVERFLOWING) == []
    page.set_input_files("#file-input", str(first_image(images, "horse2")))
    page.wait_for_function("!document.getElementById('search-button').disabled")
    _drag_box(page, 0.45, 0.45, 0.55, 0.55)  # the small-box warning too
    assert page.locator("#box-warning").is_visible()
    page.check("#online")
    page.fill("#qe", "2")
    _search_and_wait(page)
    assert page.locator("#results .hit").count() == 13
    assert page.evaluate(_OVERFLOW), page.evaluate(_OVERFLOWING)
    assert page.evaluate(_OVERFLOWING) == []
    # The panels are one above the other, each the window's width.
    query_panel = page.locator("#query-panel").bounding_box()
    results_panel = page.locator("#results-panel").bounding_box()
    assert results_panel["y"] >= query_panel["y"] + query_panel["height"]
    assert query_panel["x"] + query_panel["width"] <= 360 and results_panel["x"] + results_panel["width"] <= 360
    _screenshot(page, "web_search_360.png")
    page.locator("#results .hit").first.click()
    page.wait_for_selector("#explain[data-state=done]", timeout=60_000)
    assert page.evaluate(_OVERFLOW) and page.evaluate(_OVERFLOWING) == []
    _screenshot(page, "web_explain_360.png")
    page.keyboard.press("Escape")
    page.goto(server + "/docs")
    page.wait_for_selector("body[data-state=done]")
    assert page.evaluate(_OVERFLOW) and page.evaluate(_OVERFLOWING) == []
    assert not page.errors, page.errors
    page.context.close()


def test_api_docs_page_renders_the_openapi_description_offline(browser, server):
    """/docs in a browser: every endpoint of /openapi.json with its parameters and responses, and not one request
    to anywhere but this server."""
    page = _open_page(browser, server, path="/docs")
    requested = []
    page.on("request", lambda r: requested.append(r.url))
    page.reload()
    page.wait_for_selector("body[data-state=done]")
    spec = json.loads(request("GET", server + "/openapi.json")[2])
    operations = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    shown = page.locator("#endpoints .op").evaluate_all("ops => ops.map(o => [o.dataset.method, o.dataset.path])")
    assert [tuple(op) for op in shown] == operations
    assert page.locator("#toc-list li").count() == len(operations)
    search_section = page.locator('#endpoints .op[data-path="/api/search"]')
    text = search_section.inner_text()
    for field in ("file", "path", "query_id", "box", "top", "online", "rerank", "qe", "qe_alpha", "multipart/form-data"):
        assert field in text, field
    assert "≥ 1; ≤ 1000; default 10" in text and "413" in text and "array of SearchResult" in text
    assert page.locator("#schema-SearchResult").count() == 1 and page.locator("#schema-Network").count() == 1
    assert "stride" in page.inner_text("#schema-Network")
    assert requested and all(url.startswith(server + "/") for url in requested), requested
    assert not page.errors, page.errors
    page.context.close()


# --- explain and eval --report ---


def test_explain_command_writes_the_picture(collection, tmp_path, capsys):
    _, images, _ = collection
    output = tmp_path / "out" / "why.png"
    code = main(
        ["explain", str(first_image(images, "cup2")), "--output", str(output), "--classes", "3", "--size", str(SIZE)]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"wrote {output}" and len(lines) == 4 and lines[0].lstrip().startswith("1.")
    figure = Image.open(output)
    assert figure.format == "PNG" and figure.width > 300 and figure.height > 300
    assert main(["explain", str(tmp_path / "missing.jpg")]) == 2
    assert "image not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def eval_report(collection, tmp_path_factory):
    """``camretrieval eval --report`` on the collection as a label-folder set (4 images of each of 3 objects), every
    query with a box: (its record from --json, the report's folder, the page, the boxes)."""
    _, images, _ = collection
    root = tmp_path_factory.mktemp("eval")
    labelled = root / "labelled"
    for obj in OBJECTS:
        shutil.copytree(images / obj, labelled / obj)
    boxes = {path.relative_to(labelled).as_posix(): [24, 40, 200, 216] for path in sorted(labelled.glob("*/*.jpg"))}
    (labelled / "boxes.json").write_text(json.dumps(boxes))
    report = root / "report"
    args = ["eval", "--images", str(labelled), "--size", str(SIZE), "--classes", "8", "--workers", "0", "--quiet"]
    output = io.StringIO()
    stdout, sys.stdout = sys.stdout, output
    try:
        code = main([*args, "--json", "--report", str(report)])
    finally:
        sys.stdout = stdout
    assert code == 0
    return json.loads(output.getvalue()), report, (report / "index.html").read_text(), boxes


def _examples(page: str) -> dict[int, tuple[str, list[tuple[str, str, float]]]]:
    """The report's examples: query number -> (its name, its results as (kind, path, score))."""
    examples = {}
    for block in page.split('<div class="example"')[1:]:
        q = int(re.match(r' id="example-(\d+)"', block).group(1))
        name = re.search(r"query \d+, (\S+) \(AP", block).group(1)
        results = [
            (kind, path, float(score))
            for kind, score, path in re.findall(
                r'<figure class="(pos|neg|junk)" data-index="\d+">.*?<span class="score">(-?[\d.]+)</span><br>([^<]+)'
                r"</figcaption>",
                block,
            )
        ]
        examples[q] = (name, results)
    return examples


def test_eval_report(eval_report):
    record, report, page, _ = eval_report
    assert "<svg" in page and "mean interpolated precision" in page and "Average precision per query" in page
    assert page.count('<tr id="query-') == 12  # every query's AP
    pictures = sorted(p.name for p in (report / "images").iterdir())
    assert any(p.endswith("_cam.jpg") for p in pictures) and sum(p.endswith("_r1.jpg") for p in pictures) == 6
    assert 'class="pos"' in page and ('class="neg"' in page or 'class="junk"' in page)
    # Metrics in words, not the record's keys.
    metrics = page.split('<table class="metrics">')[1].split("</table>")[0]
    names = re.findall(r"<td>([^<]+)</td><td class=\"num\">", metrics)
    assert names[:4] == [
        "mean average precision (mAP)",
        "mean precision at 1 (mP@1)",
        "mean precision at 5 (mP@5)",
        "mean precision at 10 (mP@10)",
    ]
    assert not {"map", "mp@1", "mp@5", "mp@10", "seconds_per_image"} & set(names)
    value = float(re.search(r"mean average precision \(mAP\)</td><td class=\"num\">([\d.]+)", metrics).group(1))
    assert value == pytest.approx(record["map"], abs=5e-5)
    # Self-contained: one inline script (the sorting), no file or URL from anywhere else.
    assert "<script>" in page and "<script src" not in page and "<link" not in page
    assert not re.findall(r'(?:src|href)="(?:https?:)?//', page)
    assert all(link.startswith("images/") for link in re.findall(r'src="([^"]+)"', page))


def test_eval_report_map_per_label(eval_report):
    record, _, page, _ = eval_report
    section = page.split('<h2 id="labels">')[1].split("</table>")[0]
    rows = re.findall(r'<tr><td>(\w+)</td><td class="num" data-value="(\d+)">\d+</td><td class="num" data-value="([\d.]+)"', section)
    assert [label for label, _, _ in rows] == sorted(OBJECTS)
    for label, count, label_map in rows:
        aps = [ap for name, ap in zip(record["query_names"], record["aps"]) if name.startswith(label + "/")]
        assert int(count) == len(aps) == 4
        assert float(label_map) == pytest.approx(np.mean(aps), abs=1e-6)


def test_eval_report_per_query_table_links_to_the_examples(eval_report):
    record, report, page, _ = eval_report
    table = page.split('<h2 id="queries">')[1]
    assert '<table class="sortable">' in table and 'data-sort="number"' in table
    examples = _examples(page)
    assert len(examples) == 6
    # Each example's row links to it, and it links back to its row.
    for q in examples:
        assert f'<tr id="query-{q}">' in table and table.count(f'href="#example-{q}"') == 2
        assert f'href="#query-{q}"' in page
    linked = {int(q) for q in re.findall(r'href="#example-(\d+)"', table)}
    assert linked == set(examples)


def test_eval_report_table_sorts_in_a_browser(eval_report, browser):
    """The inline script sorts the per-query table: by AP ascending, then descending, then by name; and the report
    fits a phone's width."""
    record, report, _, _ = eval_report
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    view = context.new_page()
    errors = []
    view.on("pageerror", lambda error: errors.append(str(error)))
    view.goto((report / "index.html").as_uri())
    rows = view.locator("#queries ~ .table-wrap tbody tr")
    heading = view.locator("#queries ~ .table-wrap th", has_text="AP").locator("button")
    heading.click()
    order = [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.cells[0].textContent)")]
    aps = record["aps"]
    assert order == sorted(range(len(aps)), key=lambda q: (aps[q], q))
    heading.click()
    order = [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.cells[0].textContent)")]
    assert [aps[q] for q in order] == sorted(aps, reverse=True)
    view.locator("#queries ~ .table-wrap th", has_text="query").locator("button").click()
    names = rows.evaluate_all("rs => rs.map(r => r.cells[1].textContent)")
    assert names == sorted(record["query_names"])
    view.set_viewport_size({"width": 360, "height": 740})
    assert view.evaluate(_OVERFLOW) and view.evaluate(_OVERFLOWING) == []
    assert not errors, errors
    context.close()


def test_eval_report_examples_show_scores_and_leave_the_query_out(eval_report):
    record, _, page, _ = eval_report
    for q, (name, results) in _examples(page).items():
        assert name == record["query_names"][q]
        assert len(results) == 8  # REPORT_TOP, from the 11 other images
        paths = [path for _, path, _ in results]
        assert f"{name}.jpg" not in paths and len(set(paths)) == 8
        scores = [score for _, _, score in results]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
        # The label-folder protocol: the query's own label is positive, the others negative; no junk is left.
        label = name.split("/")[0]
        assert all((kind == "pos") == (path.split("/")[0] == label) for kind, path, _ in results)


def test_eval_report_box_is_outlined_dark_and_bright(eval_report):
    _, report, page, boxes = eval_report
    q = min(_examples(page))
    for suffix in ("query", "cam"):
        picture = np.asarray(Image.open(report / "images" / f"q{q}_{suffix}.jpg").convert("L"), dtype=np.int32)
        scale = picture.shape[1] / 256  # the ETH-80 views are 256 x 256
        x1, y1, x2, y2 = (round(v * scale) for v in next(iter(boxes.values())))
        for edge in (y1, y2):  # across the top and the bottom edge: dark, bright, dark, whatever lies around
            for x in range((x1 + x2) // 2 - 10, (x1 + x2) // 2 + 10):
                profile = "".join(
                    "d" if v < 60 else "b" if v > 200 else "-" for v in picture[edge - 6 : edge + 7, x]
                )
                assert re.search("dd+bbb+dd", profile), (suffix, edge, x, profile)


def test_box_outline_shows_on_white_and_on_black():
    for background in ((255, 255, 255), (0, 0, 0)):
        picture = Image.new("RGB", (60, 60), background)
        draw_outlined_box(picture, (10, 10, 50, 50))
        row = [picture.getpixel((30, y))[0] for y in range(4, 17)]
        # Dark, bright, dark across the top edge (y = 10): whatever the background, one of them stands out.
        assert row[3:5] == [0, 0] and row[5:8] == [255, 255, 255] and row[8:10] == [0, 0], row


def test_metric_names_are_words():
    assert metric_name("map") == "mean average precision (mAP)"
    assert metric_name("mp@1") == "mean precision at 1 (mP@1)"
    assert metric_name("map_hard") == "mean average precision, Hard setup (mAP Hard)"
    assert metric_name("mp@10_easy") == "mean precision at 10, Easy setup (mP@10 Easy)"
    assert metric_name("ns_score").startswith("N-S score")
    assert metric_name("seconds_per_image").startswith("seconds per image")
    assert metric_name("some_new_metric") == "some new metric"


def test_precision_recall_helpers():
    precision, recall = precision_recall(np.array([5, 1, 7, 2, 3]), positives={5, 2}, junk={1})
    assert precision.tolist() == [1.0, 2 / 3] and recall.tolist() == [0.5, 1.0]
    mean = mean_interpolated_precision([(precision, recall)], levels=3)
    assert mean.tolist() == pytest.approx([1.0, 1.0, 2 / 3])
