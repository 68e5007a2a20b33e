"""The whole path on real photos with the default settings: real weights, the index's own pipeline, and the plain
reference of METHOD.md computed from the same network's maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camretrieval import Describer, Index, PCAWhitening, fit_whitening
from camretrieval.errors import CamRetrievalError
from camretrieval.evaluation.metrics import labels_mean_average_precision
from camretrieval.extraction.images import find_images, load_image
from camretrieval.extraction.settings import DEFAULT_CLASSES, DEFAULT_SIZE
from camretrieval.method.regions import box_to_cells, scale_box
from reference import reference_class_vectors, reference_descriptor


@pytest.fixture(scope="module")
def random_whitening(lite0):
    """A 1280 -> 512 whitening of random vectors: the reference comparison needs any fixed whitening."""
    rng = np.random.default_rng(0)
    return PCAWhitening(512, Describer(lite0).settings.to_dict()).fit(np.abs(rng.normal(size=(600, 1280))))


def _reference(describer: Describer, path, box=None) -> np.ndarray:
    image = load_image(path)
    tensor = describer.preprocess(image)
    with torch.inference_mode():
        maps = describer.backbone(tensor.unsqueeze(0))
    X, A = maps.features[0].double().numpy(), maps.cam_activations[0].double().numpy()
    if box is not None:
        x1, y1, x2, y2 = scale_box(box, image.size, (tensor.shape[2], tensor.shape[1]))
        col1, row1, col2, row2 = box_to_cells((x1, y1, x2, y2), 32, (X.shape[2], X.shape[1]))
        X, A = X[:, row1:row2, col1:col2], A[:, row1:row2, col1:col2]
    W = describer.backbone.classifier_weight.double().numpy()
    b = describer.backbone.classifier_bias.double().numpy()
    _, vectors = reference_class_vectors(X, A, W, b, describer.n_classes)
    w = describer.whitening
    return reference_descriptor(vectors, w.mean_, w.components_, w.eigenvalues_)


def test_real_photos_match_the_plain_reference(lite0, landmarks_dir, eth80_dir, random_whitening):
    describer = Describer(lite0, DEFAULT_SIZE, DEFAULT_CLASSES, random_whitening)
    photos = sorted(landmarks_dir.glob("*.jpg"))[:3] + [eth80_dir / "cow1" / "cow1-000-000.jpg"]
    ours = describer.describe(photos)
    for row, path in zip(ours, photos):
        assert row == pytest.approx(_reference(describer, path), abs=2e-4), path.name
    # A box query: the region's maps, with the region's own classes.
    box = (100.0, 80.0, 700.0, 500.0)
    region = describer.describe([photos[0]], [box])[0]
    assert region == pytest.approx(_reference(describer, photos[0], box), abs=2e-4)
    whole, part = describer.image_vectors(photos[0]), describer.image_vectors(photos[0], box)
    assert set(part.classes[0, :5].tolist()) != set(whole.classes[0, :5].tolist())
    # Batched extraction over files gives the same descriptors as one image at a time.
    batched, done, failures = describer.describe_files(photos, batch_size=4, workers=2, progress=False)
    assert done == [0, 1, 2, 3] and not failures
    assert batched == pytest.approx(ours, abs=1e-5)


def test_bfloat16_forward_pass_gives_nearly_the_float32_descriptors(lite0, landmarks_dir, random_whitening):
    """--precision bfloat16 (autocast, meant for GPUs; checked here on the CPU): the maps lose precision (8 bits of
    mantissa) but the descriptors stay close, and the CAM arithmetic after the forward pass is float32."""
    photos = sorted(landmarks_dir.glob("*.jpg"))[:3]
    exact = Describer(lite0, DEFAULT_SIZE, DEFAULT_CLASSES, random_whitening).describe(photos)
    bf16 = Describer(lite0, DEFAULT_SIZE, DEFAULT_CLASSES, random_whitening, precision="bfloat16")
    assert bf16.feature_maps(torch.zeros(1, 3, 64, 64)).features.dtype == torch.float32
    approximate = bf16.describe(photos)
    assert (np.sum(exact * approximate, axis=1) > 0.98).all()  # cosine similarity of l2-normalised descriptors
    with pytest.raises(CamRetrievalError, match="unknown precision 'float8'"):
        Describer(lite0, 256, precision="float8")


def test_eth80_pca_on_some_objects_index_and_query_the_others(lite0, eth80_dir, tmp_path):
    """Default settings end to end: PCA-whitening (512-d) learned on 32 objects, 8 others indexed and queried."""
    objects = sorted(p.name for p in eth80_dir.iterdir() if p.is_dir())
    held_out = objects[2::5]  # 8 objects, one per category
    training = [p for p in find_images(eth80_dir) if p.split("/")[0] not in held_out][::2]  # 656 images
    whitening, failures = fit_whitening(Describer(lite0), training, eth80_dir, progress=False)
    assert not failures and whitening.dim == 512
    database = tmp_path / "database"
    for name in held_out:
        (database / name).mkdir(parents=True)
        for image in sorted((eth80_dir / name).glob("*.jpg"))[::2]:
            (database / name / image.name).symlink_to(image)
    index, failures = Index.build(database, whitening, progress=False)
    assert not failures and len(index) == 8 * 21
    index.save(tmp_path / "index")
    reopened = Index.open(tmp_path / "index")
    labels = [p.split("/")[0] for p in reopened.paths]
    scores, ids = reopened.search_descriptors(reopened.descriptors, top=len(reopened))
    similarity = np.zeros((len(ids), len(ids)))
    np.put_along_axis(similarity, ids, scores, axis=1)
    mean_ap, _ = labels_mean_average_precision(similarity, labels, range(len(labels)))
    chance = 20 / 167
    print(f"ETH-80 held-out objects: mAP {mean_ap:.3f} (chance {chance:.3f})")
    assert mean_ap > 0.6
    # A query through the image path gives the stored descriptor back as its own best match.
    hits = reopened.search([database / reopened.paths[5]], top=3)[0]
    assert hits[0].path == reopened.paths[5] and hits[0].score == pytest.approx(1.0, abs=1e-4)
