"""Multi-scale descriptors (``--scales``) against a plain computation, the settings that record them, and the
calibration of the fastest forward pass."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from camretrieval import Describer, ExtractionSettings, pooled_vectors
from camretrieval.errors import CamRetrievalError
from camretrieval.extraction import calibration
from camretrieval.method.feature_maps import FeatureMaps, crop_maps
from reference import reference_gem, reference_listed_class_vectors, reference_sum


def _maps(seed: int, height: int, width: int, channels: int = 6) -> FeatureMaps:
    generator = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(2, channels, height, width, generator=generator, dtype=torch.float64))
    return FeatureMaps(features, features)


def _two_scales() -> FeatureMaps:
    maps = _maps(1, 6, 8)
    small = _maps(2, 3, 4)
    small.input_scale = 0.5
    maps.other_scales = (small,)
    return maps


def test_class_weighted_multiscale_is_the_mean_of_each_scales_class_vectors_for_the_same_classes():
    maps = _two_scales()
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    bias = torch.randn(10, generator=generator, dtype=torch.float64)
    pooled = pooled_vectors(maps, "cam", weight, bias, 3)
    scales = (maps, maps.other_scales[0])
    for image in range(2):
        # The classes: the top 3 by the logits (GAP then the linear layer) averaged over the two scales.
        logits = np.mean([weight.numpy() @ s.cam_activations[image].numpy().mean(axis=(1, 2)) + bias.numpy()
                          for s in scales], axis=0)
        classes = list(np.argsort(-logits, kind="stable")[:3])
        assert pooled.classes[image].tolist() == classes
        per_scale = [
            reference_listed_class_vectors(s.features[image].numpy(), s.cam_activations[image].numpy(), weight.numpy(), classes)
            for s in scales
        ]
        mean = (per_scale[0] + per_scale[1]) / 2
        expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        assert pooled.vectors[image].numpy() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("pooling", "plain"), [("sum", reference_sum), ("gem", reference_gem)])
def test_baseline_multiscale_is_the_normalised_mean_of_each_scales_normalised_vector(pooling, plain):
    maps = _two_scales()
    pooled = pooled_vectors(maps, pooling, torch.zeros(4, 6, dtype=torch.float64), None, 1)
    for image in range(2):
        vectors = [plain(s.features[image].numpy()) for s in (maps, maps.other_scales[0])]
        mean = sum(v / np.linalg.norm(v) for v in vectors) / 2
        assert pooled.vectors[image, 0].numpy() == pytest.approx(mean / np.linalg.norm(mean), rel=1e-9)


def test_rmac_multiscale_keeps_the_regions_of_every_scale():
    maps = _two_scales()
    weight = torch.zeros(4, 6, dtype=torch.float64)
    one = pooled_vectors(FeatureMaps(maps.features, maps.cam_activations), "rmac", weight, None, 1).vectors
    other = pooled_vectors(maps.other_scales[0], "rmac", weight, None, 1).vectors
    both = pooled_vectors(maps, "rmac", weight, None, 1).vectors
    assert torch.equal(both, torch.cat([one, other], dim=1))


def test_a_box_is_cropped_at_every_scale_in_that_scales_pixels():
    maps = _two_scales()  # 6 x 8 cells at scale 1, 3 x 4 at scale 0.5; stride 32 at both
    cropped = crop_maps(maps, (64, 32, 192, 128), (32, 32))
    assert tuple(cropped.features.shape[-2:]) == (3, 4)  # rows 1-3, columns 2-5
    small = cropped.other_scales[0]
    assert tuple(small.features.shape[-2:]) == (2, 2)  # the box halved: (32, 16, 96, 64): rows 0-1, columns 1-2
    assert torch.equal(small.features, maps.other_scales[0].features[..., 0:2, 1:3])


def test_scales_are_recorded_and_checked():
    settings = ExtractionSettings(scales=(0.5, 1, 0.707))
    assert settings.scales == (1.0, 0.707, 0.5)
    assert settings.to_dict()["scales"] == [1.0, 0.707, 0.5]
    assert "scales" not in ExtractionSettings().to_dict()  # single-scale records what indexes recorded before
    assert ExtractionSettings.from_dict(settings.to_dict()) == settings
    for wrong in [(0.5,), (1, 1.5), (1, 0), (1, -0.5), ("a",)]:
        with pytest.raises(CamRetrievalError, match="scales"):
            ExtractionSettings(scales=wrong)


def test_describer_multiscale_forwards_each_scale_and_a_whitening_must_match(lite0, landmarks_dir):
    from camretrieval import PCAWhitening
    from camretrieval.extraction.images import find_images
    from camretrieval.method.whitening import WhiteningFileError

    paths = [landmarks_dir / p for p in find_images(landmarks_dir)[:2]]
    single = Describer(lite0, size=128)
    multi = Describer(lite0, size=128, scales=(1, 0.5))
    maps = multi.feature_maps(torch.stack([single.preprocess(single.load(paths[0]))]))
    assert len(maps.other_scales) == 1
    assert maps.other_scales[0].features.shape[-1] == pytest.approx(maps.features.shape[-1] / 2, abs=1)
    assert multi.describe(paths).shape == single.describe(paths).shape
    assert not np.allclose(multi.describe(paths), single.describe(paths))
    whitening = PCAWhitening(4, single.settings.to_dict()).fit(np.random.default_rng(0).normal(size=(20, 1280)))
    with pytest.raises(WhiteningFileError, match="scales"):
        Describer(lite0, size=128, scales=(1, 0.5), whitening=whitening)


def test_cli_refuses_bad_scales_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "camretrieval.cli", "index", str(tmp_path), str(tmp_path / "i"), "--scales", "2,1"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "scales" in result.stderr and "Traceback" not in result.stderr


def test_a_scale_smaller_than_one_feature_cell_is_refused(lite0):
    with pytest.raises(CamRetrievalError, match="smaller than one feature cell"):
        Describer(lite0, size=224, scales=(1, 0.1))  # 22 px: less than lite0's 32 px cell
    assert Describer(lite0, size=224, scales=(1, 0.15)).scales == (1.0, 0.15)  # 33.6 px: one cell


def test_calibration_measures_once_and_caches(lite0, tmp_path, monkeypatch):
    monkeypatch.setenv("CAMRETRIEVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "BATCH_SIZES", (1, 2))
    monkeypatch.setattr(calibration, "MIN_SECONDS", 0.0)
    calls = []
    for name in ("time_forward", "time_forward_in_processes"):
        real = getattr(calibration, name)
        monkeypatch.setattr(calibration, name, lambda *args, real=real: calls.append(args) or real(*args))
    device = torch.device("cpu")
    best = calibration.fastest_forward(lite0, 64, device, progress=False)
    measured = len(calls)
    # batches 1 and 2 in channels-last and without it, one process per core at batches 1 and 2 where forking is
    # possible; then the 3 fastest once more
    in_processes = 2 if calibration.forward_processes_possible(device) else 0
    assert measured == 4 + in_processes + calibration.FINALISTS
    assert best.batch_size in (1, 2) and best.seconds_per_image > 0
    cached = json.loads((tmp_path / "calibration.json").read_text())
    assert list(cached.values()) == [{"batch_size": best.batch_size, "channels_last": best.channels_last,
                                      "seconds_per_image": best.seconds_per_image, "processes": best.processes}]
    assert calibration.fastest_forward(lite0, 64, device, progress=False) == best
    assert len(calls) == measured  # the second time from the cache
    calibration.fastest_forward(lite0, 96, device, progress=False)  # another size: measured again
    assert len(calls) == 2 * measured


@pytest.mark.skipif(not calibration.forward_processes_possible(torch.device("cpu")), reason="needs 2 cores and fork")
def test_forward_passes_in_one_process_per_core_describe_alike(lite0, eth80_dir, tmp_path, monkeypatch):
    """Calibrated to one single-threaded process per core, the files are decoded, forwarded and described in those
    processes: the same descriptors (to float rounding: one thread sums in another order) and the same failures."""
    from camretrieval.extraction.images import find_images

    monkeypatch.setenv("CAMRETRIEVAL_CACHE", str(tmp_path))
    describer = Describer(lite0, size=64)
    key = calibration.calibration_key(lite0, 64, describer.device, "float32")
    paths = find_images(eth80_dir)[:5] + ["missing.jpg"]
    results = {}
    for processes in (1, 2):
        (tmp_path / "calibration.json").write_text(json.dumps({key: {
            "batch_size": 2, "channels_last": True, "seconds_per_image": 0.01, "processes": processes}}))
        results[processes] = describer.describe_files(paths, eth80_dir, progress=False)
    (one, done_one, failed_one), (two, done_two, failed_two) = results[1], results[2]
    assert done_one == done_two == [0, 1, 2, 3, 4]
    assert [f.path for f in failed_one] == [f.path for f in failed_two] == ["missing.jpg"]
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_describer_uses_the_calibrated_batch_size(lite0, eth80_dir, tmp_path, monkeypatch):
    from camretrieval.extraction.images import find_images

    monkeypatch.setenv("CAMRETRIEVAL_CACHE", str(tmp_path))
    describer = Describer(lite0, size=64)
    key = calibration.calibration_key(lite0, 64, describer.device, "float32")
    (tmp_path / "calibration.json").write_text(json.dumps({key: {"batch_size": 3, "channels_last": False,
                                                                 "seconds_per_image": 0.01}}))
    paths = find_images(eth80_dir)[:7]  # all 256 x 256: one shape, so the batches are full
    sizes = [len(indices) for indices, _ in describer.iterate_files(paths, eth80_dir, workers=0, progress=False)]
    assert sizes == [3, 3, 1]
    assert describer.memory_format == torch.contiguous_format
