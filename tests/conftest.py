"""Shared fixtures. Tests on the real data in ../shared/data (or $CAMRETRIEVAL_DATA) are skipped, with the reason
shown by ``pytest -rs``, when that folder is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("CAMRETRIEVAL_DATA", REPO.parent / "shared" / "data"))


def _data_folder(name: str) -> Path:
    folder = DATA_ROOT / name
    if not folder.exists():
        pytest.skip(f"shared data {folder} not present (set CAMRETRIEVAL_DATA to the shared data folder)")
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
