"""What the server takes in and gives out: uploaded query images (checked before any pixel is decoded, kept in a
folder of the server's own), the indexed images it may serve (and no other file), their thumbnails, and a bounded
cache of the bytes it sends."""

from __future__ import annotations

import hashlib
import io
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.images import to_rgb

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an upload's file, and (plus a little for the form) a request's body
MAX_UPLOAD_PIXELS = 40_000_000  # checked from the file's header, before any pixel is decoded
UPLOAD_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})  # what find_images indexes
THUMBNAIL_SIZES = (128, 256, 512)  # the few sizes served keep the cache bounded


# --- uploads and the files the server may serve ----------------------------------------------------------------


class RequestError(CamRetrievalError):
    """A request the server refuses, with the HTTP status to answer (400, 403, 404, 413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded image decoded to RGB (EXIF orientation applied), or a :class:`RequestError`: 413 for over
    :data:`MAX_UPLOAD_BYTES` or :data:`MAX_UPLOAD_PIXELS` (checked from the header, before decoding), 415 for a
    file that is no image of a format the index takes, 400 for a corrupt one."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise RequestError(
            413, f"the upload is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB"
        )
    if not data:
        raise RequestError(400, "the upload is empty")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; the pixel limit below is the real one.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_UPLOAD_PIXELS:
                    raise RequestError(
                        413,
                        f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; the limit is "
                        f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixels",
                    )
                if image.format not in UPLOAD_FORMATS:
                    raise RequestError(
                        415, f"{image.format} images are not accepted: upload JPEG, PNG, WebP, BMP or TIFF"
                    )
                image.load()
                return to_rgb(image)
    except RequestError:
        raise
    except UnidentifiedImageError as error:
        raise RequestError(415, "the upload is not an image (accepted: JPEG, PNG, WebP, BMP, TIFF)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(413, f"the image has too many pixels ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise RequestError(400, f"the image is corrupt or truncated ({error})") from error


_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


class UploadStore:
    """The last ``keep`` uploaded query images, as files in the server's own temporary folder (so that a result can
    be explained after the search without uploading the query again); named by their content's hash."""

    def __init__(self, directory: Path, keep: int = 32) -> None:
        self.directory = directory
        self.keep = keep
        self._names: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, data: bytes, name: str) -> str:
        upload_id = hashlib.sha256(data).hexdigest()[:32]
        with self._lock:
            if upload_id not in self._names:
                (self.directory / upload_id).write_bytes(data)
            self._names[upload_id] = name
            self._names.move_to_end(upload_id)
            while len(self._names) > self.keep:
                old, _ = self._names.popitem(last=False)
                (self.directory / old).unlink(missing_ok=True)
        return upload_id

    def get(self, upload_id: str) -> tuple[bytes, str]:
        with self._lock:
            if not _UPLOAD_ID.match(upload_id) or upload_id not in self._names:
                raise RequestError(
                    404, f"no uploaded query {upload_id!r} (the server keeps the last {self.keep}): search again"
                )
            self._names.move_to_end(upload_id)
            return (self.directory / upload_id).read_bytes(), self._names[upload_id]


class BytesLRU:
    """A thread-safe least-recently-used cache of byte strings, bounded by their total size."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                self._size -= len(self._items.pop(key))
            self._items[key] = value
            self._size += len(value)
            while self._size > self.budget and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._size -= len(old)


class IndexedImages:
    """The only files the server reads for a request: the index's images, each resolved against its image root."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.root = root.resolve()
        self.paths = list(paths)
        self.positions = {path: i for i, path in enumerate(self.paths)}

    def resolve(self, relative: str) -> Path:
        """The file of an indexed path, or a :class:`RequestError`: 404 for a path that is not in the index
        (``..``, absolute, or any other), 403 for one that resolves outside the image root (a symlink escape)."""
        pure = PurePosixPath(relative)
        if (
            not relative
            or "\x00" in relative
            or "\\" in relative
            or pure.is_absolute()
            or any(part in ("..", ".") for part in relative.split("/"))
            or relative not in self.positions
        ):
            raise RequestError(404, "not an indexed image")
        try:
            resolved = (self.root / relative).resolve(strict=True)
        except (OSError, RuntimeError) as error:  # missing since indexing, or a symlink loop
            raise RequestError(404, "indexed image no longer readable") from error
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            raise RequestError(403, "this indexed path leads outside the image folder (a symlink): not served")
        return resolved


def thumbnail_bytes(path: Path, size: int) -> bytes:
    """A JPEG thumbnail (longer side ``size``) of an image file; JPEGs are decoded at reduced scale (draft mode)."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        picture = to_rgb(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    output = io.BytesIO()
    picture.save(output, "JPEG", quality=82)
    return output.getvalue()


def png_bytes(picture: Image.Image) -> bytes:
    output = io.BytesIO()
    picture.save(output, "PNG", optimize=False)
    return output.getvalue()


# --- the web app --------------------------------------------------------------------------------------------------
