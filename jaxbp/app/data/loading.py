"""Config-driven entry points: which data set, where its files are, how to normalise."""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np

from jaxbp.app.data import builders, mnist1d
from jaxbp.app.data.errors import DataError

DATASETS: tuple[str, ...] = ("fashion_mnist", "mnist", "mnist1d")
NORMALIZE_MODES = ("standardize", "scale", "none")
SPLITS = ("train", "test")
DEFAULT_SOURCE_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
DEFAULT_DATA_ROOT = "~/.cache/jaxbp/tfds"
DATA_ROOT_ENV = "JAXBP_DATA_DIR"


class Split(NamedTuple):
    """One split in memory.

    Attributes:
      images: float32 ``(N, *input_shape(name))``, normalised as configured.
      labels: int32 ``(N,)`` in ``[0, num_classes(name))``.
    """

    images: np.ndarray
    labels: np.ndarray


def _check_name(name) -> str:
    if name not in DATASETS:
        raise DataError(f"data.name {name!r} is not one of {', '.join(DATASETS)}")
    return name


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one example, channels-last: images (28, 28, 1), MNIST-1D (40, 1)."""
    if _check_name(name) == "mnist1d":
        return (mnist1d.SEQUENCE_LENGTH, 1)
    return (*builders.IMAGE_SHAPE, 1)


def num_classes(name: str) -> int:
    _check_name(name)
    return builders.CLASSES


def _check_optional_count(cfg: dict, key: str) -> None:
    value = cfg.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"data.{key} must be a positive integer or unset, got {value!r}")


def check_config(cfg: dict) -> str:
    """Validate the meaning of the data config; returns the data set name."""
    name = _check_name(cfg.get("name"))
    mode = cfg.get("normalize", "standardize")
    if mode not in NORMALIZE_MODES:
        raise DataError(f"data.normalize {mode!r} is not one of {', '.join(NORMALIZE_MODES)}")
    if name == "mnist1d" and mode == "scale":
        raise DataError(
            "data.normalize 'scale' divides 8-bit pixels by 255, but mnist1d is real-valued: "
            "use 'standardize' or 'none'"
        )
    for key in ("batch_size", "limit_train", "limit_test"):
        _check_optional_count(cfg, key)
    return name


def data_root(cfg: dict) -> str:
    """Where prepared data are cached: data.data_dir, else $JAXBP_DATA_DIR, else ~/.cache/jaxbp/tfds."""
    root = cfg.get("data_dir") or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return os.path.abspath(os.path.expanduser(root))


def source_dir(cfg: dict, name: str) -> str:
    """The folder holding the idx files of an image data set."""
    folder = cfg.get("dir") or DEFAULT_SOURCE_DIRS.get(name)
    if folder is None:
        raise DataError(
            f"data.dir is not set: {name} has no default folder; set data.dir to a folder with "
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte (each may be .gz)"
        )
    return os.path.abspath(os.path.expanduser(folder))


def prepare(data_cfg: dict) -> str:
    """Make the data set ready to load, once; returns where the prepared data are.

    Image sets are written by TFDS as ArrayRecord files into a folder of the
    data root keyed on the source folder; MNIST-1D is generated into an .npz.
    Nothing is downloaded. Takes milliseconds when already prepared.
    """
    name = check_config(data_cfg)
    root = data_root(data_cfg)
    if name == "mnist1d":
        return mnist1d.prepare_mnist1d(root)
    folder = source_dir(data_cfg, name)
    location = builders.cache_folder(name, folder, root)
    try:
        builders.prepare_builder(builders.open_builder(name, location), folder)
    except OSError as err:
        raise DataError(f"cannot prepare {name} in {location}: {err}") from err
    return location


@functools.lru_cache(maxsize=4)
def _raw_split(name: str, location: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split as stored (uint8 pixels or float64 signals), read once per process."""
    if name == "mnist1d":
        inputs, labels = mnist1d.read_mnist1d(location, split)
    else:
        inputs, labels = builders.read_prepared(builders.open_builder(name, location), split)
    inputs.setflags(write=False)  # shared by every caller through the cache
    labels.setflags(write=False)
    return inputs, labels


def moments(inputs: np.ndarray, chunk: int = 4096) -> tuple[float, float]:
    """Mean and standard deviation over all values, in float64.

    Summed chunk by chunk: a float64 copy of 60k images would take 376 MB,
    and ``np.bincount`` on uint8 makes an int64 copy (measured 4x slower).
    """
    rows = inputs.reshape(len(inputs), -1)
    total = squares = 0.0
    for start in range(0, len(rows), chunk):
        block = rows[start:start + chunk].astype(np.float64)
        total += float(block.sum())
        squares += float(np.square(block).sum())
    mean = total / rows.size
    return mean, float(np.sqrt(max(squares / rows.size - mean * mean, 0.0)))


@functools.lru_cache(maxsize=4)
def _train_moments(name: str, location: str) -> tuple[float, float]:
    inputs = _raw_split(name, location, "train")[0]
    if inputs.size == 0:
        raise DataError(f"{name} train split is empty: cannot standardize")
    mean, std = moments(inputs)
    if std == 0:
        raise DataError(f"{name} training inputs are constant: cannot standardize; use normalize 'none'")
    return mean, std


def normalise(inputs: np.ndarray, mode: str, train_moments) -> np.ndarray:
    """Inputs as float32: standardized with the train split's mean and std, scaled by 1/255, or as they are.

    ``train_moments`` is a callable giving (mean, std), called only for "standardize".
    """
    x = inputs.astype(np.float32)
    if mode == "standardize":
        mean, std = train_moments()
        x -= np.float32(mean)
        x /= np.float32(std)
    elif mode == "scale":
        x /= np.float32(255)
    return x


def load(data_cfg: dict, split: str) -> Split:
    """One split, normalised, limited to its first ``limit_<split>`` examples if set.

    The standardize statistics come from the whole train split (not the
    limited one), so a limit never changes how test inputs are scaled.
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    name = check_config(data_cfg)
    location = prepare(data_cfg)
    inputs, labels = _raw_split(name, location, split)
    count = data_cfg.get(f"limit_{split}")
    inputs, labels = inputs[:count], labels[:count]
    batch_size = data_cfg.get("batch_size")
    if split == "train" and batch_size is not None and len(labels) < batch_size:
        raise DataError(
            f"train split has {len(labels)} examples, fewer than data.batch_size={batch_size}"
        )
    mode = data_cfg.get("normalize", "standardize")
    images = normalise(inputs, mode, lambda: _train_moments(name, location))
    return Split(images, labels.astype(np.int32))
