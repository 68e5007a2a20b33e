"""Decoding real-world files: conversions, EXIF, and bad files that must be reported and skipped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from camretrieval.extraction.describer import Describer
from camretrieval.extraction.images import ImageError, check_image_size, find_images, load_image, shape_order, to_rgb


def _photo(size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_find_images_recursive_case_insensitive_and_sorted(tmp_path):
    for name in ["b.JPG", "a/c.jpeg", "a/d.PNG", "e.webp", "f.bmp", "g.TIFF", "h.tif", "notes.txt", ".hidden.jpg", ".cache/x.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_images(tmp_path) == ["a/c.jpeg", "a/d.PNG", "b.JPG", "e.webp", "f.bmp", "g.TIFF", "h.tif"]


def test_modes_are_converted_to_rgb(tmp_path):
    photo = _photo()
    cases = {
        "palette.png": photo.convert("P"),
        "gray.png": photo.convert("L"),
        "cmyk.jpg": photo.convert("CMYK"),
        "rgba.png": photo.convert("RGBA"),
        "la.png": photo.convert("LA"),
        "bw.png": photo.convert("1"),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        loaded = load_image(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == photo.size, name


def test_sixteen_bit_gray_keeps_its_range(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    loaded = np.asarray(load_image(tmp_path / "deep.png"))
    assert loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255  # scaled, not clipped to white
    assert abs(int(loaded[32, 0, 0]) - 128) <= 1


def test_transparent_areas_become_white():
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    photo = _photo((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (64, 96)


def test_shape_order_groups_images_by_their_resized_shape(tmp_path):
    """Aspect-ratio buckets: files in order of the shape they will have after resizing, read from their headers
    (EXIF rotation included), unreadable ones last."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, decoded portrait
    _photo((96, 64)).save(tmp_path / "a_landscape.jpg")
    _photo((64, 96)).save(tmp_path / "b_portrait.jpg")
    (tmp_path / "c_broken.jpg").write_bytes(b"not an image")
    _photo((300, 200)).save(tmp_path / "d_landscape_large.png")
    _photo((96, 64)).save(tmp_path / "e_rotated.jpg", exif=exif)
    names = sorted(p.name for p in tmp_path.iterdir())
    order = [names[i] for i in shape_order(names, tmp_path, 32)]
    # Resized to a shorter side of 32: landscapes are 32 x 48 (H x W), portraits 48 x 32.
    assert order == ["a_landscape.jpg", "d_landscape_large.png", "b_portrait.jpg", "e_rotated.jpg", "c_broken.jpg"]
    assert [load_image(tmp_path / n).size[::-1] for n in order[2:4]] == [(96, 64), (96, 64)]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not an image\n" * 10, "not an image"),
        ("html.png", b"<html><body>404</body></html>", "not an image"),
    ],
)
def test_unreadable_files_say_why(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(tmp_path / name)


def test_truncated_and_corrupt_files_say_why(tmp_path):
    _photo((200, 200)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path / "truncated.jpg")
    _photo((200, 200)).save(tmp_path / "full.png")
    png = bytearray((tmp_path / "full.png").read_bytes())
    png[100:140] = b"\x00" * 40  # damage the compressed data
    (tmp_path / "corrupt.png").write_bytes(bytes(png))
    with pytest.raises(ImageError, match="corrupt"):
        load_image(tmp_path / "corrupt.png")


def test_image_smaller_than_one_feature_cell_is_rejected():
    with pytest.raises(ImageError, match="too small.*at least 32 px"):
        check_image_size(20, 400, 32)
    check_image_size(32, 32, 32)


def test_bad_files_in_a_folder_are_reported_skipped_and_counted(tmp_path, lite0, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _photo((80 + 16 * i, 64)).save(folder / f"good{i}.jpg")
    _photo((80, 64)).save(folder / "same_shape_as_good0.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    _photo((20, 20)).save(folder / "tiny.png")
    paths = [folder / p for p in find_images(folder)]
    describer = Describer(lite0, size=64, n_classes=4)
    vectors, owners, failures = describer.vectors_of_files(paths, n_classes=2, batch_size=4, workers=2)
    assert vectors.shape == (8, 1280)
    done = owners[::2].tolist()
    assert owners.tolist() == np.repeat(done, 2).tolist()
    assert sorted(paths[i].name for i in done) == ["good0.jpg", "good1.jpg", "good2.jpg", "same_shape_as_good0.png"]
    assert done == sorted(done)
    reasons = {f.path.split("/")[-1]: f.reason for f in failures}
    assert set(reasons) == {"empty.jpg", "text.png", "tiny.png"}
    assert "empty" in reasons["empty.jpg"] and "too small" in reasons["tiny.png"]
    assert "skipped" in capsys.readouterr().err
    # Batched, grouped by shape, the result is the same as one image at a time.
    one_by_one = [describer.image_vectors(paths[i], n_classes=2).vectors[0].numpy() for i in done]
    assert np.allclose(vectors, np.concatenate(one_by_one), atol=1e-5)
