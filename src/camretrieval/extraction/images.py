"""Finding, decoding and resizing images, and the DataLoader dataset that does it in worker processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from camretrieval.errors import CamRetrievalError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})


class ImageError(CamRetrievalError):
    """An image that cannot be used: unreadable, corrupt, or too small. ``retry``: the file could not be read for a
    reason that may pass (missing, no permission): worth trying again even if it has not changed."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


def find_images(root: str | Path) -> list[str]:
    """Image files under ``root``, recursively, as sorted POSIX paths relative to ``root``.

    Extensions are matched case-insensitively; hidden files and folders are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise CamRetrievalError(f"not a folder of images: {root}")
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit single-channel images (modes I;16*, I, F) scaled to 8 bits by their value range."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max() > 255 else 255.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: EXIF orientation applied, palette/gray/CMYK converted, alpha over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file fully into RGB, or raise :class:`ImageError` saying why it cannot be used."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            return to_rgb(image)
    except FileNotFoundError as error:
        raise ImageError("file not found (moved or deleted?)", retry=True) from error
    except (PermissionError, NotADirectoryError) as error:
        raise ImageError(f"cannot be read ({error.strerror or error})", retry=True) from error
    except UnidentifiedImageError as error:
        reason = "empty file" if Path(path).stat().st_size == 0 else "not an image Pillow can read"
        raise ImageError(reason) from error
    except Image.DecompressionBombError as error:
        raise ImageError(f"too many pixels ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"corrupt or truncated image ({error})") from error


_EXIF_ORIENTATION = 0x0112


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size`` with the aspect ratio kept (as torchvision)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def shape_order(paths: list[str | Path], root: str | Path | None, size: int) -> list[int]:
    """The indices of ``paths`` sorted by the shape each image will have after resizing (from its file header and
    EXIF orientation, without decoding): consecutive images then share a shape and go through the backbone in full
    batches, however mixed the collection's aspect ratios ("aspect-ratio buckets"). Files whose header cannot be read
    go last; decoding them reports why."""

    def shape(index: int) -> tuple[int, int, int]:
        path = Path(root) / paths[index] if root is not None else Path(paths[index])
        try:
            with Image.open(path) as image:
                width, height = image.size
                if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 degrees when decoded
                    width, height = height, width
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return (1, 0, 0)
        resized = resized_size(width, height, size)
        return (0, resized[1], resized[0])

    return sorted(range(len(paths)), key=shape)


def check_image_size(width: int, height: int, min_side: int) -> None:
    """Reject images smaller than one feature cell of the backbone: upscaling them would describe interpolation."""
    if min(width, height) < min_side:
        raise ImageError(
            f"image is {width}x{height} px, too small: the backbone needs at least {min_side} px on the shorter "
            "side (one feature cell)"
        )


def preprocess(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """Resize the shorter side to ``size`` (aspect kept), then a normalised 3 x H x W float tensor.

    Bit for bit torchvision's ``normalize(to_tensor(resize(image, [size], BILINEAR, antialias=True)), mean, std)``
    (tests/test_preprocess.py checks it on real photos), with Pillow and torch alone: importing torchvision costs
    seconds that a search does not need to pay."""
    width, height = image.size
    new_size = resized_size(width, height, size)
    if new_size != (width, height):  # torchvision leaves an image of the right size as it is
        image = image.resize(new_size, Image.Resampling.BILINEAR)  # Pillow's bilinear filter antialiases
    pixels = torch.from_numpy(np.array(image, np.uint8, copy=True))
    pixels = pixels.view(image.height, image.width, len(image.getbands())).permute(2, 0, 1).contiguous()
    tensor = pixels.to(dtype=torch.get_default_dtype()).div(255)
    mean = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


@dataclass
class LoadedImage:
    """One item from :class:`ImageFileDataset`: the tensor, or the reason it could not be made."""

    index: int
    tensor: torch.Tensor | None
    original_size: tuple[int, int] | None  # (width, height) before resizing
    error: str | None = None
    retry: bool = False  # the error may pass (see ImageError.retry)


class ImageFileDataset(Dataset):
    """Decodes and resizes image files (in DataLoader workers). Failures are returned, not raised, so that one bad
    file never ends a long run."""

    def __init__(self, paths: list[str | Path], size: int, mean, std, min_side: int, root: str | Path | None = None) -> None:
        self.paths = list(paths)
        self.root = Path(root) if root is not None else None
        self.size, self.mean, self.std, self.min_side = size, mean, std, min_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        try:
            path = self.paths[index]
            image = load_image(self.root / path if self.root is not None else path)
            check_image_size(*image.size, self.min_side)
            return LoadedImage(index, preprocess(image, self.size, self.mean, self.std), image.size)
        except ImageError as error:
            return LoadedImage(index, None, None, str(error), error.retry)


def collate_loaded(items: list[LoadedImage]) -> list[LoadedImage]:
    """Keep a batch as it is (a list of images: those of different sizes are grouped by shape later, never padded)."""
    return items
