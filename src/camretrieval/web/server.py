"""``camretrieval serve``: the web page and its JSON API (FastAPI + uvicorn): :func:`create_app`, :func:`serve`.
docs/web.md documents it. The explanations it serves come from :mod:`camretrieval.explain`.

Security of the server (docs/web.md): it binds 127.0.0.1 unless told otherwise, and on a loopback address answers
only requests whose Host is a loopback name (DNS rebinding); a POST from another site (its ``Origin`` or
``Sec-Fetch-Site``) is refused with 403; it serves only the indexed images (a path must be in the index's list,
exactly, free of ``..`` and absolute parts, and must resolve, symlinks followed, to a file under the index's image
root); request bodies over :data:`~camretrieval.web.files.MAX_UPLOAD_BYTES` are refused with 413 before they are
parsed; uploads are decoded only when their header says at most :data:`~camretrieval.web.files.MAX_UPLOAD_PIXELS`
pixels and :data:`~camretrieval.web.files.MAX_DECODED_BYTES` decoded, at most
:data:`~camretrieval.web.files.DECODE_SLOTS` at once, in bounded memory; uploads are kept in a temporary folder of
the server's own, removed when it stops; every error is a JSON ``{"detail": ...}`` that names images relative to
the index's root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlencode, urlsplit

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from camretrieval.constants import DEFAULT_QE_GATE
from camretrieval.errors import CamRetrievalError
from camretrieval.explain import class_names, explain_match, query_overlay, result_overlay
from camretrieval.method.regions import Box, BoxError, parse_box
from camretrieval.search.index import Index
from camretrieval.search.refinement import SearchOptions
from camretrieval.web.files import (
    MAX_DECODED_BYTES,
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    THUMBNAIL_SIZES,
    BytesLRU,
    DecodePool,
    IndexedImages,
    RequestError,
    UploadStore,
    decode_upload,
    error_reason,
    png_bytes,
    thumbnail_bytes,
)

STATIC_DIR = Path(__file__).with_name("static")
_BODY_LIMIT = MAX_UPLOAD_BYTES + 256 * 1024  # the file plus the form's other fields and boundaries
_DRAIN_LIMIT = 8 * MAX_UPLOAD_BYTES  # a declared body up to this is read and dropped before the 413 (see below)


class Hit(BaseModel):
    path: str = Field(description="relative to the indexed folder, as in `camretrieval search --json`")
    score: float = Field(description="cosine similarity (or the refined score with re-ranking)")


class RefinementUsed(BaseModel):
    refine: bool = Field(False, description="the measured best refinement (`search --refine`) was applied")
    online: bool = Field(description="online aggregation (OnA) was applied")
    online_classes: int | None = Field(None, description="N_c of online aggregation (None: the index's)")
    online_whitening: bool = Field(True, description="online aggregation with the PCA-whitening")
    rerank: int = Field(description="the top R re-ranked with CAM regions (0: none; clipped to the index's size)")
    rerank_classes: int = Field(description="N_re: the query's classes that describe each region when re-ranking")
    qe: int = Field(description="query expansion with the top K (0: none; clipped to the index's size)")
    qe_alpha: float = Field(description="alpha-QE power (0: average QE)")
    qe_gate: int = Field(0, description="k of the reciprocal gate on the K results (0: none)")


class SearchResult(BaseModel):
    query: str = Field(description="the indexed path, or the uploaded file's name")
    results: list[Hit]
    query_id: str | None = Field(None, description="an upload's id, for /api/explain (the server keeps the last 32)")
    box: list[float] | None = None
    refinement: RefinementUsed = Field(description="the query-time refinement this search applied")
    seconds: float = Field(description="time the search took on the server")


class ClassInfo(BaseModel):
    index: int
    name: str
    probability: float


class ExplainQuery(BaseModel):
    box: list[float] | None
    size: list[int]
    classes: list[ClassInfo]
    heatmap_classes: list[ClassInfo]


class ExplainResult(BaseModel):
    path: str
    size: list[int]
    score: float = Field(description="the plain (OfA) cosine similarity of the query and this image")
    region: list[float] = Field(description="the region that matched: x1, y1, x2, y2 in the result's pixels")
    region_score: float
    region_is_whole_image: bool
    proposals: list[list[float]]


class Explain(BaseModel):
    query: ExplainQuery
    result: ExplainResult
    overlays: dict[str, str] = Field(description="URLs of the PNG overlays: query and result")


class ImageList(BaseModel):
    total: int = Field(description="indexed images matching the filter")
    offset: int
    paths: list[str]


class Network(BaseModel):
    input_size: int = Field(description="the network sees a query resized so that its shorter side is this many px")
    stride: int = Field(
        description="one feature cell (of the CAM layer) covers stride x stride px of that input: a query box "
        "smaller than one cell is described by the whole cell"
    )


class Info(BaseModel):
    count: int = Field(description="indexed images")
    settings: dict[str, Any] = Field(description="how the index describes images: backbone, layers, size, pooling...")
    refinement: dict[str, bool] = Field(description="which search options this index supports")
    limits: dict[str, int] = Field(
        description="upload_bytes, upload_pixels, decoded_bytes (pixels x bytes per pixel) and the largest top"
    )
    network: Network = Field(description="what a query box is mapped onto: the network's input size and its cells")


class Error(BaseModel):
    detail: str


_ERRORS = {status: {"model": Error} for status in (400, 403, 404, 413, 415, 503)}
_FS_ENCODING = sys.getfilesystemencoding()  # how the index's names (os.fsdecode) map to bytes, and back


class _JSON(JSONResponse):
    """JSON as Starlette writes it, except that a string holding surrogate escapes (a file name that is not UTF-8,
    as ``os.fsdecode`` gives it) is written as ``\\udcXX`` escapes, which ``JSON.parse`` and ``json.loads`` give
    back as they were, where Starlette's UTF-8 encoding would fail."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class _AnyName(Convertor[str]):
    """``{path:indexed}``: Starlette's ``path`` convertor (``.*``) stops at a newline, which a file name may hold."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("indexed", _AnyName())


def _indexed_path(request: Request, prefix: str, decoded: str) -> str:
    """The indexed path a request for ``prefix + path`` names, from the request's raw bytes: the server decodes
    percent-escapes as UTF-8 and replaces what is not UTF-8, where a file name is any bytes (``os.fsdecode``
    maps them to the strings the index holds). ``decoded``: the path as Starlette decoded it, when the server
    gives no raw path."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return decoded
    whole = unquote_to_bytes(raw.split(b"?", 1)[0]).decode(_FS_ENCODING, "surrogateescape")
    return whole[len(prefix) :] if whole.startswith(prefix) else decoded


def _exact_query(request: Request, given: dict[str, str | None]) -> dict[str, str | None]:
    """``given`` query parameters as the client sent their bytes (the names of images that are not UTF-8 survive;
    Starlette replaces those bytes)."""
    raw = request.scope.get("query_string")
    if not isinstance(raw, bytes):
        return given
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding=_FS_ENCODING, errors="surrogateescape")
    exact = dict(pairs)
    return {name: exact.get(name, value) if value is not None else None for name, value in given.items()}


class _TooLarge(StarletteHTTPException):
    """Raised while the body is read: an HTTP exception, so that FastAPI's form parsing passes it on as it is
    (it turns any other exception into a 400) and the app answers 413."""

    def __init__(self) -> None:
        super().__init__(413, f"the request is larger than the upload limit of {MAX_UPLOAD_BYTES // 2**20} MB")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 before the app parses it (Starlette's
    multipart parser would spool it to disk first). A declared body (Content-Length) up to ``drain`` bytes is read
    and dropped first, so that a client still sending sees the 413 and not a reset connection; a larger one is
    answered at once and the connection closed."""

    def __init__(self, app, limit: int = _BODY_LIMIT, drain: int = _DRAIN_LIMIT) -> None:
        self.app, self.limit, self.drain = app, limit, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.drain:
                while (await receive()).get("more_body", False):
                    pass
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": _TooLarge().detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _split_host(header: str) -> tuple[str, str] | None:
    """(name, port) of a Host header or an origin's host (``[::1]:8000`` -> ``("::1", "8000")``; the port ``""``
    when there is none), lower case, or None when it is malformed."""
    header = header.strip().lower()
    if header.startswith("["):  # an IPv6 literal, bracketed as RFC 3986 writes it
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[1:end], header[end + 1 :]
    elif header.count(":") > 1:  # a bare IPv6 address, with no port
        name, rest = header, ""
    else:
        name, colon, port = header.partition(":")
        rest = colon + port
    if rest and not re.fullmatch(r":[0-9]{1,5}", rest):
        return None
    return name, rest[1:]


def is_loopback_name(name: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _answer(scope, receive, send, status: int, body: bytes, content_type: bytes) -> None:
    """Answer a request the app never sees; a declared body up to :data:`_DRAIN_LIMIT` is read and dropped first
    (a client still sending then gets the answer, not a reset connection), and the connection is closed."""
    declared = _header(scope, b"content-length") or ""
    if scope["type"] == "http" and (not declared or (declared.isdigit() and int(declared) <= _DRAIN_LIMIT)):
        received = 0
        while received <= _DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HostCheck:
    """ASGI middleware: answer only requests whose Host header names a loopback address (``localhost``,
    127.0.0.0/8, ``[::1]``, with or without a port), or one of ``allowed`` names; any other is refused (400,
    "Invalid host header", as Starlette's TrustedHostMiddleware says it). On loopback this is what keeps a web page
    elsewhere from reaching the server through a name of its own that resolves to 127.0.0.1 (DNS rebinding).
    Unlike Starlette's check, which cuts the header at its first colon, IPv6 literals are read as such."""

    def __init__(self, app, allowed: Sequence[str] = (), loopback: bool = True) -> None:
        self.app, self.loopback = app, loopback
        self.allowed = {name.strip("[]").lower() for name in allowed}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan (the app serves no websocket)
            await self.app(scope, receive, send)
            return
        host = _split_host(_header(scope, b"host") or "")
        if host is not None and ((self.loopback and is_loopback_name(host[0])) or host[0] in self.allowed):
            await self.app(scope, receive, send)
            return
        await _answer(scope, receive, send, 400, b"Invalid host header", b"text/plain; charset=utf-8")


_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def _origin_of(scheme: str, host: str) -> tuple[str, str] | None:
    """(name, port) of a host as seen from ``scheme``, the port made explicit."""
    split = _split_host(host)
    if split is None or not split[0]:
        return None
    return split[0], split[1] or _DEFAULT_PORTS.get(scheme, "")


class SameOriginOnly:
    """ASGI middleware: a request that changes something or uploads (any method but GET, HEAD and OPTIONS) from a
    page of another site is refused with 403 before it is read: one whose ``Sec-Fetch-Site`` is ``cross-site`` or
    ``same-site`` (another origin), or whose ``Origin`` is not this server's (the scheme, name and port its Host
    header names; ``null`` included). Requests with neither header (curl, scripts) and the page's own are served.
    A browser sends both with every POST, so no page elsewhere can make a visitor's browser search here."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method", "GET").upper() in _SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        reason = None
        fetch_site = (_header(scope, b"sec-fetch-site") or "").strip().lower()
        origin = _header(scope, b"origin")
        if fetch_site in ("cross-site", "same-site"):
            reason = f"a {fetch_site} request"
        elif origin is not None:
            parts = urlsplit(origin.strip().lower())
            own = _origin_of(scope.get("scheme", "http"), _header(scope, b"host") or "")
            theirs = _origin_of(parts.scheme, parts.netloc) if parts.scheme in _DEFAULT_PORTS else None
            if theirs is None or own is None or theirs != own:
                reason = f"a request from another origin ({origin.strip()[:100]})"
        if reason is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": f"{reason} is refused: search from this server's own page, or without a browser"})
        await _answer(scope, receive, send, 403, body.encode(), b"application/json")


class WebState:
    """What the server holds: the index and its model (loaded once, at start), the caches, the uploads folder, and
    the pools of threads that bound how many images are decoded at once (searches and explanations, thumbnails)."""

    def __init__(self, index_dir: str | Path, device: str = "cpu", upload_dir: Path | None = None) -> None:
        self.index = Index.open(index_dir, device=device)
        if self.index.image_root is None or not Path(self.index.image_root).is_dir():
            raise CamRetrievalError(
                f"the images of {index_dir} are not where they were indexed ({self.index.image_root}): the server "
                "shows them, so they must be there"
            )
        self.images = IndexedImages(Path(self.index.image_root), self.index.paths)
        self.describer = self.index.describer  # loads the backbone now, once, not on the first request
        class_names()
        self.model_lock = threading.Lock()  # one forward pass at a time: the CPU is busy enough with one
        self.explain_lock = threading.Lock()  # one explanation at a time, from its decoding to its drawings
        # Every search and explanation runs in `work` (DECODE_SLOTS threads): an upload is read, decoded, searched
        # and dropped there, so that at most DECODE_SLOTS full-size images are in memory however many requests come
        # at once; thumbnails are made in a pool of their own.
        self.work = DecodePool(name="search")
        self.thumbnailing = DecodePool(name="thumbnail")
        self.thumbnails = BytesLRU(96 * 2**20)
        self.overlays = BytesLRU(64 * 2**20)
        # The last 32 explanations, as their JSON record and score: not the Explanation, which holds both images
        # at full size (its overlays go to self.overlays as soon as it is made).
        self.explanations: OrderedDict[tuple, tuple[dict[str, Any], float]] = OrderedDict()
        self.cache_lock = threading.Lock()
        self.upload_dir = upload_dir or Path(tempfile.mkdtemp(prefix="camretrieval-serve-"))
        self.uploads = UploadStore(self.upload_dir)

    def close(self) -> None:
        self.work.close()
        self.thumbnailing.close()
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    @property
    def refinement(self) -> dict[str, bool]:
        has_maps = getattr(self.index, "maps", None) is not None and self.describer.pooling == "cam"
        return {"online": has_maps, "rerank": has_maps, "qe": True}

    def explanation(
        self, path: str | None, query_id: str | None, box: Box | None, result: str, fresh: bool = False
    ) -> tuple[dict[str, Any], float, dict[str, bytes] | None]:
        """The explanation of (query, box, result) as its JSON record and the plain score, cached; with its two
        overlay PNGs when it was made now (``fresh``: made now even when cached, for overlays no longer kept)."""
        if (path is None) == (query_id is None):
            raise RequestError(400, "give the query as an indexed path or an upload's query_id (one of them)")
        key = (path, query_id, box, result)
        if not fresh:
            with self.cache_lock:
                cached = self.explanations.get(key)
                if cached is not None:
                    self.explanations.move_to_end(key)
                    return cached[0], cached[1], None
        result_path = self.images.resolve(result)
        query_path = self.images.resolve(path) if path is not None else None

        def work() -> tuple[dict[str, Any], Any, dict[str, bytes]]:
            """Decode (an upload), explain, draw: in the pool, the full-size images dropped when done. One
            explanation at a time: it holds several full-size copies of both images (about 600 MB for an upload
            of 40 megapixels)."""
            with self.explain_lock:
                query = query_path if query_path is not None else decode_upload(self.uploads.get(query_id or "")[0])
                with self.model_lock:
                    explanation = explain_match(self.describer, query, result_path, box)
                    q = self.describer.describe([query], [box])[0]
                overlays = {"query": query_overlay(explanation), "result": result_overlay(explanation)}
                return explanation.to_dict(), q, {side: png_bytes(picture) for side, picture in overlays.items()}

        record, q, overlays = self.work.run(work)
        score = float(self.index.descriptors[self.images.positions[result]] @ q)
        for side, data in overlays.items():
            self.overlays.put(key + (side,), data)
        with self.cache_lock:
            self.explanations[key] = (record, score)
            while len(self.explanations) > 32:
                self.explanations.popitem(last=False)
        return record, score, overlays


def _parse_box(text: str | None) -> Box | None:
    if text is None or not text.strip():
        return None
    box = parse_box(text)
    if not all(math.isfinite(v) for v in box):
        raise BoxError(f"box {text!r} has a non-finite coordinate")
    return box


def create_app(
    index_dir: str | Path,
    device: str = "cpu",
    allowed_hosts: Sequence[str] | None = None,
    loopback_only: bool = False,
) -> FastAPI:
    """The web page and its JSON API over the index at ``index_dir`` (opened, and its model loaded, now).
    ``loopback_only``: answer only requests whose Host header is a loopback name (localhost, 127.0.0.0/8, [::1],
    with or without a port) or one of ``allowed_hosts`` (None and not ``loopback_only``: any). :func:`serve` sets
    it when it listens on a loopback address, so that a web page elsewhere cannot reach the server under a name of
    its own (DNS rebinding). A POST from a page of another site is refused (403) in any case."""
    state = WebState(index_dir, device)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()  # the uploads folder goes with the server

    app = FastAPI(
        title="camretrieval",
        version="0.1.0",
        description="Visual instance search with class-weighted CAM features: search an index with an uploaded or "
        "indexed image (optionally a box around the object) and see why each result matched.",
        # FastAPI's Swagger UI and ReDoc load their scripts from a CDN (a blank page offline): /docs is a page of
        # our own instead (static/api.html), which renders /openapi.json with no asset from another host.
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        lifespan=lifespan,
        default_response_class=_JSON,
    )
    app.state.web = state
    app.add_middleware(BodyLimit)
    app.add_middleware(SameOriginOnly)
    if loopback_only or allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=list(allowed_hosts or ()), loopback=loopback_only)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return _JSON({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(CamRetrievalError)
    async def user_error(request: Request, error: CamRetrievalError) -> JSONResponse:
        return _JSON({"detail": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log (uvicorn prints it), never to the client.
        return JSONResponse({"detail": "internal error (see the server's log)"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def api_docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "api.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", response_model=Info, summary="The index: size, settings, supported options, limits")
    def info() -> dict[str, Any]:
        settings = {k: v for k, v in state.index.settings.items() if k != "weights"}
        return {
            "count": len(state.index),
            "settings": settings,
            "refinement": state.refinement,
            "limits": {
                "upload_bytes": MAX_UPLOAD_BYTES,
                "upload_pixels": MAX_UPLOAD_PIXELS,
                "decoded_bytes": MAX_DECODED_BYTES,
                "top": 1000,
            },
            "network": {"input_size": state.describer.size, "stride": state.describer.backbone.stride},
        }

    @app.get("/api/images", response_model=ImageList, summary="List the indexed images (paged, filtered)")
    def list_images(
        q: str = Query("", description="keep the paths containing this text (case-insensitive)", max_length=200),
        offset: int = Query(0, ge=0),
        limit: int = Query(60, ge=1, le=500),
    ) -> dict[str, Any]:
        paths = state.images.paths
        if q:
            needle = q.lower()
            paths = [p for p in paths if needle in p.lower()]
        return {"total": len(paths), "offset": offset, "paths": paths[offset : offset + limit]}

    @app.get(
        "/api/images/{path:indexed}",
        summary="An indexed image, as stored",
        description="`path` as the results name it, each byte of the file name percent-encoded as needed (a name "
        "that is not UTF-8 is sent as its own bytes: the JSON answers write them as `\\udcXX` escapes).",
        responses=_ERRORS | {200: {"content": {"image/*": {}}, "description": "the image file, as indexed"}},
        response_class=FileResponse,
    )
    def image(request: Request, path: str) -> FileResponse:
        file = state.images.resolve(_indexed_path(request, "/api/images/", path))
        return FileResponse(file, headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/api/thumbnails/{path:indexed}",
        summary="A JPEG thumbnail of an indexed image",
        responses=_ERRORS | {200: {"content": {"image/jpeg": {}}, "description": "the thumbnail"}},
        response_class=Response,
    )
    def thumbnail(
        request: Request, path: str, size: int = Query(256, description=f"longer side: one of {THUMBNAIL_SIZES}")
    ) -> Response:
        if size not in THUMBNAIL_SIZES:
            raise RequestError(400, f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        relative = _indexed_path(request, "/api/thumbnails/", path)
        file = state.images.resolve(relative)
        data = state.thumbnails.get((relative, size))
        if data is None:
            try:
                data = state.thumbnailing.run(thumbnail_bytes, file, size)
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
                # Named relative to the root: Pillow's own message may hold the file's absolute path.
                raise RequestError(
                    404, f"the indexed image {relative!r} cannot be read any more ({error_reason(error)})"
                ) from error
            state.thumbnails.put((relative, size), data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post(
        "/api/search",
        response_model=list[SearchResult],
        responses=_ERRORS,
        summary="Search with an uploaded image or an indexed one (the result of `camretrieval search --json`)",
    )
    def search(
        file: UploadFile | None = File(
            None,
            description="the query image: JPEG, PNG, WebP, BMP or TIFF, at most 20 MB, 40 megapixels and 120 MB "
            "decoded (pixels x bytes per pixel)",
        ),
        path: str | None = Form(None, description="or an indexed image's path (as in the results)"),
        query_id: str | None = Form(None, description="or an earlier upload's query_id"),
        box: str | None = Form(None, description="x1,y1,x2,y2 around the object, in the query's pixels"),
        top: int = Form(10, ge=1, le=1000),
        refine: bool = Form(
            False, description="the measured best refinement for box queries, as `search --refine` (needs an index "
            "with maps; not with online, rerank or qe)",
        ),
        online: bool = Form(False, description="online aggregation (needs an index with maps)"),
        rerank: int = Form(0, ge=0, description="re-rank the top R with CAM regions (needs an index with maps)"),
        qe: int = Form(0, ge=0, description="query expansion with the top K"),
        qe_alpha: float = Form(0.0, ge=0, description="alpha-QE power (0: average QE)"),
        qe_gate: int | None = Form(
            None, ge=0, description=f"with qe: expand only with the k-reciprocal neighbours among the top K (default "
            f"{DEFAULT_QE_GATE}; 0: all K)",
        ),
    ) -> list[dict[str, Any]]:
        if file is not None and (path is not None or query_id is not None):
            raise RequestError(400, "give either an uploaded file, an indexed path or a query_id, not several")
        if file is None and (path is None) == (query_id is None):
            raise RequestError(
                400, "give the query as an uploaded file, an indexed path, or an upload's query_id (one of them)"
            )
        parsed_box = _parse_box(box)
        if refine and (online or rerank or qe):
            raise RequestError(400, "refine is a complete refinement: give it alone, or online, rerank and qe instead")
        if not qe and (qe_alpha or qe_gate is not None):
            raise RequestError(400, "qe_alpha and qe_gate go with query expansion: give qe=K (K > 0) too")
        options = SearchOptions.refine() if refine else SearchOptions(
            online=online, rerank=rerank, qe=qe, qe_alpha=qe_alpha, qe_gate=qe_gate
        )

        indexed = state.images.resolve(path) if path is not None else None

        def work() -> tuple[str, str | None, list, float]:
            """Read, decode, search: in the server's pool (see WebState), the image dropped when done."""
            upload_id = None
            if indexed is not None:
                name, query = path, indexed
            elif file is not None:
                data = file.file.read(MAX_UPLOAD_BYTES + 1)
                name = PurePosixPath((file.filename or "upload").replace("\\", "/")).name[:200] or "upload"
                query = decode_upload(data)
                upload_id = state.uploads.add(data, name)
            else:
                data, name = state.uploads.get(query_id)  # type: ignore[arg-type]
                query = decode_upload(data)
                upload_id = query_id
            started = time.perf_counter()
            with state.model_lock:
                hits = state.index.search([query], [parsed_box], top, options)[0]
            return name, upload_id, hits, time.perf_counter() - started  # type: ignore[return-value]

        name, upload_id, hits, seconds = state.work.run(work)
        count = len(state.index)
        used = {
            "refine": refine,
            "online": options.online,
            "online_classes": options.online_classes,
            "online_whitening": options.online_whitening,
            "rerank": min(options.rerank, count),
            "rerank_classes": options.rerank_classes,
            "qe": min(options.qe, count),
            "qe_alpha": options.qe_alpha,
            "qe_gate": options.qe_gate_or_default,
        }
        return [
            {
                "query": name,
                "results": [{"path": hit.path, "score": hit.score} for hit in hits],
                "query_id": upload_id,
                "box": list(parsed_box) if parsed_box is not None else None,
                "refinement": used,
                "seconds": seconds,
            }
        ]

    @app.get(
        "/api/explain",
        response_model=Explain,
        responses=_ERRORS,
        summary="Why a result matched: the query's top classes, the region that matched, overlay URLs",
    )
    def explain(
        request: Request,
        result: str = Query(description="the result's indexed path"),
        path: str | None = Query(None, description="the query as an indexed path"),
        query_id: str | None = Query(None, description="or as an upload's query_id"),
        box: str | None = Query(None, description="the query's box x1,y1,x2,y2, as searched"),
    ) -> dict[str, Any]:
        params = _exact_query(request, {"result": result, "path": path, "query_id": query_id, "box": box})
        result = params["result"] or result
        record, score, _ = state.explanation(params["path"], query_id, _parse_box(box), result)
        record = {**record, "result": {**record["result"], "path": result, "score": score}}
        given = {k: v for k, v in params.items() if v}
        record["overlays"] = {
            side: "/api/explain/overlay?"
            + urlencode(given | {"side": side}, encoding=_FS_ENCODING, errors="surrogateescape")
            for side in ("query", "result")
        }
        return record

    @app.get(
        "/api/explain/overlay",
        responses=_ERRORS | {200: {"content": {"image/png": {}}}},
        response_class=Response,
        summary="A CAM heatmap overlay as PNG: the query (box in white) or the result (matched region in green)",
    )
    def explain_overlay(
        request: Request,
        result: str = Query(description="the result's indexed path"),
        side: str = Query("result", pattern="^(query|result)$"),
        path: str | None = Query(None),
        query_id: str | None = Query(None),
        box: str | None = Query(None),
    ) -> Response:
        params = _exact_query(request, {"result": result, "path": path})
        path, result, parsed_box = params["path"], params["result"] or result, _parse_box(box)
        data = state.overlays.get((path, query_id, parsed_box, result, side))
        if data is None:
            _, _, overlays = state.explanation(path, query_id, parsed_box, result)
            if overlays is None:  # the explanation is cached, its overlays no longer: make it again
                _, _, overlays = state.explanation(path, query_id, parsed_box, result, fresh=True)
            data = overlays[side]  # type: ignore[index]
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    return app


def is_loopback_host(host: str) -> bool:
    """Whether ``serve --host`` names a loopback address: localhost, 127.0.0.0/8 or ::1 (bracketed or not)."""
    split = _split_host(host)
    return split is not None and not split[1] and is_loopback_name(split[0])


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """``camretrieval serve``: open the index, load its model, and serve the page and the API until interrupted."""
    import uvicorn

    started = time.perf_counter()
    loopback = is_loopback_host(host)
    # On a loopback address only loopback Host headers are answered (DNS rebinding), IPv6 literals included.
    app = create_app(index_dir, device, loopback_only=loopback)
    state: WebState = app.state.web
    if not loopback:
        print(
            f"warning: listening on {host}: anyone who can reach this machine can search the index and see its images",
            file=sys.stderr,
        )
    bind = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    shown = f"[{bind}]" if ":" in bind else bind
    print(
        f"serving {len(state.index)} images of {index_dir} (model loaded in {time.perf_counter() - started:.1f} s) "
        f"at http://{shown}:{port}/  (API: http://{shown}:{port}/openapi.json; Ctrl-C stops)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=bind, port=port, log_level="warning")
    finally:
        state.close()


__all__ = ["create_app", "serve"]
