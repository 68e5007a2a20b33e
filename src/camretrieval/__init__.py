"""camretrieval: visual instance search with class-weighted convolutional features.

Jimenez, Alvarez, Giro-i-Nieto, "Class-Weighted Convolutional Features for Visual Instance Search", BMVC 2017.

A notebook session::

    from camretrieval import Index, PCAWhitening, Describer, load_backbone, fit_whitening
    backbone = load_backbone("efficientnet_lite0")
    whitening, _ = fit_whitening(Describer(backbone), ["other/1.jpg", ...])   # a different collection
    index, skipped = Index.build("photos/", whitening)
    index.save("photos.index")
    hits = Index.open("photos.index").search(["query.jpg"], boxes=[(10, 20, 200, 300)], top=10)
"""

from .backbones import Backbone, FeatureMaps, imagenet_class_names, list_backbones, load_backbone, register_backbone
from .descriptor import (
    POOLINGS,
    Describer,
    ExtractionSettings,
    PooledVectors,
    class_weighted_vectors,
    fit_whitening,
    pooled_vectors,
)
from .errors import CamRetrievalError
from .index import Index, SearchHit, SearchOptions
from .whitening import PCAWhitening

__version__ = "0.1.0"

__all__ = [
    "Backbone",
    "CamRetrievalError",
    "Describer",
    "ExtractionSettings",
    "FeatureMaps",
    "Index",
    "PCAWhitening",
    "POOLINGS",
    "PooledVectors",
    "SearchHit",
    "SearchOptions",
    "class_weighted_vectors",
    "fit_whitening",
    "imagenet_class_names",
    "list_backbones",
    "pooled_vectors",
    "load_backbone",
    "register_backbone",
]
