"""What the server takes in and gives out: uploaded query images (checked before any pixel is decoded, decoded a
few at a time in bounded memory, kept in a folder of the server's own), the indexed images it may serve (and no
other file), their thumbnails, and a bounded cache of the bytes it sends."""

from __future__ import annotations

import hashlib
import io
import math
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageMode, UnidentifiedImageError

from camretrieval.errors import CamRetrievalError

MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # an upload's file, and (plus a little for the form) a request's body
MAX_UPLOAD_PIXELS = 40_000_000  # checked from the file's header, before any pixel is decoded
# Pixels x bytes per pixel (the file's samples: bands x bit depth, from the header), before any pixel is decoded:
# what a 40-megapixel 8-bit RGB photo decodes to. 16 bits per channel, alpha, CMYK or floats count their bytes.
MAX_DECODED_BYTES = 3 * MAX_UPLOAD_PIXELS
DECODE_SLOTS = 2  # images decoded (and searched) at once; the others wait for their turn
DECODE_WAIT_SECONDS = 60.0  # a request that waits longer for its turn is answered 503
_STRIP_BYTES = 4 * 2**20  # conversions to RGB go strip by strip: at most this much of float64 samples at a time
UPLOAD_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})  # what find_images indexes
THUMBNAIL_SIZES = (128, 256, 512)  # the few sizes served keep the cache bounded

T = TypeVar("T")


# --- uploads and the files the server may serve ----------------------------------------------------------------


class RequestError(CamRetrievalError):
    """A request the server refuses, with the HTTP status to answer (400, 403, 404, 413, 415, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def bytes_per_pixel(image: Image.Image) -> int:
    """The bytes of one decoded pixel of an opened (not yet decoded) image, from its header: its bands times the
    bytes of one sample at the file's bit depth (a 16-bit RGBA PNG: 8; an 8-bit RGB JPEG: 3; a float TIFF: 4)."""
    mode = ImageMode.getmode(image.mode)
    per_pixel = len(mode.bands) * int(mode.typestr[-1])  # '|u1' 1 byte, '<u2' 2, '<i4' and '<f4' 4
    if image.format == "PNG" and image.tile:
        args = image.tile[0].args
        rawmode = args if isinstance(args, str) else str(args[0])
        if ";16" in rawmode:  # 16 bits per sample (Pillow keeps 8 of them, but decodes all of them)
            per_pixel = max(per_pixel, 2 * len(rawmode.split(";")[0]))  # "RGBA;16B": 4 bands, "I;16B": 1
    elif image.format == "TIFF":
        bits = image.tag_v2.get(258, (8,))  # BitsPerSample: one value per sample, or one for all
        bits = (bits,) if isinstance(bits, int) else tuple(bits)
        samples = int(image.tag_v2.get(277, len(bits)))  # SamplesPerPixel
        if len(bits) == 1 and samples > 1:
            bits = bits * samples
        per_pixel = max(per_pixel, sum(math.ceil(int(b) / 8) for b in bits))
    return per_pixel


def check_upload_header(image: Image.Image) -> None:
    """Refuse an opened upload from its header alone: 413 for more than :data:`MAX_UPLOAD_PIXELS` or more than
    :data:`MAX_DECODED_BYTES` decoded, 415 for a format the index does not take."""
    width, height = image.size
    if width * height > MAX_UPLOAD_PIXELS:
        raise RequestError(
            413,
            f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{MAX_UPLOAD_PIXELS / 1e6:g} megapixels",
        )
    if image.format not in UPLOAD_FORMATS:
        raise RequestError(415, f"{image.format} images are not accepted: upload JPEG, PNG, WebP, BMP or TIFF")
    per_pixel = bytes_per_pixel(image)
    if width * height * per_pixel > MAX_DECODED_BYTES:
        raise RequestError(
            413,
            f"the image is {width}x{height} at {per_pixel} bytes per pixel: {width * height * per_pixel / 1e6:.0f} "
            f"MB decoded; the limit is {MAX_DECODED_BYTES / 1e6:.0f} MB ({MAX_UPLOAD_PIXELS / 1e6:g} megapixels "
            "of 8-bit RGB)",
        )


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded image decoded to RGB (EXIF orientation applied), or a :class:`RequestError`: 413 for over
    :data:`MAX_UPLOAD_BYTES`, :data:`MAX_UPLOAD_PIXELS` or :data:`MAX_DECODED_BYTES` (checked from the header,
    before decoding), 415 for a file that is no image of a format the index takes, 400 for a corrupt one.
    Decoding holds the decoded pixels and their RGB copy (:func:`rgb_image`); callers bound how many run at once
    (:class:`DecodePool`)."""
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
                check_upload_header(image)
                image.load()
                return rgb_image(image)
    except RequestError:
        raise
    except UnidentifiedImageError as error:
        raise RequestError(415, "the upload is not an image (accepted: JPEG, PNG, WebP, BMP, TIFF)") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(413, f"the image has too many pixels ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise RequestError(400, f"the image is corrupt or truncated ({error})") from error


class DecodePool:
    """A few threads of their own (``workers``) that decode images and work on them: ``run(function, ...)`` runs
    it there and returns its result (or raises its error). At most ``workers`` decodes are in memory at once,
    whatever the number of requests; and as only these threads hold the large buffers, the memory the C allocator
    keeps after them is bounded too (glibc keeps an arena per thread, and the web server's own thread pool has 40).
    A request whose turn has not come after ``wait`` seconds is answered 503."""

    def __init__(self, workers: int = DECODE_SLOTS, wait: float = DECODE_WAIT_SECONDS, name: str = "decode") -> None:
        self.workers, self.wait = workers, wait
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"camretrieval-{name}")

    def run(self, function: Callable[..., T], *args: Any) -> T:
        future = self._executor.submit(function, *args)
        try:
            return future.result(timeout=self.wait)
        except FutureTimeout:
            if future.cancel():
                raise RequestError(503, "the server is busy decoding other images: try again in a moment") from None
            return future.result()  # it has started: its answer comes soon

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# --- decoding to RGB in bounded memory ----------------------------------------------------------------------------

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _strip_rows(image: Image.Image) -> Iterator[tuple[int, int]]:
    rows = max(1, _STRIP_BYTES // (8 * max(1, image.width)))
    for top in range(0, image.height, rows):
        yield top, min(image.height, top + rows)


def _strip_to_rgb(strip: Image.Image, top_value: float) -> Image.Image:
    """:func:`camretrieval.extraction.images.to_rgb`'s conversions, on a strip (they work pixel by pixel; the
    16/32-bit scale ``top_value`` is the whole image's)."""
    if strip.mode.startswith("I") or strip.mode == "F":
        values = np.asarray(strip, dtype=np.float64)
        strip = Image.fromarray(np.clip(values / top_value * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if strip.mode == "P":
        strip = strip.convert("RGBA" if "transparency" in strip.info else "RGB")
    if strip.mode in _ALPHA_MODES:
        rgba = strip.convert("RGBA")
        strip = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return strip.convert("RGB")


def _transposed_box(method: Image.Transpose, size: tuple[int, int], top: int, bottom: int) -> tuple[int, int]:
    """Where the rows ``top:bottom`` of an image of ``size`` land (their upper left corner) once it is turned."""
    width, height = size
    if method in (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_TOP_BOTTOM):
        return 0, height - bottom
    if method in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_90):
        return top, 0
    if method in (Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE):
        return height - bottom, 0
    return 0, top  # FLIP_LEFT_RIGHT


def rgb_image(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB, EXIF orientation applied: exactly the pixels of
    :func:`camretrieval.extraction.images.to_rgb` (which the index saw), in bounded memory. ``to_rgb`` scales a
    16-bit image through float64 copies of the whole image (about 28 bytes per pixel: 1 GB for a 6300 x 6300 PNG
    of 77 kB); here the conversion and the turn go strip by strip into one RGB image, so the decoded pixels and their
    RGB copy are all that is held (an RGB image that needs no turn is returned as it is)."""
    image.load()
    method = _TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    if image.mode == "RGB" and method is None:
        return image
    top_value = 255.0
    if image.mode.startswith("I") or image.mode == "F":
        peaks = [np.asarray(image.crop((0, a, image.width, b)), dtype=np.float64).max() for a, b in _strip_rows(image)]
        top_value = 65535.0 if np.max(peaks) > 255 else 255.0
    turned = method in (
        Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE
    )
    output = Image.new("RGB", image.size[::-1] if turned else image.size)
    for top, bottom in _strip_rows(image):
        strip = _strip_to_rgb(image.crop((0, top, image.width, bottom)), top_value)
        if method is not None:
            output.paste(strip.transpose(method), _transposed_box(method, image.size, top, bottom))
        else:
            output.paste(strip, (0, top))
    return output


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
        (``..``, absolute, or any other), 403 for one that resolves outside the image root (a symlink escape).

        A file name is any bytes but ``/`` and NUL: a newline or a backslash is an ordinary character of it (on
        POSIX a backslash separates nothing), and a name that is not UTF-8 is the string the index holds for it
        (``os.fsdecode``: its other bytes as surrogate escapes). Only an exact indexed path is served."""
        if (
            not relative
            or "\x00" in relative
            or PurePosixPath(relative).is_absolute()
            or any(part in ("", "..", ".") for part in relative.split("/"))
            or relative not in self.positions
        ):
            raise RequestError(404, "not an indexed image")
        try:
            resolved = (self.root / relative).resolve(strict=True)
        except (OSError, RuntimeError) as error:  # missing since indexing, or a symlink loop
            raise RequestError(404, f"the indexed image {relative!r} can no longer be read") from error
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            raise RequestError(403, "this indexed path leads outside the image folder (a symlink): not served")
        return resolved


def thumbnail_bytes(path: Path, size: int) -> bytes:
    """A JPEG thumbnail (longer side ``size``) of an image file; JPEGs are decoded at reduced scale (draft mode),
    any other in bounded memory (:func:`rgb_image`)."""
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        picture = rgb_image(image)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    output = io.BytesIO()
    picture.save(output, "JPEG", quality=82)
    return output.getvalue()


def error_reason(error: BaseException) -> str:
    """Why an image could not be read, in words that name no file: Pillow's and the system's messages often hold
    the absolute path of the file, which the server never shows (it names images relative to the index's root)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(error, Image.DecompressionBombError):
        return "too many pixels"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()  # "no such file or directory", "permission denied": the path is apart
    text = str(error)
    if not text or "/" in text or "\\" in text:
        return "the file cannot be decoded"
    return text


def png_bytes(picture: Image.Image) -> bytes:
    output = io.BytesIO()
    picture.save(output, "PNG", optimize=False)
    return output.getvalue()


# --- the web app --------------------------------------------------------------------------------------------------
