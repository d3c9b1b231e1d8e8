"""Tests of jaxbp.app.data: idx parsing, TFDS preparation, loading, normalisation, batching.

Every test runs with outgoing connections refused, so any network access
by the pipeline (or TFDS under it) fails the test instead of stalling it.
"""

import os
import random
import socket
import time

import numpy as np
import pytest

from idx_fixtures import encode_idx, read_written, write_bytes, write_idx_dataset
from jaxbp.app import data
from jaxbp.app.data import builders, idx
from jaxbp.app.data.batching import epoch_order

REAL_FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"jaxbp.app.data tried to open a network connection {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def source(tmp_path):
    """A tiny gzipped data set: 60 train, 30 test images."""
    return write_idx_dataset(tmp_path / "src", n_train=60, n_test=30)


def config(source_dir, tmp_path, **overrides):
    cfg = {"name": "mnist", "dir": str(source_dir), "data_dir": str(tmp_path / "cache"),
           "batch_size": 8, "normalize": "none"}
    cfg.update(overrides)
    return cfg


def error_text(excinfo) -> str:
    return str(excinfo.value)


# ---------------------------------------------------------------- idx format


@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([7, 0, 255], dtype=np.uint8),
    np.array([[-5, 1 << 20], [3, -(1 << 30)]], dtype=np.int32),  # multi-byte: endianness matters
    np.array([1.5, -2.25], dtype=np.float32),
    np.zeros((0, 28, 28), dtype=np.uint8),
])
def test_parse_idx_round_trip(array):
    parsed = idx.parse_idx(encode_idx(array))
    assert parsed.shape == array.shape
    assert parsed.dtype == array.dtype
    np.testing.assert_array_equal(parsed, array)


def test_idx_header_layout():
    raw = encode_idx(np.zeros((5, 28, 28), dtype=np.uint8))
    assert raw[:4] == idx.IMAGES_MAGIC.to_bytes(4, "big")
    assert np.frombuffer(raw, ">u4", count=3, offset=4).tolist() == [5, 28, 28]
    assert encode_idx(np.zeros(5, dtype=np.uint8))[:4] == idx.LABELS_MAGIC.to_bytes(4, "big")


@pytest.mark.parametrize("raw, fragment", [
    (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "not an idx file"),
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05", "not an idx file"),  # unknown type byte
    (b"\x00\x00", "not an idx file"),
    (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02", "truncated idx header"),
    (encode_idx(np.zeros((4, 3, 3), np.uint8))[:-1], "truncated"),
    (encode_idx(np.zeros((4, 3, 3), np.uint8)) + b"\x00", "trailing bytes"),
])
def test_parse_idx_rejects_bad_bytes(raw, fragment):
    with pytest.raises(data.DataError, match=fragment):
        idx.parse_idx(raw, "somefile")


@pytest.mark.parametrize("gzip", [True, False])
def test_read_idx_plain_and_gzipped(tmp_path, gzip):
    array = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    path = write_bytes(tmp_path / "x-idx3-ubyte", encode_idx(array), gzip)
    assert path.endswith(".gz") == gzip
    np.testing.assert_array_equal(idx.read_idx(path, idx.IMAGES_MAGIC), array)


def test_read_idx_checks_expected_magic(tmp_path):
    path = write_bytes(tmp_path / "labels", encode_idx(np.zeros(3, np.uint8)), gzip=False)
    with pytest.raises(data.DataError, match="expected 0x00000803"):
        idx.read_idx(path, idx.IMAGES_MAGIC)


def test_read_idx_truncated_gzip_stream(tmp_path):
    good = write_bytes(tmp_path / "a", encode_idx(np.ones((50, 28, 28), np.uint8)), gzip=True)
    with open(good, "rb") as f:
        raw = f.read()
    cut = write_bytes(tmp_path / "cut.gz", raw[: len(raw) // 2], gzip=False)
    with pytest.raises(data.DataError, match="cannot read"):
        idx.read_idx(cut)


@pytest.mark.skipif(not os.path.isdir(REAL_FASHION), reason="Debian's dataset-fashion-mnist not installed")
def test_read_real_fashion_mnist_files():
    images, labels = idx.read_split(REAL_FASHION, "test", (28, 28), 10)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- prepare and load


@pytest.mark.parametrize("gzip", [True, False])
def test_prepare_and_load_round_trip(tmp_path, gzip):
    src = write_idx_dataset(tmp_path / "src", n_train=50, n_test=20, seed=3, gzip=gzip)
    cfg = config(src, tmp_path)
    location = data.prepare(cfg)
    assert location.startswith(cfg["data_dir"])
    for split in ("train", "test"):
        images, labels = read_written(src, split)
        loaded = data.load(cfg, split)
        assert loaded.images.dtype == np.float32 and loaded.images.shape == (len(labels), 28, 28, 1)
        assert loaded.labels.dtype == np.int32
        np.testing.assert_array_equal(loaded.labels, labels)
        np.testing.assert_array_equal(loaded.images[..., 0], images.astype(np.float32))


def test_prepare_is_idempotent_and_does_not_reread_sources(source, tmp_path, monkeypatch):
    cfg = config(source, tmp_path)
    location = data.prepare(cfg)

    def must_not_run(*args):
        raise AssertionError("prepared data were generated again")

    monkeypatch.setattr(builders, "read_split", must_not_run)
    start = time.perf_counter()
    assert data.prepare(cfg) == location
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(data.load(cfg, "test").labels, read_written(source, "test")[1])


def test_different_sources_never_share_prepared_data(tmp_path):
    first = write_idx_dataset(tmp_path / "a", n_train=40, n_test=20, seed=1)
    second = write_idx_dataset(tmp_path / "b", n_train=40, n_test=20, seed=2)
    cfg_a, cfg_b = config(first, tmp_path), config(second, tmp_path)
    assert data.prepare(cfg_a) != data.prepare(cfg_b)
    np.testing.assert_array_equal(data.load(cfg_b, "train").labels, read_written(second, "train")[1])
    # Rewriting the files in place (other content, same folder) must not reuse the old cache.
    write_idx_dataset(first, n_train=30, n_test=20, seed=5)
    assert len(data.load(cfg_a, "train").labels) == 30


def test_mnist_and_fashion_configs_are_kept_apart(source, tmp_path):
    as_mnist = data.prepare(config(source, tmp_path))
    as_fashion = data.prepare(config(source, tmp_path, name="fashion_mnist"))
    assert as_mnist != as_fashion


def test_limits_take_the_first_examples(source, tmp_path):
    cfg = config(source, tmp_path, limit_train=17, limit_test=5)
    train, test = data.load(cfg, "train"), data.load(cfg, "test")
    np.testing.assert_array_equal(train.labels, read_written(source, "train")[1][:17])
    np.testing.assert_array_equal(test.labels, read_written(source, "test")[1][:5])
    assert train.images.shape == (17, 28, 28, 1)


def test_data_dir_from_environment(source, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXBP_DATA_DIR", str(tmp_path / "from_env"))
    cfg = config(source, tmp_path)
    del cfg["data_dir"]
    assert data.prepare(cfg).startswith(str(tmp_path / "from_env") + os.sep)


# ---------------------------------------------------------------- normalisation


def test_normalize_scale(source, tmp_path):
    loaded = data.load(config(source, tmp_path, normalize="scale"), "train")
    raw = read_written(source, "train")[0]
    np.testing.assert_allclose(loaded.images[..., 0], raw / np.float32(255), rtol=1e-6)
    assert 0.0 <= loaded.images.min() and loaded.images.max() <= 1.0


def test_normalize_standardize_uses_train_statistics(source, tmp_path):
    cfg = config(source, tmp_path, normalize="standardize")
    train = data.load(cfg, "train")
    assert abs(float(train.images.mean())) < 1e-5 and abs(float(train.images.std()) - 1) < 1e-5
    raw_train = read_written(source, "train")[0].astype(np.float64)
    raw_test = read_written(source, "test")[0].astype(np.float64)
    expected = (raw_test - raw_train.mean()) / raw_train.std()
    np.testing.assert_allclose(data.load(cfg, "test").images[..., 0], expected, rtol=1e-5, atol=1e-5)
    # A limit on the train split does not move the statistics the test split is scaled by.
    limited = data.load(dict(cfg, limit_train=3), "test")
    np.testing.assert_allclose(limited.images[..., 0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_missing_folder_names_all_files(tmp_path):
    with pytest.raises(data.DataError) as excinfo:
        data.prepare(config(tmp_path / "nowhere", tmp_path))
    message = error_text(excinfo)
    assert "does not exist" in message and str(tmp_path / "nowhere") in message
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in message


def test_missing_single_file_is_named(source, tmp_path):
    os.remove(os.path.join(source, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(data.DataError) as excinfo:
        data.load(config(source, tmp_path), "train")
    message = error_text(excinfo)
    assert "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message and "t10k-images" not in message


def test_mnist_needs_a_folder(tmp_path):
    with pytest.raises(data.DataError, match="data.dir"):
        data.prepare({"name": "mnist", "data_dir": str(tmp_path)})


def test_fashion_mnist_defaults_to_debian_folder():
    from jaxbp.app.data.loading import source_dir
    assert source_dir({"name": "fashion_mnist"}, "fashion_mnist") == REAL_FASHION


def test_wrong_image_size_fails_prepare(tmp_path):
    src = write_idx_dataset(tmp_path / "src", n_train=20, n_test=10, image_shape=(20, 20))
    with pytest.raises(data.DataError, match=r"images are \(20, 20\), expected \(28, 28\)"):
        data.prepare(config(src, tmp_path))


def test_label_out_of_range_fails_prepare(tmp_path):
    src = write_idx_dataset(tmp_path / "src", n_train=24, n_test=12, classes=12)
    with pytest.raises(data.DataError, match=r"label 11 outside \[0, 10\)"):
        data.prepare(config(src, tmp_path))


def test_count_mismatch_fails_prepare(source, tmp_path):
    write_bytes(os.path.join(source, "train-labels-idx1-ubyte"), encode_idx(np.zeros(3, np.uint8)), True)
    with pytest.raises(data.DataError, match="60 images but 3 labels"):
        data.prepare(config(source, tmp_path))


@pytest.mark.parametrize("overrides, fragment", [
    ({"name": "cifar"}, "data.name 'cifar'"),
    ({"normalize": "minmax"}, "data.normalize 'minmax'"),
    ({"name": "mnist1d", "normalize": "scale"}, "real-valued"),
    ({"limit_train": 0}, "data.limit_train"),
    ({"limit_test": True}, "data.limit_test"),
    ({"batch_size": -1}, "data.batch_size"),
])
def test_bad_config_meaning(source, tmp_path, overrides, fragment):
    with pytest.raises(data.DataError, match=fragment):
        data.prepare(config(source, tmp_path, **overrides))


def test_bad_split_name(source, tmp_path):
    with pytest.raises(data.DataError, match="'validation'"):
        data.load(config(source, tmp_path), "validation")


def test_batch_larger_than_train_split(source, tmp_path):
    with pytest.raises(data.DataError, match="fewer than data.batch_size=64"):
        data.load(config(source, tmp_path, batch_size=64), "train")


def test_shapes_and_classes_per_name():
    assert data.DATASETS == ("fashion_mnist", "mnist", "mnist1d")
    assert data.input_shape("fashion_mnist") == data.input_shape("mnist") == (28, 28, 1)
    assert data.input_shape("mnist1d") == (40, 1)
    assert {data.num_classes(n) for n in data.DATASETS} == {10}
    with pytest.raises(data.DataError):
        data.input_shape("cifar")


# ---------------------------------------------------------------- batching


def counting_split(n):
    """Labels 0..n-1 and images that repeat them, so a batch shows which examples it holds."""
    labels = np.arange(n, dtype=np.int32)
    return data.Split(np.repeat(labels, 3).reshape(n, 3, 1).astype(np.float32), labels)


def batch_labels(split, *args, **kwargs):
    return [labels.tolist() for _, labels in data.epoch_batches(split, *args, **kwargs)]


def test_batches_reproducible_from_seed_and_epoch():
    split = counting_split(50)
    assert batch_labels(split, 8, seed=1, epoch=4) == batch_labels(split, 8, seed=1, epoch=4)
    assert batch_labels(split, 8, seed=1, epoch=4) != batch_labels(split, 8, seed=1, epoch=5)
    assert batch_labels(split, 8, seed=1, epoch=4) != batch_labels(split, 8, seed=2, epoch=4)


def test_batches_do_not_depend_on_earlier_epochs_or_global_state():
    split = counting_split(30)
    np.random.seed(0)
    fresh = batch_labels(split, 4, seed=7, epoch=3)
    for epoch in range(3):
        batch_labels(split, 4, seed=7, epoch=epoch)
    np.random.seed(123)
    assert batch_labels(split, 4, seed=7, epoch=3) == fresh


def test_images_travel_with_their_labels():
    split = counting_split(20)
    for images, labels in data.epoch_batches(split, 6, seed=0, epoch=0):
        np.testing.assert_array_equal(images[:, :, 0], np.repeat(labels, 3).reshape(-1, 3))


def test_a_process_reads_its_rows_of_every_batch():
    split = counting_split(50)
    whole = batch_labels(split, 8, seed=1, epoch=2)
    assert batch_labels(split, 8, seed=1, epoch=2, rows=slice(4, 8)) == [b[4:] for b in whole]


@pytest.mark.parametrize("n, batch_size", [(50, 8), (48, 8), (5, 8), (1, 1)])
def test_every_example_once_without_dropping(n, batch_size):
    batches = batch_labels(counting_split(n), batch_size, seed=3, epoch=2, drop_remainder=False)
    assert len(batches) == data.num_batches(n, batch_size, drop_remainder=False)
    assert sorted(sum(batches, [])) == list(range(n))
    assert all(len(b) == batch_size for b in batches[:-1])


@pytest.mark.parametrize("n, batch_size", [(50, 8), (48, 8), (5, 8)])
def test_drop_remainder_keeps_full_batches_only(n, batch_size):
    batches = batch_labels(counting_split(n), batch_size, seed=3, epoch=0)
    assert len(batches) == n // batch_size == data.num_batches(n, batch_size, drop_remainder=True)
    assert all(len(b) == batch_size for b in batches)
    assert len(set(sum(batches, []))) == len(batches) * batch_size


def test_no_shuffle_keeps_stored_order():
    assert sum(batch_labels(counting_split(10), 3, 0, 0, shuffle=False, drop_remainder=False), []) == list(range(10))
    assert not np.array_equal(epoch_order(10, 0, 0), np.arange(10))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"batch_size": 0, "seed": 0, "epoch": 0}, "batch_size"),
    ({"batch_size": 2, "seed": -1, "epoch": 0}, "seed"),
    ({"batch_size": 2, "seed": 0, "epoch": 1.5}, "epoch"),
])
def test_bad_batching_arguments_fail_at_the_call(kwargs, fragment):
    with pytest.raises(data.DataError, match=fragment):
        data.epoch_batches(counting_split(4), **kwargs)


# ---------------------------------------------------------------- MNIST-1D


@pytest.fixture(scope="module")
def mnist1d_cfg(tmp_path_factory):
    """Generated once per module (a few seconds): every MNIST-1D test shares it."""
    return {"name": "mnist1d", "data_dir": str(tmp_path_factory.mktemp("mnist1d")),
            "batch_size": 32, "normalize": "standardize"}


def test_mnist1d_shapes(mnist1d_cfg):
    train, test = data.load(mnist1d_cfg, "train"), data.load(mnist1d_cfg, "test")
    assert train.images.shape == (4000, *data.input_shape("mnist1d"))
    assert test.images.shape == (1000, 40, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert set(np.unique(train.labels)) == set(range(10))
    assert abs(float(train.images.mean())) < 1e-4 and abs(float(train.images.std()) - 1) < 1e-4


def test_mnist1d_cached_once(mnist1d_cfg, monkeypatch):
    from jaxbp.app.data import mnist1d
    path = data.prepare(mnist1d_cfg)
    assert os.path.isfile(path) and path.endswith(".npz")
    monkeypatch.setattr(mnist1d, "generate", lambda: pytest.fail("MNIST-1D generated twice"))
    assert data.prepare(mnist1d_cfg) == path
    limited = data.load(dict(mnist1d_cfg, limit_train=100, normalize="none"), "train")
    assert limited.images.shape == (100, 40, 1)


def test_mnist1d_generation_leaves_global_random_state_alone(monkeypatch):
    from jaxbp.app.data import mnist1d
    from mnist1d import data as upstream

    def tiny(args):  # the real generator's side effect, without its cost
        random.seed(args.seed)
        np.random.seed(args.seed)
        return {k: np.zeros(1) for k in ("x", "y", "x_test", "y_test")}

    monkeypatch.setattr(upstream, "make_dataset", tiny)
    random.seed(99)
    np.random.seed(99)
    expected = random.random(), np.random.random()
    random.seed(99)
    np.random.seed(99)
    mnist1d.generate()
    assert (random.random(), np.random.random()) == expected
