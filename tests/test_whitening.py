from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

from camretrieval.errors import CamRetrievalError
from camretrieval.method.whitening import PCAWhitening, WhiteningFileError


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


def test_too_few_vectors_is_a_clear_error():
    with pytest.raises(CamRetrievalError, match="needs more than 8 training vectors"):
        PCAWhitening(dim=8).fit(np.random.default_rng(0).normal(size=(5, 20)))


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
