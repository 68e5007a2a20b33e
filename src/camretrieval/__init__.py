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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public name and the module that defines it. They are imported on first use (PEP 562), so that
# ``import camretrieval`` (and ``camretrieval --help``, which imports camretrieval.cli) loads no torch, FAISS or model.
_EXPORTS = {
    "Backbone": "camretrieval.extraction",
    "CamRetrievalError": "camretrieval.errors",
    "Describer": "camretrieval.extraction",
    "ExtractionSettings": "camretrieval.extraction",
    "FeatureMaps": "camretrieval.method",
    "Index": "camretrieval.search",
    "PCAWhitening": "camretrieval.method",
    "POOLINGS": "camretrieval.constants",
    "PooledVectors": "camretrieval.method",
    "SearchHit": "camretrieval.search",
    "SearchOptions": "camretrieval.search",
    "class_weighted_vectors": "camretrieval.method",
    "fit_whitening": "camretrieval.extraction",
    "imagenet_class_names": "camretrieval.extraction",
    "list_backbones": "camretrieval.extraction",
    "pooled_vectors": "camretrieval.method",
    "load_backbone": "camretrieval.extraction",
    "register_backbone": "camretrieval.extraction",
    "update_index": "camretrieval.storage",
}

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'camretrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from camretrieval.constants import POOLINGS
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
    from camretrieval.method import FeatureMaps, PCAWhitening, PooledVectors, class_weighted_vectors, pooled_vectors
    from camretrieval.search import Index, SearchHit, SearchOptions
    from camretrieval.storage import update_index
