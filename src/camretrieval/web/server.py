"""``camretrieval serve``: the web page and its JSON API (FastAPI + uvicorn): :func:`create_app`, :func:`serve`.
docs/web.md documents it. The explanations it serves come from :mod:`camretrieval.explain`.

Security of the server (docs/web.md): it binds 127.0.0.1 unless told otherwise; it serves only the indexed images
(a path must be in the index's list, free of ``..`` and absolute parts, and must resolve, symlinks followed, to a
file under the index's image root); request bodies over :data:`~camretrieval.web.files.MAX_UPLOAD_BYTES` are refused with 413 before they
are parsed; uploads are decoded only when their header says at most :data:`~camretrieval.web.files.MAX_UPLOAD_PIXELS` pixels; uploads are
kept in a temporary folder of the server's own, removed when it stops; every error is a JSON ``{"detail": ...}``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from camretrieval.errors import CamRetrievalError
from camretrieval.explain import Explanation, class_names, explain_match, query_overlay, result_overlay
from camretrieval.method.regions import Box, BoxError, parse_box
from camretrieval.search.index import Index
from camretrieval.search.refinement import SearchOptions
from camretrieval.web.files import (
    MAX_UPLOAD_BYTES,
    MAX_UPLOAD_PIXELS,
    THUMBNAIL_SIZES,
    BytesLRU,
    IndexedImages,
    RequestError,
    UploadStore,
    decode_upload,
    png_bytes,
    thumbnail_bytes,
)

STATIC_DIR = Path(__file__).with_name("static")
_BODY_LIMIT = MAX_UPLOAD_BYTES + 256 * 1024  # the file plus the form's other fields and boundaries
_DRAIN_LIMIT = 8 * MAX_UPLOAD_BYTES  # a declared body up to this is read and dropped before the 413 (see below)


class Hit(BaseModel):
    path: str = Field(description="relative to the indexed folder, as in `camretrieval search --json`")
    score: float = Field(description="cosine similarity (or the refined score with re-ranking)")


class SearchResult(BaseModel):
    query: str = Field(description="the indexed path, or the uploaded file's name")
    results: list[Hit]
    query_id: str | None = Field(None, description="an upload's id, for /api/explain (the server keeps the last 32)")
    box: list[float] | None = None
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


class Info(BaseModel):
    count: int
    settings: dict[str, Any]
    refinement: dict[str, bool] = Field(description="which search options this index supports")
    limits: dict[str, int]


class Error(BaseModel):
    detail: str


_ERRORS = {status: {"model": Error} for status in (400, 403, 404, 413, 415)}


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


class WebState:
    """What the server holds: the index and its model (loaded once, at start), the caches, the uploads folder."""

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
        self.thumbnails = BytesLRU(96 * 2**20)
        self.overlays = BytesLRU(64 * 2**20)
        self.explanations: OrderedDict[tuple, tuple[Explanation, float]] = OrderedDict()
        self.cache_lock = threading.Lock()
        self.upload_dir = upload_dir or Path(tempfile.mkdtemp(prefix="camretrieval-serve-"))
        self.uploads = UploadStore(self.upload_dir)

    def close(self) -> None:
        shutil.rmtree(self.upload_dir, ignore_errors=True)

    @property
    def refinement(self) -> dict[str, bool]:
        has_maps = getattr(self.index, "maps", None) is not None and self.describer.pooling == "cam"
        return {"online": has_maps, "rerank": has_maps, "qe": True}

    def query_image(
        self, path: str | None, query_id: str | None, data: bytes | None = None
    ) -> tuple[Image.Image | Path, str, str | None]:
        """(image, name, upload id) of a query given as an indexed path, an upload id, or uploaded bytes."""
        if data is not None:
            return decode_upload(data), "", None
        if (path is None) == (query_id is None):
            raise RequestError(
                400, "give the query as an uploaded file, an indexed path, or an upload's query_id (one of them)"
            )
        if path is not None:
            return self.images.resolve(path), path, None
        data, name = self.uploads.get(query_id)  # type: ignore[arg-type]
        return decode_upload(data), name, query_id

    def explanation(
        self, key: tuple, query: Image.Image | Path, box: Box | None, result: str
    ) -> tuple[Explanation, float]:
        """The explanation of (query, box, result), cached (the page asks for it, then for its two overlays)."""
        with self.cache_lock:
            cached = self.explanations.get(key)
            if cached is not None:
                self.explanations.move_to_end(key)
                return cached
        result_path = self.images.resolve(result)
        with self.model_lock:
            explanation = explain_match(self.describer, query, result_path, box)
            q = self.describer.describe([query], [box])[0]
        score = float(self.index.descriptors[self.images.positions[result]] @ q)
        with self.cache_lock:
            self.explanations[key] = (explanation, score)
            while len(self.explanations) > 32:
                self.explanations.popitem(last=False)
        return explanation, score


def _parse_box(text: str | None) -> Box | None:
    if text is None or not text.strip():
        return None
    box = parse_box(text)
    if not all(math.isfinite(v) for v in box):
        raise BoxError(f"box {text!r} has a non-finite coordinate")
    return box


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def create_app(index_dir: str | Path, device: str = "cpu", allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The web page and its JSON API over the index at ``index_dir`` (opened, and its model loaded, now).
    ``allowed_hosts``: the Host headers answered (None: any); :func:`serve` gives the loopback names when it
    listens on loopback, so that a web page elsewhere cannot reach the server under a name of its own (DNS
    rebinding)."""
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
        docs_url="/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.web = state
    app.add_middleware(BodyLimit)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.exception_handler(CamRetrievalError)
    async def user_error(request: Request, error: CamRetrievalError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the server's log (uvicorn prints it), never to the client.
        return JSONResponse({"detail": "internal error (see the server's log)"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info", response_model=Info, summary="The index: size, settings, supported options, limits")
    def info() -> dict[str, Any]:
        settings = {k: v for k, v in state.index.settings.items() if k != "weights"}
        return {
            "count": len(state.index),
            "settings": settings,
            "refinement": state.refinement,
            "limits": {"upload_bytes": MAX_UPLOAD_BYTES, "upload_pixels": MAX_UPLOAD_PIXELS, "top": 1000},
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
        "/api/images/{path:path}", summary="An indexed image, as stored", responses=_ERRORS, response_class=FileResponse
    )
    def image(path: str) -> FileResponse:
        return FileResponse(state.images.resolve(path), headers={"Cache-Control": "private, max-age=3600"})

    @app.get(
        "/api/thumbnails/{path:path}",
        summary="A JPEG thumbnail of an indexed image",
        responses=_ERRORS,
        response_class=Response,
    )
    def thumbnail(path: str, size: int = Query(256, description=f"longer side: one of {THUMBNAIL_SIZES}")) -> Response:
        if size not in THUMBNAIL_SIZES:
            raise RequestError(400, f"size must be one of {', '.join(map(str, THUMBNAIL_SIZES))}")
        file = state.images.resolve(path)
        data = state.thumbnails.get((path, size))
        if data is None:
            try:
                data = thumbnail_bytes(file, size)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise RequestError(404, f"the indexed image cannot be read any more ({error})") from error
            state.thumbnails.put((path, size), data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post(
        "/api/search",
        response_model=list[SearchResult],
        responses=_ERRORS,
        summary="Search with an uploaded image or an indexed one (the result of `camretrieval search --json`)",
    )
    def search(
        file: UploadFile | None = File(
            None, description="the query image: JPEG, PNG, WebP, BMP or TIFF, at most 20 MB and 40 megapixels"
        ),
        path: str | None = Form(None, description="or an indexed image's path (as in the results)"),
        query_id: str | None = Form(None, description="or an earlier upload's query_id"),
        box: str | None = Form(None, description="x1,y1,x2,y2 around the object, in the query's pixels"),
        top: int = Form(10, ge=1, le=1000),
        online: bool = Form(False, description="online aggregation (needs an index with maps)"),
        rerank: int = Form(0, ge=0, description="re-rank the top R with CAM regions (needs an index with maps)"),
        qe: int = Form(0, ge=0, description="query expansion with the top K"),
        qe_alpha: float = Form(0.0, ge=0, description="alpha-QE power (0: average QE)"),
    ) -> list[dict[str, Any]]:
        data = None
        name = ""
        if file is not None:
            if path is not None or query_id is not None:
                raise RequestError(400, "give either an uploaded file, an indexed path or a query_id, not several")
            data = file.file.read(MAX_UPLOAD_BYTES + 1)
            name = PurePosixPath((file.filename or "upload").replace("\\", "/")).name[:200] or "upload"
        query, query_name, upload_id = state.query_image(path, query_id, data)
        if data is not None:
            upload_id = state.uploads.add(data, name)
            query_name = name
        parsed_box = _parse_box(box)
        options = SearchOptions(online=online, rerank=rerank, qe=qe, qe_alpha=qe_alpha)
        started = time.perf_counter()
        with state.model_lock:
            hits = state.index.search([query], [parsed_box], top, options)[0]
        return [
            {
                "query": query_name,
                "results": [{"path": hit.path, "score": hit.score} for hit in hits],
                "query_id": upload_id,
                "box": list(parsed_box) if parsed_box is not None else None,
                "seconds": time.perf_counter() - started,
            }
        ]

    def _explain(path: str | None, query_id: str | None, box: str | None, result: str) -> tuple[Explanation, float]:
        query, _, _ = state.query_image(path, query_id)
        parsed_box = _parse_box(box)
        return state.explanation((path, query_id, parsed_box, result), query, parsed_box, result)

    @app.get(
        "/api/explain",
        response_model=Explain,
        responses=_ERRORS,
        summary="Why a result matched: the query's top classes, the region that matched, overlay URLs",
    )
    def explain(
        result: str = Query(description="the result's indexed path"),
        path: str | None = Query(None, description="the query as an indexed path"),
        query_id: str | None = Query(None, description="or as an upload's query_id"),
        box: str | None = Query(None, description="the query's box x1,y1,x2,y2, as searched"),
    ) -> dict[str, Any]:
        explanation, score = _explain(path, query_id, box, result)
        record = explanation.to_dict()
        record["result"] |= {"path": result, "score": score}
        params = {k: v for k, v in {"result": result, "path": path, "query_id": query_id, "box": box}.items() if v}
        record["overlays"] = {
            side: "/api/explain/overlay?" + urlencode(params | {"side": side}) for side in ("query", "result")
        }
        return record

    @app.get(
        "/api/explain/overlay",
        responses=_ERRORS | {200: {"content": {"image/png": {}}}},
        response_class=Response,
        summary="A CAM heatmap overlay as PNG: the query (box in white) or the result (matched region in green)",
    )
    def explain_overlay(
        result: str = Query(description="the result's indexed path"),
        side: str = Query("result", pattern="^(query|result)$"),
        path: str | None = Query(None),
        query_id: str | None = Query(None),
        box: str | None = Query(None),
    ) -> Response:
        key = (path, query_id, box, result, side)
        data = state.overlays.get(key)
        if data is None:
            explanation, _ = _explain(path, query_id, box, result)
            data = png_bytes(query_overlay(explanation) if side == "query" else result_overlay(explanation))
            state.overlays.put(key, data)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    return app


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> None:
    """``camretrieval serve``: open the index, load its model, and serve the page and the API until interrupted."""
    import uvicorn

    started = time.perf_counter()
    loopback = host in ("127.0.0.1", "localhost", "::1")
    # Starlette compares the Host header up to its first colon, which an IPv6 literal ("[::1]:8000") defeats.
    checked = host in ("127.0.0.1", "localhost")
    app = create_app(index_dir, device, allowed_hosts=LOOPBACK_HOSTS if checked else None)
    state: WebState = app.state.web
    if not loopback:
        print(
            f"warning: listening on {host}: anyone who can reach this machine can search the index and see its images",
            file=sys.stderr,
        )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {len(state.index)} images of {index_dir} (model loaded in {time.perf_counter() - started:.1f} s) "
        f"at http://{shown}:{port}/  (API: http://{shown}:{port}/openapi.json; Ctrl-C stops)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        state.close()


__all__ = ["create_app", "serve"]
