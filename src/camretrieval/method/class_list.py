"""A fixed list of classes for a collection's theme (the paper's section 4.3).

Offline aggregation sums each image's OWN top-N_c class vectors; online aggregation uses the query's classes but must
re-aggregate the database per query. Section 4.3 proposes a third way: learn, once, the classes that are most often
among the top classes of example images of the collection's theme, and aggregate EVERY image (database and query)
over the class vectors of exactly that list. The descriptor is then computed offline and comparable across images,
since all are made of the same classes.

Learning (:func:`most_frequent_classes` here; :func:`camretrieval.extraction.fitting.learn_classes` runs the backbone): each example image's top-N classes, ranked by the
classifier's score (the logits of the GAP of the CAM-layer activations: the very ranking the descriptor takes its
N_c classes from, :func:`camretrieval.method.cams.top_classes`), counted over the images; the L most frequent are kept.
Ties (equal counts) go to the class with the better (smaller) sum of its 0-based ranks among those images' top-N,
then to the smaller class index: the same list on every run.

A list is saved as a small JSON file (:class:`ClassList`): class indices, their ImageNet names when the classifier
has ImageNet's 1000 classes, their counts, and the backbone, size, N and number of images it was learned with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camretrieval.constants import DEFAULT_LENGTH, DEFAULT_TOP  # noqa: F401 - N and L, re-exported (defined without torch)
from camretrieval.errors import CamRetrievalError
from camretrieval.method import cams
from camretrieval.method.cams import top_classes

FORMAT = "camretrieval-class-list"
FORMAT_VERSION = 1


class ClassListError(CamRetrievalError):
    """A class-list file that is unreadable, malformed, or made for another classifier."""


def most_frequent_classes(ranked: np.ndarray | torch.Tensor, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``length`` classes that occur most often in ``ranked`` (images x N, each row an image's top-N classes,
    best first), most frequent first; ties by smaller sum of ranks, then smaller class index.
    Returns (classes, counts), each of at most ``length`` entries (fewer when fewer distinct classes occur)."""
    ranked = np.asarray(ranked, dtype=np.int64)
    if ranked.ndim != 2 or ranked.size == 0:
        raise CamRetrievalError("learning a class list needs the top classes of at least one image")
    if length < 1:
        raise CamRetrievalError(f"the class list needs at least 1 class, got {length}")
    classes, inverse, counts = np.unique(ranked, return_inverse=True, return_counts=True)
    rank_sums = np.bincount(inverse.reshape(-1), weights=np.broadcast_to(np.arange(ranked.shape[1]), ranked.shape).reshape(-1))
    order = np.lexsort((classes, rank_sums, -counts))[:length]  # last key first: count, then rank sum, then index
    return classes[order], counts[order]


def learn_class_list(logits: np.ndarray | torch.Tensor, top: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The class list of images given their classifier scores (images x C): each image's ``top`` best-scoring
    classes (:func:`camretrieval.method.cams.top_classes`), the ``length`` most frequent kept (:func:`most_frequent_classes`)."""
    if top < 1:
        raise CamRetrievalError(f"the classes counted per image must be at least 1, got {top}")
    return most_frequent_classes(top_classes(torch.as_tensor(logits), top).cpu().numpy(), length)


@dataclass(frozen=True)
class ClassList:
    """A learned list of classes: ``classes`` (classifier indices, most frequent first) and how it was learned."""

    classes: tuple[int, ...]
    counts: tuple[int, ...]
    backbone: str
    size: int
    top: int
    n_images: int
    names: tuple[str, ...] | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
        check_class_indices(self.classes)
        if len(self.counts) != len(self.classes) or (self.names is not None and len(self.names) != len(self.classes)):
            raise ClassListError("a class list needs one count (and one name, if any) per class")

    def __len__(self) -> int:
        return len(self.classes)

    def check(self, backbone: Any) -> "ClassList":
        """Refuse a list learned with another classifier (a :class:`~camretrieval.extraction.backbones.Backbone`, or
        its name), or with indices that are not its classes (checked when given the backbone itself)."""
        name = backbone if isinstance(backbone, str) else backbone.name
        if self.backbone != name:
            raise ClassListError(
                f"the class list was learned with {self.backbone!r}, not {name!r}: learn one with "
                f"camretrieval learn-classes --backbone {name}"
            )
        if not isinstance(backbone, str):
            check_class_indices(self.classes, backbone.classifier_weight.shape[0])
        return self

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "backbone": self.backbone,
            "weights": self.weights,
            "size": self.size,
            "top": self.top,
            "n_images": self.n_images,
            "classes": [
                {"index": c, "count": n} | ({"name": self.names[i]} if self.names is not None else {})
                for i, (c, n) in enumerate(zip(self.classes, self.counts))
            ],
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, backbone: Any = None) -> "ClassList":
        """Read a list saved by :meth:`save`, checked against ``backbone`` when given (:meth:`check`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ClassListError(f"cannot read the class list {path}: {error}") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ClassListError(f"{path} is not a class list (made by camretrieval learn-classes)")
        if data.get("version") != FORMAT_VERSION:
            raise ClassListError(f"{path} is a class list of version {data.get('version')}; this camretrieval reads {FORMAT_VERSION}")
        entries = data.get("classes")
        try:
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise TypeError("'classes' must be a list of {index, count, name}")
            classes = [_integer(e.get("index"), "index") for e in entries]
            counts = [_integer(e.get("count", 0), "count") for e in entries]
            names = [str(e["name"]) for e in entries] if entries and all("name" in e for e in entries) else None
            listed = cls(
                classes, counts, str(data["backbone"]), _integer(data["size"], "size"), _integer(data["top"], "top"),
                _integer(data["n_images"], "n_images"), names, data.get("weights"),
            )
        except (KeyError, TypeError, ValueError, CamRetrievalError) as error:
            detail = f"missing {error}" if isinstance(error, KeyError) else str(error)
            raise ClassListError(f"the class list {path} is malformed: {detail}") from error
        return listed.check(backbone) if backbone is not None else listed


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {value!r}")
    return value


def check_class_indices(classes: Sequence[int], n_classes_total: int | None = None) -> None:
    """A usable list: at least one class, no repeats, indices in 0..C-1 (C known: the classifier's classes)."""
    cams.check_class_indices(list(classes), n_classes_total, error=ClassListError)
