"""Stored maps, format 2 (storage/map_codec.py, storage/maps.py): lossless blocks, the reader's interface, indexes
written in format 1 still searched alike and upgraded, damaged blocks named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camretrieval import Describer, Index, PCAWhitening
from camretrieval.cli.info import index_info, info_text
from camretrieval.errors import CamRetrievalError
from camretrieval.method.aggregation import aggregate
from camretrieval.method.cell_major import online_class_vectors
from camretrieval.search.online import online_descriptors
from camretrieval.search.refinement import QueryDescription, SearchOptions
from camretrieval.search.reranking import region_scores
from camretrieval.storage.catalog import IndexStore
from camretrieval.storage.check import check_index, maps_formats, upgrade_maps
from camretrieval.storage.map_codec import (
    DENSE,
    SPARSE,
    MapsDamagedError,
    decode_block,
    decode_into,
    encode_block,
    gap_code,
    gap_decode,
    read_header,
)
from camretrieval.storage.maps import MapStore, MapStoreWriter, encode_maps, maps_files, shard_maps_format

ODD_VALUES = np.array([-0.0, -1.5, 2**-24, -(2**-24), 6.0, 65504.0, -65504.0, np.nan, 1e-3, 5.99], dtype=np.float16)


def relu6_like(rng: np.random.Generator, cells: int, channels: int, zero: float = 0.95) -> np.ndarray:
    """Cells x K float16 like lite0's head: mostly exactly 0, some exactly 6, the rest in (0, 6)."""
    values = rng.uniform(0, 6, size=(cells, channels)).astype(np.float16)
    draw = rng.random((cells, channels))
    values[draw < zero] = 0
    values[(draw >= zero) & (draw < zero + 0.01)] = 6
    return values


def relu_like(rng: np.random.Generator, cells: int, channels: int) -> np.ndarray:
    """Unbounded non-negative activations, 70% exactly 0 (a ReLU layer of ResNet or VGG)."""
    values = np.abs(rng.standard_cauchy(size=(cells, channels))).astype(np.float16)
    values[rng.random((cells, channels)) < 0.7] = 0
    return values


def plain_positives(cells: np.ndarray) -> np.ndarray:
    """Eq. 2's count written out: per channel, the cells whose value is > 0 (NaN and -0.0 are not)."""
    return np.array([sum(1 for v in cells[:, k].tolist() if v > 0) for k in range(cells.shape[1])])


def round_trip(cells: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    block = encode_block(cells, height, width)
    decoded = decode_block(block, 0, height, width, cells.shape[1])
    out = np.full(cells.shape, np.float32(7.0))  # not zero: decoding must write every value
    positives = decode_into(decoded, out)
    return out, positives, decoded.header.kind


def test_gap_code_round_trips_gaps_of_any_length():
    for positions in [[], [0], [254], [255], [0, 255, 510, 511], [3, 70_000, 70_001, 5_000_000], list(range(300))]:
        positions = np.array(positions, dtype=np.int64)
        code = gap_code(positions)
        assert code.dtype == np.uint8 and np.array_equal(gap_decode(code), positions)
    # Written out: a gap of g is g // 255 bytes of 255 and then g % 255.
    assert gap_code(np.array([0, 300, 301])).tolist() == [1, 255, 45, 1]


@pytest.mark.parametrize("kind", ["relu6", "relu", "odd", "dense", "zeros"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (14, 19)])
def test_blocks_are_lossless_and_count_positive_cells(kind, shape):
    rng = np.random.default_rng(abs(hash((kind, shape))) % 2**32)
    height, width = shape
    cells, channels = height * width, 96
    maps = {
        "relu6": lambda: relu6_like(rng, cells, channels),
        "relu": lambda: relu_like(rng, cells, channels),
        "odd": lambda: np.where(rng.random((cells, channels)) < 0.5, rng.choice(ODD_VALUES, (cells, channels)), 0),
        "dense": lambda: rng.normal(size=(cells, channels)),  # pre-ReLU: negative values, none 0
        "zeros": lambda: np.zeros((cells, channels)),
    }[kind]().astype(np.float16)
    out, positives, stored_as = round_trip(maps, height, width)
    # Bit for bit (-0.0 and NaN included), as float32.
    assert np.array_equal(out.view(np.uint32), maps.astype(np.float32).view(np.uint32))
    assert positives.dtype == np.int32 and np.array_equal(positives, plain_positives(maps))
    assert stored_as == (DENSE if kind == "dense" else SPARSE)
    half = np.empty(maps.shape, np.float16)
    decode_into(decode_block(encode_block(maps, height, width), 0, height, width, channels), half)
    assert np.array_equal(half.view(np.uint16), maps.view(np.uint16))


def test_empty_maps_and_sizes():
    empty = np.zeros((0, 8), np.float16)
    out, positives, _ = round_trip(empty, 0, 4)
    assert out.shape == (0, 8) and positives.tolist() == [0] * 8
    # lite0-like maps at 448 px: 95% zeros compress to well under a tenth of float16's bytes.
    maps = relu6_like(np.random.default_rng(0), 14 * 19, 1280)
    assert len(encode_block(maps, 14, 19)) < maps.nbytes / 8


def write_store(folder, images, maps_format, separate=False):
    """A shard folder holding ``images`` (per image: features K x H x W, CAM layer or None) in ``maps_format``."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = MapStoreWriter(len(images), separate, folder, maps_format=maps_format)
    for number, (features, activations) in reversed(list(enumerate(images))):  # in any order
        writer.add(number, torch.from_numpy(features.astype(np.float32)),
                   None if activations is None else torch.from_numpy(activations.astype(np.float32)))
    return writer.finish(range(len(images)))


def random_images(rng, shapes, channels=1280, cam_channels=None):
    images = []
    for height, width in shapes:
        features = relu6_like(rng, height * width, channels).T.reshape(channels, height, width)
        activations = None
        if cam_channels:
            activations = relu_like(rng, (height // 2 + 1) * (width // 2 + 1), cam_channels).T
            activations = activations.reshape(cam_channels, height // 2 + 1, width // 2 + 1)
        images.append((features, activations))
    return images


@pytest.mark.parametrize("separate", [False, True])
def test_a_store_reads_back_what_was_written_in_either_format(tmp_path, separate):
    rng = np.random.default_rng(1)
    images = random_images(rng, [(3, 4), (1, 1), (3, 4), (4, 3), (3, 4)], channels=32, cam_channels=16 if separate else None)
    stores = {f: write_store(tmp_path / f"format{f}", images, f, separate) for f in (1, 2)}
    assert shard_maps_format(tmp_path / "format1") == 1 and shard_maps_format(tmp_path / "format2") == 2
    for store in stores.values():
        reopened = MapStore.open(store.location, separate, len(images))
        assert reopened.separate_cam_layer == separate and reopened.formats == store.formats
        for number, (features, activations) in enumerate(images):
            assert np.array_equal(reopened.features.image(number), features.transpose(1, 2, 0))
            if separate:
                assert np.array_equal(reopened.cam_activations.image(number), activations.transpose(1, 2, 0))
        seen = []
        for batch in reopened.batches(np.arange(len(images))[::-1], max_batch=2):
            assert len(batch.images) <= 2 and batch.features.dtype == torch.float32
            for row, number in enumerate(batch.images.tolist()):
                features, activations = images[number]
                assert np.array_equal(batch.features[row].numpy(), features.transpose(1, 2, 0).astype(np.float32))
                cells = features.reshape(features.shape[0], -1).T
                assert batch.positives[row].tolist() == plain_positives(cells).tolist()
                expected = features if activations is None else activations
                assert np.array_equal(batch.cam_activations[row].numpy(), expected.transpose(1, 2, 0).astype(np.float32))
            seen += batch.images.tolist()
        assert sorted(seen) == list(range(len(images)))
        assert [g.tolist() for g in reopened.shape_groups(np.arange(5), 2)] == [[0, 2], [4], [1], [3]]
    assert stores[2].nbytes() < stores[1].nbytes() / 2  # tiny maps: zstd frames cost ~20 bytes each


@pytest.mark.parametrize("separate", [False, True])
def test_maps_encoded_beforehand_are_stored_byte_for_byte_alike(tmp_path, separate):
    """encode_maps (what the describer's processes run) makes the very blocks MapStoreWriter.add makes of tensors;
    a format 1 store refuses them."""
    rng = np.random.default_rng(2)
    images = random_images(rng, [(3, 4), (2, 2), (3, 4)], channels=32, cam_channels=16 if separate else None)
    from_tensors = write_store(tmp_path / "tensors", images, 2, separate)
    (tmp_path / "encoded").mkdir()
    writer = MapStoreWriter(len(images), separate, tmp_path / "encoded")
    for number, (features, activations) in reversed(list(enumerate(images))):
        writer.add(number, encode_maps(torch.from_numpy(features.astype(np.float32))),
                   None if activations is None else encode_maps(torch.from_numpy(activations.astype(np.float32))))
    writer.finish(range(len(images)))
    for layer in ("features", "cam_activations")[: 2 if separate else 1]:
        for name in maps_files(layer, 2):
            assert (tmp_path / "encoded" / name).read_bytes() == (from_tensors.location / name).read_bytes()
    (tmp_path / "old").mkdir()
    with pytest.raises(CamRetrievalError, match="format 2"):
        MapStoreWriter(1, False, tmp_path / "old", maps_format=1).add(0, encode_maps(torch.zeros(4, 2, 2)))


def test_online_aggregation_and_reranking_read_both_formats_alike(tmp_path):
    """Format 2 is lossless: OnA descriptors and re-ranking scores equal those of the same maps in format 1."""
    rng = np.random.default_rng(2)
    images = random_images(rng, [(4, 5), (5, 4), (4, 5), (4, 5), (3, 3), (4, 5)], channels=64)
    stores = [write_store(tmp_path / f"f{f}", images, f) for f in (1, 2)]
    gathered = MapStore.gather(stores, np.array([0, 1, 0, 1, 1, 0]), np.arange(6))  # a mixed index
    weight = torch.randn(20, 64)
    whitening = PCAWhitening(16).fit(np.abs(rng.normal(size=(200, 64))))
    classes = [3, 1, 4, 15, 9]
    query = rng.normal(size=16).astype(np.float32)
    online = [online_descriptors(store, np.arange(6), classes, weight, whitening, batch_size=2) for store in stores]
    regions = [region_scores(s, [5, 0, 4, 2], classes, query, weight, whitening, (32, 32), min_size=1) for s in stores]
    assert np.array_equal(online[0], online[1])
    assert np.array_equal(regions[0].scores, regions[1].scores) and regions[0].boxes == regions[1].boxes
    assert np.array_equal(online_descriptors(gathered, np.arange(6), classes, weight, whitening, batch_size=2), online[0])


@pytest.mark.parametrize("maps_format", [1, 2])
def test_sparse_batches_hold_each_images_values_at_its_block_of_the_matrix(tmp_path, maps_format):
    """MapStore.sparse_batches: image b's maps X_b (cells x K) are the block (b*K.., b*n..) of the matrix, transposed,
    every other value 0; the counts of Eq. 2 as written out. A mostly non-zero layer (stored as a dense block) and
    odd float16 values (negative, -0.0, NaN) included."""
    rng = np.random.default_rng(5)
    images = random_images(rng, [(3, 4), (2, 2), (3, 4), (3, 4)], channels=24)
    dense_layer = np.abs(rng.normal(size=(24, 3, 4))).astype(np.float16) + np.float16(0.5)  # no zero at all
    dense_layer[0, 0, :] = ODD_VALUES[:4]
    images[2] = (dense_layer, None)
    store = write_store(tmp_path / "store", images, maps_format)
    seen = []
    for batch_images, maps in store.sparse_batches(np.arange(len(images)), max_batch=2):
        matrix = maps.channel_rows.toarray()
        cells, channels = maps.height * maps.width, maps.channels
        assert matrix.shape == (len(batch_images) * channels, len(batch_images) * cells) and matrix.dtype == np.float32
        for row, number in enumerate(batch_images.tolist()):
            features = images[number][0].reshape(channels, -1).astype(np.float32)  # X_b^T: K x n
            block = matrix[row * channels : (row + 1) * channels]
            assert np.array_equal(block[:, row * cells : (row + 1) * cells], features, equal_nan=True)
            assert not np.delete(block, np.s_[row * cells : (row + 1) * cells], axis=1).any()
            assert maps.positives[row].tolist() == plain_positives(images[number][0].reshape(channels, -1).T).tolist()
        seen += batch_images.tolist()
    assert sorted(seen) == list(range(len(images)))


def test_online_aggregation_reads_sparse_maps_as_it_reads_dense_ones(tmp_path):
    """On the CPU with one layer, OnA reads the maps sparse: the descriptors of the dense matrix products, up to the
    order of float32 sums; a store with a separate CAM layer is read dense."""
    rng = np.random.default_rng(6)
    images = random_images(rng, [(4, 5), (5, 4), (4, 5), (4, 5), (3, 3), (4, 5), (1, 1)], channels=64)
    store = write_store(tmp_path / "one", images, 2)
    weight = torch.randn(20, 64)
    whitening = PCAWhitening(16).fit(np.abs(rng.normal(size=(200, 64))))
    classes = torch.tensor([3, 1, 4, 15, 9])
    order = np.array([6, 0, 5, 2, 1, 4, 3])
    for used in (whitening, None):
        dense = np.zeros((len(images), 16 if used else 64), dtype=np.float32)
        for batch in store.batches(order, 16):
            vectors = online_class_vectors(batch.features, batch.cam_activations, weight, classes, batch.positives)
            dense[batch.images] = aggregate(vectors, used).numpy()
        sparse = online_descriptors(store, order, classes, weight, used, batch_size=3)
        assert sparse == pytest.approx(dense[order], abs=1e-6)
    separate = write_store(tmp_path / "two", random_images(rng, [(4, 5)] * 3, channels=64, cam_channels=32), 2, True)
    assert not separate.sparse_readable
    with pytest.raises(CamRetrievalError, match="CAM layer"):
        next(separate.sparse_batches([0], 2))
    assert online_descriptors(separate, [2, 0], classes, torch.randn(20, 32), None).shape == (2, 64)


def test_a_damaged_block_is_a_clear_error_and_check_finds_a_truncated_file(tmp_path):
    rng = np.random.default_rng(3)
    store = write_store(tmp_path / "shard", random_images(rng, [(3, 4), (3, 4)], channels=64), 2)
    blocks = tmp_path / "shard" / maps_files("features", 2)[0]
    data = bytearray(blocks.read_bytes())
    second = int(store.features.table[1, 0])
    data[second + 40] ^= 0xFF  # a byte inside the second image's compressed positions
    blocks.write_bytes(bytes(data))
    damaged = MapStore.open(tmp_path / "shard", False)
    assert damaged.features.image(0).shape == (3, 4, 64)  # the first image's block is whole
    with pytest.raises(MapsDamagedError, match=r"damaged .*camretrieval index IMAGES_DIR INDEX_DIR"):
        damaged.load([1])
    with pytest.raises(MapsDamagedError, match="magic"):
        read_header(bytes(data), second + 1)
    blocks.write_bytes(bytes(data[:-10]))  # truncated: caught without decoding
    from camretrieval.storage.check import _maps_problem

    assert "truncated" in _maps_problem(tmp_path / "shard", 2, False)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, lite0):
    """An index folder of 8 images with random lite0-like maps (format 2) and descriptors, written by Index.save."""
    rng = np.random.default_rng(4)
    settings = Describer(lite0, size=128).settings.to_dict()
    whitening = PCAWhitening(32, settings).fit(np.abs(rng.normal(size=(300, 1280))))
    images = random_images(rng, [(4, 5), (5, 4), (4, 5), (4, 4), (4, 5), (5, 4), (4, 5), (1, 1)])
    store = write_store(tmp_path_factory.mktemp("maps") / "spool", images, 2)
    descriptors = rng.normal(size=(8, 32)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    index_dir = tmp_path_factory.mktemp("index") / "index"
    Index(descriptors, [f"{i}.jpg" for i in range(8)], whitening, settings, None, maps=store).save(index_dir)
    vectors = torch.nn.functional.normalize(torch.rand(64, 1280), dim=1)
    return index_dir, QueryDescription(vectors, torch.randperm(1000)[:64])


def _to_format_1(index_dir):
    """Rewrite every shard's maps as an index written before format 2 holds them (float16 files)."""
    store = IndexStore.open(index_dir)
    for shards in maps_formats(store).values():
        for shard in shards:
            folder = store.shard_path(shard)
            old = MapStore.open(folder, False)
            tensors = [old.image_tensors(i)[0].numpy().astype(np.float16) for i in range(len(old))]
            write_store(folder / "v1", [(t, None) for t in tensors], 1)
            for name in maps_files("features", 2):
                (folder / name).unlink()
            for path in (folder / "v1").iterdir():
                path.rename(folder / path.name)
            (folder / "v1").rmdir()
    store.close()


def test_an_index_written_in_format_1_searches_alike_and_is_upgraded(small_index, tmp_path):
    index_dir, query = small_index
    options = [SearchOptions(online=True, online_classes=8), SearchOptions(rerank=5, qe=2),
               SearchOptions(online=True, online_top=4, rerank=3)]
    compact = Index.open(index_dir)
    assert compact.maps.formats == {2}
    expected = [compact.rank(query, o, exclude=[0]) for o in options]
    old_dir = tmp_path / "old"
    Index.open(index_dir).save(old_dir)
    _to_format_1(old_dir)
    old = Index.open(old_dir)
    assert old.maps.formats == {1} and check_index(IndexStore.open(old_dir)) == []
    assert "format 1): the next camretrieval index IMAGES_DIR INDEX_DIR re-encodes them" in info_text(index_info(old_dir))
    for option, wanted in zip(options, expected):
        got = old.rank(query, option, exclude=[0])
        assert np.array_equal(got.ids, wanted.ids) and np.array_equal(got.scores, wanted.scores)
    with IndexStore.writing(old_dir) as store:
        assert upgrade_maps(store) == 1 and upgrade_maps(store) == 0
        assert set(maps_formats(store)) == {2}
    upgraded = Index.open(old_dir)
    assert upgraded.maps.formats == {2} and not any(p.name.endswith(".npy") and "_maps" in p.name and "blocks" not in p.name
                                                    for p in old_dir.rglob("*"))
    assert "format 1" not in info_text(index_info(old_dir))
    for option, wanted in zip(options, expected):
        got = upgraded.rank(query, option, exclude=[0])
        assert np.array_equal(got.ids, wanted.ids) and np.array_equal(got.scores, wanted.scores)
    # Still readable while another process holds the format 1 files open: they are only unlinked.
    assert old.rank(query, options[0], exclude=[0]).ids.tolist() == expected[0].ids.tolist()
