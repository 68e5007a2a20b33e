"""``camretrieval serve`` over real HTTP (a real server process), its security limits, the page in a real headless
browser, ``camretrieval explain`` and ``camretrieval eval --report``. Small images (size 128), a dozen of them."""

from __future__ import annotations

import http.client
import io
import json
import os
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
from camretrieval.evaluation.metrics import mean_interpolated_precision, precision_recall
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
    assert [sorted(entry) for entry in by_path] == [["box", "query", "query_id", "results", "seconds"]]
    assert by_path[0]["query"] == relative and by_path[0]["query_id"] is None
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


def test_page_in_headless_chromium(chromium, server, collection):
    sync_api, executable = chromium
    _, images, _ = collection
    screenshots = os.environ.get("CAMRETRIEVAL_SCREENSHOTS")  # a folder: save the page as docs/web.md shows it
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
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
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('index-info').textContent.includes('13 images')")
            page.set_input_files("#file-input", str(first_image(images, "horse2")))
            page.wait_for_function("!document.getElementById('search-button').disabled")
            box = page.locator("#query-canvas").bounding_box()
            page.mouse.move(box["x"] + 0.15 * box["width"], box["y"] + 0.2 * box["height"])
            page.mouse.down()
            page.mouse.move(box["x"] + 0.85 * box["width"], box["y"] + 0.8 * box["height"], steps=8)
            page.mouse.up()
            assert page.inner_text("#box-info").startswith("Box: ")
            page.fill("#top", "6")
            page.click("#search-button")
            page.wait_for_selector("#results[data-state=done]", timeout=60_000)
            hits = page.locator("#results .hit")
            assert hits.count() == 6
            # Every thumbnail loads, but escape.jpg's (a symlink out of the image root: refused, shown as unavailable).
            page.wait_for_function(
                "[...document.querySelectorAll('#results .hit')].every(h => h.dataset.path === 'escape.jpg' "
                "? h.classList.contains('unavailable') : h.querySelector('img').complete "
                "&& h.querySelector('img').naturalWidth > 0)"
            )
            scores = [float(s) for s in page.locator("#results .hit .score").all_inner_texts()]
            assert (
                len(scores) == 6 and scores == sorted(scores, reverse=True) and all(-1 <= s <= 1.0001 for s in scores)
            )
            assert page.locator("#results .hit .path").first.inner_text().startswith("horse2/")
            if screenshots:
                Path(screenshots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(screenshots) / "web_search.png"))
            hits.first.click()
            page.wait_for_selector("#explain[data-state=done]", timeout=60_000)
            page.wait_for_function(
                "['explain-query', 'explain-result'].every(id => document.getElementById(id).complete "
                "&& document.getElementById(id).naturalWidth > 0)"
            )
            assert page.locator("#explain-classes li").count() == 5
            assert "Region that matched" in page.inner_text("#explain-region")
            if screenshots:
                page.screenshot(path=str(Path(screenshots) / "web_explain.png"))
            assert not errors, errors
        finally:
            browser.close()


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


def test_eval_report(collection, tmp_path):
    _, images, _ = collection
    labelled = tmp_path / "labelled"
    for obj in OBJECTS:
        shutil.copytree(images / obj, labelled / obj)
    report = tmp_path / "report"
    code = main(
        [
            "eval",
            "--images",
            str(labelled),
            "--size",
            str(SIZE),
            "--classes",
            "8",
            "--workers",
            "0",
            "--quiet",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    page = (report / "index.html").read_text()
    assert "<svg" in page and "mean interpolated precision" in page and "Average precision per query" in page
    assert page.count("<tr><td>") >= 12 + 4  # every query's AP, and the metrics
    pictures = sorted(p.name for p in (report / "images").iterdir())
    assert any(p.endswith("_cam.jpg") for p in pictures) and sum(p.endswith("_r1.jpg") for p in pictures) == 6
    assert 'class="pos"' in page and ('class="neg"' in page or 'class="junk"' in page)


def test_precision_recall_helpers():
    precision, recall = precision_recall(np.array([5, 1, 7, 2, 3]), positives={5, 2}, junk={1})
    assert precision.tolist() == [1.0, 2 / 3] and recall.tolist() == [0.5, 1.0]
    mean = mean_interpolated_precision([(precision, recall)], levels=3)
    assert mean.tolist() == pytest.approx([1.0, 1.0, 2 / 3])
