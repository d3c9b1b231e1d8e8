"""Tiny MNIST-format data sets for tests: idx files with learnable images.

Each class gets a fixed random pattern of bright 4x4 blocks; every example is
its class's pattern plus uniform noise, so even a linear model separates the
classes after one epoch.
"""

from __future__ import annotations

import gzip as gzip_module
import os

import numpy as np

_DTYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def encode_idx(array: np.ndarray) -> bytes:
    """The idx-file bytes of ``array`` (uint8, int32 or float32)."""
    array = np.asarray(array)
    code = _DTYPE_CODES[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_bytes(path: str | os.PathLike, raw: bytes, gzip: bool) -> str:
    """Write ``raw`` to ``path`` (+ ``.gz`` and compressed when ``gzip``); returns the path written."""
    path = os.fspath(path) + (".gz" if gzip else "")
    opener = gzip_module.open if gzip else open
    with opener(path, "wb") as f:
        f.write(raw)
    return path


def class_patterns(rng: np.random.Generator, image_shape: tuple, classes: int) -> np.ndarray:
    """``(classes, rows, cols)`` bool masks made of 4x4 blocks, about half of them lit."""
    rows, cols = image_shape
    coarse = rng.random((classes, -(-rows // 4), -(-cols // 4))) < 0.5
    return coarse.repeat(4, axis=1).repeat(4, axis=2)[:, :rows, :cols]


def make_examples(rng, patterns: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples with balanced, shuffled labels: lit pixels 160..255, dark ones 0..95."""
    labels = rng.permutation(np.arange(n) % len(patterns)).astype(np.uint8)
    noise = rng.integers(0, 96, size=(n, *patterns.shape[1:]))
    images = noise + 160 * patterns[labels]
    return images.astype(np.uint8), labels


def write_idx_dataset(
    folder: str | os.PathLike,
    n_train: int = 200,
    n_test: int = 100,
    image_shape: tuple = (28, 28),
    classes: int = 10,
    seed: int = 0,
    gzip: bool = True,
) -> str:
    """Write train-/t10k- images and labels idx files into ``folder`` (created if needed).

    Args:
      folder: destination; the four files are named as in the MNIST
        distribution, with ``.gz`` appended when ``gzip``.
      n_train, n_test: examples per split.
      image_shape: (rows, cols) of every image.
      classes: labels are 0..classes-1, balanced.
      seed: same seed, same files.
      gzip: compress the files.

    Returns:
      ``folder`` as a string.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = class_patterns(rng, tuple(image_shape), classes)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = make_examples(rng, patterns, n)
        write_bytes(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), encode_idx(images), gzip)
        write_bytes(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), encode_idx(labels), gzip)
    return folder


def read_written(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`write_idx_dataset` wrote for ``split`` ("train"/"test"), decoded independently of jaxbp."""
    prefix = {"train": "train", "test": "t10k"}[split]
    arrays = []
    for kind, rank in (("images-idx3", 3), ("labels-idx1", 1)):
        path = os.path.join(os.fspath(folder), f"{prefix}-{kind}-ubyte")
        opener, path = (gzip_module.open, path + ".gz") if os.path.exists(path + ".gz") else (open, path)
        with opener(path, "rb") as f:
            raw = f.read()
        shape = np.frombuffer(raw, dtype=">u4", count=rank, offset=4)
        arrays.append(np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape))
    return arrays[0], arrays[1]
