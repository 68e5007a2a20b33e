from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from camretrieval.errors import CamRetrievalError
from camretrieval.method.whitening import PCAWhitening, WhiteningFileError, supported_dim


@pytest.fixture
def training():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 10)) @ rng.normal(size=(10, 10)) + rng.normal(size=10)


def test_whitening_matches_svd_and_has_identity_covariance(training):
    whitening = PCAWhitening(dim=6).fit(training)
    whitened = whitening.transform(torch.from_numpy(training)).numpy()
    # Independent computation: SVD of the centred data; whitened scores are U * sqrt(n - 1), up to each sign.
    centred = training - training.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, :6] * np.sqrt(len(training) - 1)
    signs = np.sign((whitened * expected).sum(axis=0))
    assert whitened == pytest.approx(expected * signs, abs=1e-8)
    assert np.cov(whitened, rowvar=False) == pytest.approx(np.eye(6), abs=1e-8)
    assert whitening.eigenvalues_ == pytest.approx(s[:6] ** 2 / (len(training) - 1))


def test_dim_is_capped_at_input_channels(training):
    assert PCAWhitening(dim=512).fit(training).dim_ == 10


def test_few_vectors_cap_the_dimension_at_what_they_span():
    """5 vectors vary in 4 directions: a whitening to 8 dimensions has 4 (issue 11: a note, not an error), and
    still whitens its own training vectors (unit variance in each of its dimensions)."""
    training = np.random.default_rng(0).normal(size=(5, 20))
    whitening = PCAWhitening(dim=8).fit(training)
    assert whitening.dim == 8 and whitening.dim_ == 4 == supported_dim(8, 5, 20)
    whitened = whitening.transform(torch.from_numpy(training)).numpy()
    assert whitened.shape == (5, 4)
    assert np.allclose(whitened.var(axis=0, ddof=1), 1.0)
    repeated = np.repeat(training[:3], 4, axis=0)  # 12 vectors, 3 distinct: 2 directions
    assert PCAWhitening(dim=8).fit(repeated).dim_ == 2


def test_too_few_or_identical_vectors_are_clear_errors():
    with pytest.raises(CamRetrievalError, match="at least 2 training vectors"):
        PCAWhitening(dim=8).fit(np.ones((1, 20)))
    with pytest.raises(CamRetrievalError, match="all the same"):
        PCAWhitening(dim=8).fit(np.ones((6, 20)))


def test_save_load_round_trip_without_pickle(tmp_path, training):
    whitening = PCAWhitening(dim=4, settings={"backbone": "efficientnet_lite0", "size": 512}).fit(training)
    path = tmp_path / "pca.npz"
    whitening.save(path)
    with np.load(path, allow_pickle=False) as arrays:  # readable with pickle disabled
        assert json.loads(str(arrays["header"]))["settings"]["size"] == 512
    loaded = PCAWhitening.load(path)
    x = torch.from_numpy(training[:7])
    assert torch.equal(loaded.transform(x), whitening.transform(x))
    assert loaded.settings == whitening.settings and loaded.dim == 4


def test_save_keeps_the_users_file_name(tmp_path, training):
    PCAWhitening(dim=4).fit(training).save(tmp_path / "whitening.pca")
    assert (tmp_path / "whitening.pca").is_file()


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(WhiteningFileError, match="camretrieval fit-pca"):
        PCAWhitening.load(tmp_path / "nope.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(WhiteningFileError, match="not a camretrieval PCA-whitening file"):
        PCAWhitening.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(WhiteningFileError, match="not a camretrieval PCA-whitening file"):
        PCAWhitening.load(tmp_path / "other.npz")
    assert zipfile.is_zipfile(tmp_path / "other.npz")


def test_wrong_input_dimension_is_a_clear_error(training):
    whitening = PCAWhitening(dim=4).fit(training)
    with pytest.raises(WhiteningFileError, match="another backbone or layer"):
        whitening.transform(torch.zeros(2, 11, dtype=torch.float64))


def test_shrinkage_raises_every_eigenvalue_by_its_share_of_the_mean(training):
    """lambda_i + s * trace / K over all K eigenvalues, as a plain eigen-decomposition computes them; the output keeps
    ``dim`` dimensions even beyond the directions the few training vectors span."""
    few = training[:6]
    whitening = PCAWhitening(dim=8, shrinkage=3.0).fit(few)
    covariance = np.cov(few, rowvar=False)
    eigenvalues = np.sort(np.linalg.eigvalsh(covariance))[::-1].clip(min=0)
    floor = 3.0 * np.trace(covariance) / covariance.shape[0]
    assert whitening.dim_ == 8 and whitening.eigenvalues_ == pytest.approx(eigenvalues[:8] + floor)
    x = torch.from_numpy(few)
    expected = (few - few.mean(axis=0)) @ whitening.components_.T / np.sqrt(eigenvalues[:8] + floor)
    assert np.allclose(whitening.transform(x).numpy(), expected)
    with pytest.raises(CamRetrievalError, match="shrinkage"):
        PCAWhitening(shrinkage=-1)


def test_shrinkage_is_saved_and_the_file_stays_readable_as_before(training, tmp_path):
    whitening = PCAWhitening(dim=4, shrinkage=3.0).fit(training[:5])
    whitening.save(tmp_path / "pca.npz")
    loaded = PCAWhitening.load(tmp_path / "pca.npz")
    assert loaded.shrinkage == 3.0 and np.array_equal(loaded.eigenvalues_, whitening.eigenvalues_)
    x = torch.from_numpy(training[:3])
    assert torch.equal(loaded.transform(x), whitening.transform(x))


def test_fit_whitening_regularises_only_when_the_images_are_too_few():
    from camretrieval.extraction.fitting import whitening_shrinkage
    from camretrieval.method.whitening import DEFAULT_SHRINKAGE

    assert whitening_shrinkage(512, 30, 1) == DEFAULT_SHRINKAGE  # 30 vectors for 512 dimensions
    assert whitening_shrinkage(512, 200, 3) == 0.0  # 600 vectors: the paper's plain whitening
    assert whitening_shrinkage(512, 30, 1, pooling="rmac") == 0.0  # many regions per image
