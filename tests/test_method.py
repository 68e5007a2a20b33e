"""Each equation of METHOD.md sections 1-3 against hand-checked values and the plain reference in reference.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from camretrieval.method.aggregation import aggregate
from camretrieval.method.cams import class_activation_maps, class_logits, normalize_cams, resize_cams, top_classes
from camretrieval.method.feature_maps import FeatureMaps
from camretrieval.method.pooling import channel_weights, class_vectors, class_weighted_vectors, weighted_sum_pooling
from camretrieval.method.whitening import PCAWhitening
from reference import reference_class_vectors, reference_descriptor


def test_channel_weights_by_hand():
    # Channel 0: 2 of 4 entries positive (Q=0.5); channel 1: 1 of 4 (Q=0.25); channel 2: none (Q=0 -> CW=0).
    features = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]], [[0.0, 0.0], [0.0, 3.0]], [[0.0, -2.0], [0.0, 0.0]]]])
    expected = [math.log(0.75 / 0.5), math.log(0.75 / 0.25), 0.0]
    assert channel_weights(features)[0].tolist() == pytest.approx(expected)


def test_channel_weights_all_zero_image_is_zero_not_nan():
    weights = channel_weights(torch.zeros(2, 5, 3, 3))
    assert torch.equal(weights, torch.zeros(2, 5))


def test_cam_equation_1_by_hand():
    # Two channels, two classes: CAM_c = sum_k W[c, k] A_k.
    activations = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # 1 x 2 channels x 1 x 2
    weight = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    cams = class_activation_maps(activations, weight, torch.tensor([[1, 0]]))
    assert cams[0, 0].tolist() == [[0.5 * 1 + 2 * 3, 0.5 * 2 + 2 * 0]]
    assert cams[0, 1].tolist() == [[1 - 3, 2 - 0]]


def test_normalize_cams_scales_by_max_and_clips_negatives():
    cams = torch.tensor([[[[2.0, -1.0], [4.0, 1.0]], [[-3.0, -1.0], [-2.0, -5.0]], [[0.0, 0.0], [0.0, 0.0]]]])
    normalized = normalize_cams(cams)
    assert normalized[0, 0].tolist() == [[0.5, 0.0], [1.0, 0.25]]
    # No positive evidence anywhere (max <= 0): the map is all zeros, not sign-flipped.
    assert normalized[0, 1].abs().sum() == 0 and normalized[0, 2].abs().sum() == 0


def test_resize_cams_bilinear_half_pixel_centres():
    cams = torch.tensor([[[[0.0, 1.0]]]])
    assert resize_cams(cams, (1, 4))[0, 0, 0].tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
    assert resize_cams(cams, (1, 2)) is cams


def test_top_classes_follow_softmax_order():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0], [5.0, 4.0, 6.0, -2.0]])
    assert top_classes(logits, 3).tolist() == [[1, 3, 0], [2, 0, 1]]
    assert top_classes(logits, 10).shape == (2, 4)


def test_class_vectors_equation_4_against_loops():
    generator = torch.Generator().manual_seed(0)
    features = torch.relu(torch.randn(2, 6, 4, 5, generator=generator))
    cams = torch.rand(2, 3, 4, 5, generator=generator)
    got = class_vectors(features, cams)
    for b in range(2):
        q = [(features[b, k] > 0).float().mean().item() for k in range(6)]
        cw = [math.log(sum(q) / qk) if qk > 0 else 0.0 for qk in q]
        for c in range(3):
            f = torch.tensor([cw[k] * (features[b, k] * cams[b, c]).sum().item() for k in range(6)])
            assert got[b, c].tolist() == pytest.approx((f / f.norm()).tolist(), abs=1e-6)
    assert weighted_sum_pooling(features, cams).shape == (2, 3, 6)


def _fitted_whitening(dim: int, channels: int, seed: int = 1) -> PCAWhitening:
    rng = np.random.default_rng(seed)
    return PCAWhitening(dim).fit(rng.normal(size=(200, channels)) @ rng.normal(size=(channels, channels)))


def test_aggregation_against_formula():
    whitening = _fitted_whitening(4, 6)
    vectors = torch.nn.functional.normalize(torch.randn(3, 5, 6, dtype=torch.float64), dim=-1)
    got = aggregate(vectors, whitening)
    for b in range(3):
        expected = reference_descriptor(vectors[b].numpy(), whitening.mean_, whitening.components_, whitening.eigenvalues_)
        assert got[b].tolist() == pytest.approx(expected.tolist(), abs=1e-9)


def test_whole_descriptor_against_reference_on_random_maps():
    """Sections 1-3 composed (the pipeline the index uses) against the plain reference, on random maps."""
    generator = torch.Generator().manual_seed(3)
    activations = torch.relu(torch.randn(2, 8, 3, 4, generator=generator, dtype=torch.float64))
    features = torch.relu(torch.randn(2, 5, 3, 4, generator=generator, dtype=torch.float64))
    weight = torch.randn(20, 8, generator=generator, dtype=torch.float64)
    bias = torch.randn(20, generator=generator, dtype=torch.float64)
    whitening = _fitted_whitening(4, 5)
    got = class_weighted_vectors(FeatureMaps(features, activations), weight, bias, n_classes=6)
    descriptors = aggregate(got.vectors, whitening)
    for b in range(2):
        classes, vectors = reference_class_vectors(
            features[b].numpy(), activations[b].numpy(), weight.numpy(), bias.numpy(), 6
        )
        assert got.classes[b].tolist() == classes
        assert got.vectors[b].numpy() == pytest.approx(vectors, abs=1e-9)
        expected = reference_descriptor(vectors, whitening.mean_, whitening.components_, whitening.eigenvalues_)
        assert descriptors[b].numpy() == pytest.approx(expected, abs=1e-9)


def test_class_logits_are_gap_then_linear():
    activations = torch.arange(8.0).reshape(1, 2, 2, 2)  # channel means 1.5 and 5.5
    weight, bias = torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([0.5, 0.0])
    assert class_logits(activations, weight, bias)[0].tolist() == [7.5, -2.5]
