"""camretrieval: visual instance search with class-weighted convolutional features.

Jimenez, Alvarez, Giro-i-Nieto, "Class-Weighted Convolutional Features for Visual Instance Search", BMVC 2017.

The package follows the data flow, each layer importing only from those below it (docs/architecture.md):
``method`` (the paper's maths) < ``extraction`` (backbones, images, the describer) < ``storage`` (the index folder)
< ``search`` (the index and query-time refinement) < ``explain`` < ``evaluation`` < ``web``, ``demo`` < ``cli``.

A notebook session::

    from camretrieval import Index, PCAWhitening, Describer, load_backbone, fit_whitening
    backbone = load_backbone("efficientnet_lite0")
    whitening, _ = fit_whitening(Describer(backbone), ["other/1.jpg", ...])   # a different collection
    index, skipped = Index.build("photos/", whitening, index_dir="photos.index")
    hits = Index.open("photos.index").search(["query.jpg"], boxes=[(10, 20, 200, 300)], top=10)
"""

from camretrieval.errors import CamRetrievalError
from camretrieval.extraction import (
    Backbone,
    Describer,
    ExtractionSettings,
    fit_whitening,
    imagenet_class_names,
    list_backbones,
    load_backbone,
    register_backbone,
)
from camretrieval.method import (
    POOLINGS,
    FeatureMaps,
    PCAWhitening,
    PooledVectors,
    class_weighted_vectors,
    pooled_vectors,
)
from camretrieval.search import Index, SearchHit, SearchOptions
from camretrieval.storage import update_index

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
    "update_index",
]
