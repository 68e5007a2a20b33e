"""Shared fixtures. Tests on the real data in ../shared/data (or $CAMRETRIEVAL_DATA) are skipped, with the reason
shown by ``pytest -rs``, when that folder is absent; with CAMRETRIEVAL_REQUIRE_DATA=1 (set by ``.ci/run``) they fail
instead, so that a green CI run shows they ran."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("CAMRETRIEVAL_DATA", REPO.parent / "shared" / "data"))
# The calibration of the fastest forward pass (camretrieval.extraction.calibration) is cached here, not in the
# user's home: measured once per checkout, for the small sizes the tests use.
os.environ.setdefault("CAMRETRIEVAL_CACHE", str(REPO / ".pytest_cache" / "camretrieval"))
DATA_REQUIRED = os.environ.get("CAMRETRIEVAL_REQUIRE_DATA") == "1"


def _data_folder(name: str) -> Path:
    folder = DATA_ROOT / name
    if not folder.is_dir():
        reason = f"shared data {folder} not present (set CAMRETRIEVAL_DATA to the shared data folder)"
        if DATA_REQUIRED:
            pytest.fail(f"{reason}; CAMRETRIEVAL_REQUIRE_DATA=1 requires it", pytrace=False)
        pytest.skip(reason)
    return folder


@pytest.fixture(scope="session")
def eth80_dir() -> Path:
    return _data_folder("eth80-dev")


@pytest.fixture(scope="session")
def gnd_dir() -> Path:
    return _data_folder("gnd")


@pytest.fixture(scope="session")
def landmarks_dir() -> Path:
    return _data_folder("landmarks")


@pytest.fixture(scope="session")
def lite0():
    from camretrieval import load_backbone

    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def clutter_dir() -> Path:
    return _data_folder("clutter-dev")
