"""camretrieval index --engine ray: a local Ray instance with 2 workers gives the single-process path's index."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from camretrieval import Index, PCAWhitening
from camretrieval.cli import main


@pytest.fixture(autouse=True)
def ray_installed() -> None:
    """Ray Data, or a skip saying it is missing. CI sets CAMRETRIEVAL_REQUIRE_RAY=1 (``.ci/run``), which turns that
    skip into a failure: a green CI run then shows the Ray engine was tested."""
    try:
        import ray.data  # noqa: F401
    except ImportError as error:
        reason = f"Ray Data not installed ({error}; pip install -e '.[test]')"
        if os.environ.get("CAMRETRIEVAL_REQUIRE_RAY") == "1":
            pytest.fail(f"{reason}; CAMRETRIEVAL_REQUIRE_RAY=1 requires it", pytrace=False)
        pytest.skip(reason)


SIZE = 96
SETTINGS = {"backbone": "efficientnet_lite0", "feature_layer": "head", "cam_layer": "head", "size": SIZE, "pooling": "cam"}


def test_ray_workers_write_the_shards_of_the_single_process_index(tmp_path, eth80_dir, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for obj in ["cup1", "horse2"]:
        for image in sorted((eth80_dir / obj).glob("*.jpg"))[:12]:
            shutil.copy(image, folder / f"{obj}_{image.name}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    pca = tmp_path / "pca.npz"
    PCAWhitening(16, settings=SETTINGS).fit(np.abs(np.random.default_rng(0).normal(size=(200, 1280)))).save(pca)
    common = ["--pca", str(pca), "--classes", "8", "--commit-every", "8", "--quiet"]

    assert main(["index", str(folder), str(tmp_path / "local"), *common, "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["index", str(folder), str(tmp_path / "ray"), *common, "--engine", "ray", "--ray-workers", "2"]) == 0
    output = capsys.readouterr()
    assert "skipped broken.jpg: not an image" in output.err and "skipped 1 of 25 files" in output.err
    assert "indexed 24 images (25 new files, 0 changed, 1 unusable" in output.out

    local, distributed = Index.open(tmp_path / "local"), Index.open(tmp_path / "ray")
    assert distributed.paths == local.paths and len(distributed) == 24
    # The same code on the same CPU; only the number of threads differs (1 per Ray worker), which changes the order
    # of float additions in the convolutions: differences of the order of float32 rounding.
    assert np.abs(distributed.descriptors - local.descriptors).max() < 1e-5
    for image in range(len(local)):  # float16 maps: a float32 rounding difference may move a value by one step
        assert np.allclose(distributed.maps.features.image(image), local.maps.features.image(image), atol=1e-2)
    shards = {p.name for p in (tmp_path / "ray" / "shards").iterdir()}
    # 25 files in chunks of 8 (broken.jpg sorts first: 7 + 8 + 8 + 1 images described): one shard per chunk.
    assert len(shards) == 4 and not any(name.endswith(".partial") for name in shards)

    # The index grows with either engine: a second run describes only the new image.
    shutil.copy(sorted((eth80_dir / "cup1").glob("*.jpg"))[20], folder / "new.jpg")
    assert main(["index", str(folder), str(tmp_path / "ray"), *common, "--engine", "ray", "--ray-workers", "2"]) == 0
    assert "indexed 1 images (1 new files, 0 changed, 0 unusable; 24 unchanged)" in capsys.readouterr().out
    assert len(Index.open(tmp_path / "ray")) == 25
