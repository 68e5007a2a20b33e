"""PCA-whitening of class vectors (METHOD.md section 3), as a fit/transform estimator saved without pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from camretrieval.errors import CamRetrievalError

FORMAT = "camretrieval-pca-whitening"
FORMAT_VERSION = 1


class WhiteningFileError(CamRetrievalError):
    """A PCA-whitening file that is missing, unreadable, or made for other settings."""


class PCAWhitening:
    """``x -> (x - mean) @ P.T / sqrt(eigenvalues)``: projection onto the top ``dim`` principal components, each
    scaled to unit variance (what scikit-learn's ``PCA(whiten=True)`` computes).

    ``settings`` records how the training vectors were extracted (backbone, layer, image size, ...), so that the
    whitening is not applied to descriptors of another kind.

    As a scikit-learn estimator, it keeps its parameters (``dim``: the dimensions asked for, ``settings``) as given,
    and what :meth:`fit` learns in attributes ending in ``_``: ``mean_`` (K), ``components_`` (dim_ x K, the
    principal axes) and ``eigenvalues_`` (dim_); ``dim_``, the output dimension, is ``dim`` capped at K.
    """

    def __init__(self, dim: int = 512, settings: dict | None = None) -> None:
        self.dim = dim
        self.settings = dict(settings or {})
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
        """Learn the whitening from training vectors (N x K): the top class vectors of a separate collection."""
        vectors = np.asarray(vectors, dtype=np.float64)
        n_vectors, n_channels = vectors.shape
        dim = min(self.dim, n_channels)
        if n_vectors <= dim:
            raise CamRetrievalError(
                f"PCA-whitening to {dim} dimensions needs more than {dim} training vectors, got {n_vectors}: "
                "add images, take more class vectors per image (--npca), or lower --dim"
            )
        mean = vectors.mean(axis=0)
        centred = vectors - mean
        covariance = centred.T @ centred / (n_vectors - 1)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1][:dim]
        if eigenvalues[order[-1]] <= eigenvalues[order[0]] * 1e-12:
            raise CamRetrievalError(
                f"the training vectors span fewer than {dim} dimensions: add varied images or lower --dim"
            )
        # Fix each eigenvector's sign (largest entry positive) so that refitting on the same data gives the same file.
        components = eigenvectors[:, order].T
        signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
        self.mean_, self.components_, self.eigenvalues_ = mean, components * signs[:, None], eigenvalues[order]
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
        projection = torch.as_tensor(self.components_ / np.sqrt(self.eigenvalues_)[:, None], dtype=vectors.dtype)
        mean = torch.as_tensor(self.mean_, dtype=vectors.dtype)
        return (vectors - mean.to(vectors.device)) @ projection.to(vectors.device).T

    def save(self, file: str | Path | BinaryIO) -> None:
        """Write a ``.npz`` file (NumPy arrays and a JSON header; readable without pickle)."""
        self._check_fitted()
        if isinstance(file, (str, Path)):
            with open(file, "wb") as opened:  # an open file keeps NumPy from appending '.npz' to the user's path
                return self.save(opened)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "dim": self.dim_, "settings": self.settings}
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
        try:
            with np.load(path, allow_pickle=False) as arrays:
                header = json.loads(str(arrays["header"]))
                mean, components, eigenvalues = arrays["mean"], arrays["components"], arrays["eigenvalues"]
        except (OSError, ValueError, KeyError) as error:
            raise WhiteningFileError(f"{path} is not a camretrieval PCA-whitening file ({error})") from error
        if header.get("format") != FORMAT:
            raise WhiteningFileError(f"{path} is not a camretrieval PCA-whitening file")
        if header.get("version") != FORMAT_VERSION:
            raise WhiteningFileError(
                f"{path} has format version {header.get('version')}, this camretrieval reads {FORMAT_VERSION}: "
                "learn it again with camretrieval fit-pca"
            )
        whitening = cls(dim=header["dim"], settings=header["settings"])
        whitening.mean_, whitening.components_, whitening.eigenvalues_ = mean, components, eigenvalues
        return whitening

    def _check_fitted(self) -> None:
        if self.mean_ is None:
            raise RuntimeError("PCAWhitening is not fitted: call fit() or load() first")
