"""PCA-whitening of class vectors (METHOD.md section 3), as a fit/transform estimator saved without pickle."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from camretrieval.errors import CamRetrievalError

FORMAT = "camretrieval-pca-whitening"
FORMAT_VERSION = 1
# The shrinkage of a whitening learned from few images, or on the searched collection itself: the best of those
# measured, and never below no whitening, on eth80-dev and clutter-dev from 30 images to all (docs/method.md,
# benchmarks/whitening_size.py).
DEFAULT_SHRINKAGE = 3.0


class WhiteningFileError(CamRetrievalError):
    """A PCA-whitening file that is missing, unreadable, or made for other settings."""


class PCAWhitening:
    """``x -> (x - mean) @ P.T / sqrt(eigenvalues)``: projection onto the top ``dim`` principal components, each
    scaled to unit variance (what scikit-learn's ``PCA(whiten=True)`` computes).

    ``shrinkage`` s > 0 regularises it for few training vectors: every eigenvalue is raised by s times their mean
    (``lambda_i + s * trace / K``, Tikhonov-style shrinkage towards a scaled identity), so that directions estimated
    from few vectors are not blown up, and the output keeps ``dim`` dimensions even where the data spans fewer
    (docs/method.md, "Whitening from few images", measured by benchmarks/whitening_size.py). s = 0 is the paper's.

    ``settings`` records how the training vectors were extracted (backbone, layer, image size, ...), so that the
    whitening is not applied to descriptors of another kind.

    As a scikit-learn estimator, it keeps its parameters (``dim``: the dimensions asked for, ``settings``) as given,
    and what :meth:`fit` learns in attributes ending in ``_``: ``mean_`` (K), ``components_`` (dim_ x K, the
    principal axes) and ``eigenvalues_`` (dim_, shrinkage included); ``dim_``, the output dimension, is ``dim``
    capped at what the data supports (:meth:`fit`).
    """

    def __init__(self, dim: int = 512, settings: dict | None = None, shrinkage: float = 0.0) -> None:
        if not (np.isfinite(shrinkage) and shrinkage >= 0):
            raise CamRetrievalError(f"the whitening's shrinkage must be a number >= 0, got {shrinkage}")
        self.dim = dim
        self.settings = dict(settings or {})
        self.shrinkage = float(shrinkage)
        self.mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.eigenvalues_: np.ndarray | None = None

    @property
    def input_dim(self) -> int:
        self._check_fitted()
        return self.mean_.shape[0]

    @property
    def dim_(self) -> int:
        """The output dimension of the fitted whitening."""
        self._check_fitted()
        return len(self.eigenvalues_)

    def fit(self, vectors: np.ndarray) -> "PCAWhitening":
        """Learn the whitening from training vectors (N x K): the top class vectors of a collection.

        The output dimension ``dim_`` is ``dim`` capped at what the data supports: at most K and, without shrinkage,
        at most the number of directions in which the N vectors vary (N - 1, or fewer for repeated vectors;
        :func:`supported_dim` gives that cap before any vector is computed)."""
        vectors = np.asarray(vectors, dtype=np.float64)
        n_vectors, n_channels = vectors.shape
        if n_vectors < 2:
            raise CamRetrievalError(f"PCA-whitening needs at least 2 training vectors, got {n_vectors}: add images")
        mean = vectors.mean(axis=0)
        centred = vectors - mean
        covariance = centred.T @ centred / (n_vectors - 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clip(min=0)  # a covariance has none below 0; rounding can make tiny ones negative
        order = np.argsort(eigenvalues)[::-1]
        if eigenvalues[order[0]] <= 0:
            raise CamRetrievalError("the training vectors are all the same: add varied images")
        if self.shrinkage > 0:
            order = order[: min(self.dim, n_channels)]
        else:
            order = order[: supported_dim(self.dim, n_vectors, n_channels)]
            order = order[eigenvalues[order] > eigenvalues[order[0]] * 1e-10]  # directions the data really spans
        floor = self.shrinkage * eigenvalues.sum() / n_channels
        dim = len(order)
        # Fix each eigenvector's sign (largest entry positive) so that refitting on the same data gives the same file.
        components = eigenvectors[:, order].T
        signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
        self.mean_, self.components_, self.eigenvalues_ = mean, components * signs[:, None], eigenvalues[order] + floor
        return self

    def same_as(self, other: "PCAWhitening") -> bool:
        """Whether two whitenings transform every vector identically (e.g. loaded from copies of one file)."""
        self._check_fitted()
        other._check_fitted()
        return all(
            np.array_equal(mine, theirs)
            for mine, theirs in [
                (self.mean_, other.mean_), (self.components_, other.components_), (self.eigenvalues_, other.eigenvalues_)
            ]
        )

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        """Whiten vectors (... x K) -> (... x dim). Not normalised: aggregation l2-normalises afterwards."""
        self._check_fitted()
        if vectors.shape[-1] != self.input_dim:
            raise WhiteningFileError(
                f"PCA-whitening expects {self.input_dim}-d vectors, got {vectors.shape[-1]}-d ones: "
                "it was learned for another backbone or layer"
            )
        mean, projection = self._tensors(vectors.dtype, vectors.device)
        return (vectors - mean) @ projection

    def _tensors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and the whitening projection (K x dim, components / sqrt(eigenvalues), transposed) as tensors,
        made once per dtype and device: a search or an extraction transforms thousands of small batches."""
        fitted = (self.mean_, self.components_, self.eigenvalues_)
        cache = self.__dict__.setdefault("_tensor_cache", {})
        entry = cache.get((dtype, device))
        if entry is None or any(a is not b for a, b in zip(entry[0], fitted)):  # refitted since: made again
            projection = torch.as_tensor(self.components_ / np.sqrt(self.eigenvalues_)[:, None], dtype=dtype)
            mean = torch.as_tensor(self.mean_, dtype=dtype)
            entry = cache[(dtype, device)] = (fitted, mean.to(device), projection.T.contiguous().to(device))
        return entry[1], entry[2]

    def save(self, file: str | Path | BinaryIO) -> None:
        """Write a ``.npz`` file (NumPy arrays and a JSON header; readable without pickle)."""
        self._check_fitted()
        if isinstance(file, (str, Path)):
            with open(file, "wb") as opened:  # an open file keeps NumPy from appending '.npz' to the user's path
                return self.save(opened)
        header = {
            "format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim_, "settings": self.settings,
            "shrinkage": self.shrinkage,  # the stored eigenvalues include it: files stay readable as before
        }
        np.savez(
            file,
            header=np.array(json.dumps(header)),
            mean=self.mean_,
            components=self.components_,
            eigenvalues=self.eigenvalues_,
        )

    @classmethod
    def load(cls, path: str | Path) -> "PCAWhitening":
        path = Path(path)
        if not path.is_file():
            raise WhiteningFileError(
                f"PCA-whitening file not found: {path}. Learn one with: camretrieval fit-pca IMAGES_DIR {path}"
            )
        learn_again = f"learn it again with camretrieval fit-pca IMAGES_DIR {path}"
        try:
            with np.load(path, allow_pickle=False) as arrays:
                header = json.loads(str(arrays["header"]))
                mean, components, eigenvalues = arrays["mean"], arrays["components"], arrays["eigenvalues"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:  # not a zip, truncated, ...
            raise WhiteningFileError(f"{path} is not a camretrieval PCA-whitening file, or is damaged ({error}): {learn_again}") from error
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise WhiteningFileError(f"{path} is not a camretrieval PCA-whitening file: {learn_again}")
        if header.get("version") != FORMAT_VERSION:
            raise WhiteningFileError(
                f"{path} has format version {header.get('version')}, this camretrieval reads {FORMAT_VERSION}: "
                f"{learn_again}"
            )
        problem = _whitening_problem(header, mean, components, eigenvalues)
        if problem:
            raise WhiteningFileError(f"{path} is damaged ({problem}): {learn_again}")
        whitening = cls(dim=header["dim"], settings=header["settings"], shrinkage=header.get("shrinkage", 0.0))
        whitening.mean_, whitening.components_, whitening.eigenvalues_ = mean, components, eigenvalues
        return whitening

    def _check_fitted(self) -> None:
        if self.mean_ is None:
            raise RuntimeError("PCAWhitening is not fitted: call fit() or load() first")


def supported_dim(dim: int, n_vectors: int, n_channels: int) -> int:
    """The dimensions a PCA-whitening to ``dim`` can have when learned from ``n_vectors`` vectors of ``n_channels``:
    ``n_vectors`` vectors vary in at most ``n_vectors - 1`` directions."""
    return max(1, min(dim, n_channels, n_vectors - 1))


def _whitening_problem(header: dict, mean: np.ndarray, components: np.ndarray, eigenvalues: np.ndarray) -> str | None:
    """What makes a PCA-whitening file's content unusable, or None: arrays of inconsistent shapes, values that are
    not finite, eigenvalues that are not positive (a whitening divides by their square roots), a malformed header."""
    if not isinstance(header.get("settings"), dict) or not isinstance(header.get("dim"), int):
        return "its header lacks the settings or the dimension"
    if mean.ndim != 1 or components.ndim != 2 or eigenvalues.ndim != 1:
        return "arrays of the wrong rank"
    if components.shape != (len(eigenvalues), len(mean)) or len(eigenvalues) == 0:
        return f"components of shape {components.shape} for {len(eigenvalues)} eigenvalues of {len(mean)}-d vectors"
    if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in (mean, components, eigenvalues)):
        return "values that are not finite numbers"
    if (eigenvalues <= 0).any():
        return "eigenvalues that are not positive"
    return None
