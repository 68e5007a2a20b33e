"""The baselines of the paper's tables (METHOD.md section 8) against plain computations of their formulas, and the
``pooling`` option through the describer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camretrieval import Describer, PCAWhitening, pooled_vectors
from camretrieval.method.feature_maps import FeatureMaps
from camretrieval.method.pooling import (
    crow_pooling,
    gem_pooling,
    max_pooling,
    regional_max_pooling,
    rmac_regions,
    spatial_weights,
    sum_pooling,
)
from reference import reference_crow, reference_gem, reference_mac, reference_sum


@pytest.fixture
def features() -> torch.Tensor:
    # Post-ReLU-like maps: non-negative with zeros, two images, 5 channels, 4 x 6 cells.
    return torch.relu(torch.randn(2, 5, 4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64))


@pytest.mark.parametrize(
    ("batched", "plain"),
    [(sum_pooling, reference_sum), (crow_pooling, reference_crow), (max_pooling, reference_mac), (gem_pooling, reference_gem)],
)
def test_global_poolings_against_their_formulas(features, batched, plain):
    ours = batched(features)
    for image in range(len(features)):
        assert ours[image].numpy() == pytest.approx(plain(features[image].numpy()), rel=1e-9)


def test_crow_spatial_weights_by_hand():
    # Channel sums: [[3, 0], [0, 4]] -> divided by their l2 norm 5 -> square root.
    features = torch.tensor([[[[1.0, 0.0], [0.0, 4.0]], [[2.0, 0.0], [0.0, 0.0]]]])
    expected = torch.tensor([[[0.6**0.5, 0.0], [0.0, 0.8**0.5]]])
    assert torch.allclose(spatial_weights(features), expected)


def test_gem_with_p_1_is_average_and_large_p_tends_to_max(features):
    assert torch.allclose(gem_pooling(features, p=1.0, eps=0.0), features.mean(dim=(2, 3)))
    assert torch.allclose(gem_pooling(features, p=200.0), max_pooling(features), rtol=2e-2)


def test_rmac_grid_square_map():
    # 12 x 12: level 1 one 12-cell region; level 2 side 8, 2 x 2 from edge to edge; level 3 side 6, 3 x 3.
    regions = rmac_regions(12, 12)
    assert regions[0] == (0, 0, 12, 12)
    assert regions[1:5] == [(0, 0, 8, 8), (0, 4, 8, 12), (4, 0, 12, 8), (4, 4, 12, 12)]
    assert regions[5:] == [(y, x, y + 6, x + 6) for y in (0, 3, 6) for x in (0, 3, 6)]


def test_rmac_grid_landscape_map_adds_regions_along_the_long_side():
    # 10 x 16: side 10 at level 1; one extra region (overlap (10 - 6) / 10 = 0.4 exactly), starting at 0 and 6.
    regions = rmac_regions(10, 16)
    assert regions[:2] == [(0, 0, 10, 10), (0, 6, 10, 16)]
    level2 = [r for r in regions if r[2] - r[0] == 6]  # side floor(20 / 3) = 6: 2 rows x 3 columns
    assert level2 == [(y, x, y + 6, x + 6) for y in (0, 4) for x in (0, 5, 10)]
    assert all(0 <= y1 < y2 <= 10 and 0 <= x1 < x2 <= 16 for y1, x1, y2, x2 in regions)
    portrait = rmac_regions(16, 10)
    assert sorted(portrait) == sorted((x1, y1, x2, y2) for y1, x1, y2, x2 in regions)


def test_regional_max_pooling_is_mac_of_each_region(features):
    regions = rmac_regions(4, 6)
    pooled = regional_max_pooling(features)
    assert pooled.shape == (2, len(regions), 5)
    for r, (y1, x1, y2, x2) in enumerate(regions):
        for image in range(2):
            assert pooled[image, r].numpy() == pytest.approx(reference_mac(features[image, :, y1:y2, x1:x2].numpy()))


def test_pooled_vectors_are_l2_normalised_and_rmac_has_one_per_region(features):
    maps = FeatureMaps(features.float(), features.float())
    weight, bias = torch.randn(7, 5), torch.zeros(7)
    for pooling in ("sum", "sum-cw", "crow", "mac", "gem"):
        vectors = pooled_vectors(maps, pooling, weight, bias, n_classes=3)
        assert vectors.vectors.shape == (2, 1, 5) and vectors.classes is None
        assert torch.allclose(vectors.vectors.norm(dim=-1), torch.ones(2, 1))
    assert pooled_vectors(maps, "cam", weight, bias, n_classes=3).vectors.shape == (2, 3, 5)
    assert pooled_vectors(maps, "rmac", weight, bias, n_classes=3).vectors.shape == (2, len(rmac_regions(4, 6)), 5)
    sum_cw = pooled_vectors(maps, "sum-cw", weight, bias, 1).vectors[0, 0].double()
    from camretrieval.method.pooling import channel_weights

    expected = sum_pooling(features[:1]) * channel_weights(features[:1])
    assert torch.allclose(sum_cw, (expected / expected.norm())[0], atol=1e-6)


def test_describer_pooling_option_and_whitening_must_match(lite0, landmarks_dir):
    photos = sorted(landmarks_dir.glob("*.jpg"))[:2]
    raw = Describer(lite0, size=128, pooling="sum").describe(photos)
    assert raw.shape == (2, 1280) and np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)
    rmac = Describer(lite0, size=128, pooling="rmac")
    vectors = rmac.image_vectors(photos[0]).vectors
    # Without whitening, R-MAC is the l2-normalised sum of its l2-normalised regional maxima.
    assert rmac.describe(photos[:1])[0] == pytest.approx(
        torch.nn.functional.normalize(vectors.sum(dim=1), dim=-1)[0].numpy(), abs=1e-6
    )
    whitening = PCAWhitening(8, Describer(lite0, size=128, pooling="mac").settings.to_dict())
    whitening.fit(np.abs(np.random.default_rng(0).normal(size=(20, 1280))))
    assert Describer(lite0, size=128, pooling="mac", whitening=whitening).describe(photos).shape == (2, 8)
    with pytest.raises(Exception, match="pooling: learned with 'mac', used with 'cam'"):
        Describer(lite0, size=128, whitening=whitening)
    with pytest.raises(Exception, match="unknown pooling 'spoc'"):
        Describer(lite0, pooling="spoc")
