"""From image files to descriptors: backbones, images, the settings, the describer, and what is learned from
example images before indexing.

- :mod:`~camretrieval.extraction.backbones`: registered ImageNet classifiers (GAP + linear head) cut into stages;
- :mod:`~camretrieval.extraction.images`: finding, decoding and resizing images; bad files reported, not fatal;
- :mod:`~camretrieval.extraction.settings`: :class:`ExtractionSettings`, the one record of how images are described;
- :mod:`~camretrieval.extraction.describer`: :class:`Describer`, images -> D_I, and its batch iteration over files;
- :mod:`~camretrieval.extraction.fitting`: :func:`fit_whitening` and :func:`learn_classes`.
"""

from camretrieval.extraction.backbones import (
    Backbone,
    WeightsNotFoundError,
    imagenet_class_names,
    list_backbones,
    load_backbone,
    register_backbone,
)
from camretrieval.extraction.describer import Describer, FileFailure, check_whitening
from camretrieval.extraction.fitting import fit_whitening, learn_classes
from camretrieval.extraction.images import IMAGE_EXTENSIONS, ImageError, find_images, load_image
from camretrieval.extraction.settings import ExtractionSettings

__all__ = [
    "IMAGE_EXTENSIONS",
    "Backbone",
    "Describer",
    "ExtractionSettings",
    "FileFailure",
    "ImageError",
    "WeightsNotFoundError",
    "check_whitening",
    "find_images",
    "fit_whitening",
    "imagenet_class_names",
    "learn_classes",
    "list_backbones",
    "load_backbone",
    "load_image",
    "register_backbone",
]
