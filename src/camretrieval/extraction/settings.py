"""The one settings object of extraction: what determines an image's descriptor.

:class:`ExtractionSettings` is what a PCA-whitening file and an index record, what the command line builds from its
options, what the index writer, each Ray worker, :class:`~camretrieval.search.index.Index` and the evaluation make
their :class:`~camretrieval.extraction.describer.Describer` from (``Describer.from_settings``), so that the
database, the queries and the whitening are always described alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from camretrieval.constants import (  # defined there, importable without torch (the command line's defaults)
    DEFAULT_BACKBONE,
    DEFAULT_CLASSES,
    DEFAULT_POOLING,
    DEFAULT_SIZE,
    PRECISIONS,
)
from camretrieval.errors import CamRetrievalError
from camretrieval.method.class_list import ClassList
from camretrieval.method.whitening import PCAWhitening

__all__ = ["DEFAULT_BACKBONE", "DEFAULT_CLASSES", "DEFAULT_POOLING", "DEFAULT_SIZE", "PRECISIONS", "VECTOR_KEYS",
           "ExtractionSettings"]

# The settings that determine the vectors a whitening is learned on and applied to (N_c and the weights file's
# location do not: a whitening learned on top-1 class vectors serves any N_c).
VECTOR_KEYS = ("backbone", "feature_layer", "cam_layer", "size", "pooling", "class_list", "scales")


@dataclass(frozen=True)
class ExtractionSettings:
    """What determines the descriptors of images: the classifier (``backbone``, its ``weights`` file when not
    packaged, the ``feature_layer`` pooled, None for the backbone's own; ``cam_layer`` is the backbone's and is
    filled in by the describer), the image ``size`` (shorter side), the ``pooling``, N_c (``n_classes``), a
    fixed ``class_list`` (paper section 4.3; N_c is then its length) and the ``scales`` each image is also
    described at (multi-scale: factors of ``size`` in (0, 1], 1 first; (1.0,): single-scale).

    >>> settings = ExtractionSettings.from_pca(PCAWhitening.load("pca.npz"), n_classes=32)
    >>> describer = Describer.from_settings(settings, whitening)    # loads the backbone
    >>> settings.to_dict()                                     # what an index records
    """

    backbone: str = DEFAULT_BACKBONE
    feature_layer: str | None = None
    cam_layer: str | None = None
    size: int = DEFAULT_SIZE
    pooling: str = DEFAULT_POOLING
    class_list: tuple[int, ...] | None = None
    n_classes: int = DEFAULT_CLASSES
    weights: str | None = None  # an absolute path, or None for the packaged weights
    scales: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", checked_scales(self.scales))
        if isinstance(self.class_list, ClassList):  # a learned list: only for the classifier it was learned with
            object.__setattr__(self, "class_list", self.class_list.check(self.backbone).classes)
        if self.class_list is not None:
            object.__setattr__(self, "class_list", tuple(int(c) for c in self.class_list))
            object.__setattr__(self, "n_classes", len(self.class_list))  # every image is aggregated over the list
        if self.weights is not None:
            object.__setattr__(self, "weights", str(Path(self.weights).resolve()))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> "ExtractionSettings":
        """Settings as recorded by :meth:`to_dict` (an index's, a PCA file's), with the ``overrides`` that are not
        None; keys of other records (``n_pca``, ...) are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        given = {key: value for key, value in values.items() if key in names}
        given |= {key: value for key, value in overrides.items() if value is not None}
        unknown = set(given) - names
        if unknown:
            raise TypeError(f"unknown extraction settings: {', '.join(sorted(unknown))}")
        return cls(**given)

    @classmethod
    def from_pca(cls, whitening: PCAWhitening | None, **overrides: Any) -> "ExtractionSettings":
        """The settings a PCA-whitening was learned with (none: the defaults), with the ``overrides`` that are not
        None. The weights are the user's, not the file's: a PCA file records where its weights were read."""
        learned = dict(whitening.settings) if whitening is not None else {}
        learned.pop("weights", None)
        learned.pop("n_classes", None)
        return cls.from_dict(learned, **overrides)

    def to_dict(self) -> dict:
        """The settings as JSON-ready values, as an index records them; ``class_list`` only when there is one,
        ``scales`` only when there are several."""
        settings = dataclasses.asdict(self)
        if self.class_list is None:
            del settings["class_list"]
        else:
            settings["class_list"] = list(self.class_list)
        if self.scales == (1.0,):  # what every single-scale index and PCA file recorded before scales existed
            del settings["scales"]
        else:
            settings["scales"] = list(self.scales)
        return settings

    def vector_settings(self) -> dict:
        """The settings that a PCA-whitening must share with the descriptors it whitens (:data:`VECTOR_KEYS`)."""
        settings = self.to_dict()
        return {key: settings.get(key) for key in VECTOR_KEYS}


def checked_scales(scales: Any) -> tuple[float, ...]:
    """``scales`` as the settings keep them: distinct factors in (0, 1], largest (1) first. Scales above 1 are
    refused: the other scales are resized from the image at ``size``, which has no more pixels to give."""
    if isinstance(scales, str):
        scales = [part for part in scales.replace(" ", "").split(",") if part]
    try:
        values = sorted({float(scale) for scale in scales}, reverse=True)
    except (TypeError, ValueError):
        raise CamRetrievalError(f"scales must be numbers such as 1,0.707,0.5; got {scales!r}") from None
    if not values or values[0] != 1.0 or values[-1] <= 0:
        raise CamRetrievalError(
            f"scales must include 1 and lie in (0, 1] (factors of --size: 1,0.707,0.5 describes each image at "
            f"size, size/sqrt 2 and size/2); got {', '.join(f'{v:g}' for v in values) or 'none'}"
        )
    return tuple(values)
