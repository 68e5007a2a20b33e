"""What is learned from example images before indexing: PCA-whitening (METHOD.md section 3) and a fixed list of
classes for a collection's theme (section 4.3). Both describe their images with :meth:`Describer.iterate_files` and
record the extraction settings they were learned with, so they are applied only to descriptors of the same kind.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from camretrieval.errors import CamRetrievalError
from camretrieval.extraction.backbones import Backbone, imagenet_class_names
from camretrieval.extraction.describer import Describer, FileFailure, in_path_order
from camretrieval.extraction.settings import ExtractionSettings
from camretrieval.method.cams import class_logits, top_classes
from camretrieval.method.class_list import DEFAULT_LENGTH, DEFAULT_TOP, ClassList, most_frequent_classes
from camretrieval.method.whitening import DEFAULT_SHRINKAGE, PCAWhitening, supported_dim


def fit_whitening(
    describer: Describer,
    paths: Sequence[str | Path],
    root: str | Path | None = None,
    dim: int = 512,
    n_pca: int = 1,
    batch_size: int | None = None,
    workers: int = 2,
    progress: bool = True,
    shrinkage: float | None = None,
) -> tuple[PCAWhitening, list[FileFailure]]:
    """Learn PCA-whitening on the top-``n_pca`` class vectors of every image (METHOD.md section 3; with a class list,
    the vectors of its first ``n_pca`` classes, as the descriptor aggregates them), or for a baseline pooling on its
    vectors (every region for R-MAC).

    ``shrinkage`` (:class:`~camretrieval.method.whitening.PCAWhitening`): None chooses it from the count of training
    vectors, known before any image is described: the paper's plain whitening (0) when they are more than ``dim``,
    else :data:`~camretrieval.method.whitening.DEFAULT_SHRINKAGE`, which is said with ``progress``."""
    if dim < 1 or n_pca < 1:
        raise CamRetrievalError(f"the whitening's dimensions and class vectors per image must be at least 1: {dim}, {n_pca}")
    if shrinkage is None:
        shrinkage = whitening_shrinkage(dim, len(paths), n_pca, describer.pooling)
        if shrinkage and progress:
            print(
                f"note: {len(paths)} images x {n_pca} class vectors are too few for a plain {dim}-d whitening: it is "
                f"regularised (eigenvalues raised by {shrinkage:g} x their mean; docs/method.md)",
                file=sys.stderr,
            )
    vectors, owners, failures = describer.vectors_of_files(paths, n_pca, root, batch_size, workers, progress)
    if len(vectors) == 0:
        raise CamRetrievalError("no usable images to learn the PCA-whitening from")
    settings = whitening_settings(describer.settings, describer.backbone, n_pca, len(np.unique(owners)))
    return PCAWhitening(dim, settings, shrinkage).fit(vectors), failures


def whitening_shrinkage(dim: int, n_images: int, n_pca: int, pooling: str = "cam") -> float:
    """The shrinkage :func:`fit_whitening` chooses: 0 (the paper's whitening) when the ``n_images`` x ``n_pca``
    training vectors are more than ``dim``, else :data:`~camretrieval.method.whitening.DEFAULT_SHRINKAGE`."""
    if pooling == "rmac":  # one vector per region: many more vectors than images
        return 0.0
    return 0.0 if supported_dim(dim, n_images * n_pca, dim) >= dim else DEFAULT_SHRINKAGE


def whitening_settings(settings: ExtractionSettings, backbone: Backbone, n_pca: int, n_images: int) -> dict:
    """What a PCA-whitening file records: the extraction settings it applies to, and how it was learned."""
    recorded = {key: value for key, value in settings.to_dict().items() if key != "n_classes"}  # any N_c may use it
    return recorded | {"n_pca": n_pca, "n_images": n_images, "weights": backbone.weights}


def _class_names(n_classes: int) -> list[str] | None:
    """ImageNet's names for a classifier of its 1000 classes (a convenience: a list without them is complete)."""
    if n_classes != 1000:
        return None
    try:
        return imagenet_class_names()
    except Exception:  # noqa: BLE001
        return None


def learn_classes(
    describer: Describer,
    paths: Sequence[str | Path],
    root: str | Path | None = None,
    top: int = DEFAULT_TOP,
    length: int = DEFAULT_LENGTH,
    batch_size: int | None = None,
    workers: int = 2,
    progress: bool = True,
) -> tuple[ClassList, list[FileFailure]]:
    """Learn a :class:`ClassList` from example images of the collection's theme (whole images, at the describer's
    size): each image's top-``top`` classes, the ``length`` most frequent kept. Returns it and the files skipped."""
    if top < 1:
        raise CamRetrievalError(f"the classes counted per image must be at least 1, got {top}")
    backbone = describer.backbone
    weight, bias = backbone.classifier_weight, backbone.classifier_bias

    def compute(maps):
        with torch.inference_mode():
            return top_classes(class_logits(maps.cam_activations, weight, bias), top)

    failures: list[FileFailure] = []
    _, ranked = in_path_order(describer.iterate_files(paths, root, compute, batch_size, workers, progress, failures))
    if not ranked:
        raise CamRetrievalError("no usable images to learn the class list from")
    ranked_array = np.stack(ranked)
    classes, counts = most_frequent_classes(ranked_array, length)
    names = _class_names(weight.shape[0])
    return ClassList(
        classes.tolist(), counts.tolist(), backbone.name, describer.size, min(top, weight.shape[0]), len(ranked_array),
        [names[c] for c in classes] if names is not None else None, backbone.weights,
    ), failures
