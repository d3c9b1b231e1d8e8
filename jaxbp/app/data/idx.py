"""Reader for the idx format of MNIST-style data sets (plain or gzipped).

An idx file is: two zero bytes, one type byte, one byte giving the number of
dimensions ``d``, then ``d`` big-endian uint32 sizes, then the values in
big-endian C order.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from jaxbp.app.data.errors import DataError

# Type byte -> big-endian numpy dtype, as listed in the idx format description.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions (count, rows, cols)
LABELS_MAGIC = 0x00000801  # uint8, 1 dimension (count,)

SPLIT_PREFIX = {"train": "train", "test": "t10k"}
KIND_STEM = {"images": "images-idx3-ubyte", "labels": "labels-idx1-ubyte"}


def expected_file_names(split: str) -> tuple[str, str]:
    """Plain (not gzipped) file names of a split's images and labels."""
    prefix = SPLIT_PREFIX[split]
    return tuple(f"{prefix}-{KIND_STEM[kind]}" for kind in ("images", "labels"))


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of one idx file into a native-endian array.

    Raises:
      DataError: bad magic number, unknown type byte, or a size that does not
        match the header.
    """
    if len(raw) < 4:
        raise DataError(f"{source}: not an idx file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{source}: not an idx file (magic number 0x{raw[:4].hex()}, "
            "expected 0x0000 then a type byte and a rank byte)"
        )
    dtype = _IDX_DTYPES[raw[2]]
    rank = raw[3]
    body = 4 + 4 * rank
    if len(raw) < body:
        raise DataError(f"{source}: truncated idx header ({len(raw)} bytes, header needs {body})")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=rank, offset=4))
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - body
    if got != want:
        state = "truncated" if got < want else "has trailing bytes"
        raise DataError(
            f"{source}: idx data {state} (header shape {shape} needs {want} bytes, file has {got})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=body).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read an idx file, gunzipping it when its name ends in ``.gz``.

    Args:
      path: the file.
      magic: if given, the 4-byte magic number the file must start with.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as err:  # EOFError: gzip stream cut short
        raise DataError(f"{path}: cannot read ({err})") from err
    if magic is not None and raw[:4] != magic.to_bytes(4, "big"):
        raise DataError(f"{path}: magic number 0x{raw[:4].hex()}, expected 0x{magic:08x}")
    return parse_idx(raw, path)


def locate(folder: str | os.PathLike, names) -> list[str]:
    """Paths of the idx files ``names`` in ``folder``, each plain or ``.gz``.

    Raises:
      DataError: naming every file that is missing, so one message says what to put where.
    """
    folder = os.fspath(folder)
    found, missing = [], []
    for name in names:
        hits = [p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz"))
                if os.path.isfile(p)]
        if hits:
            found.append(hits[0])
        else:
            missing.append(name + "[.gz]")
    if missing:
        raise DataError(missing_files_message(folder, missing))
    return found


def find_split_files(folder: str | os.PathLike, split: str) -> tuple[str, str]:
    """Paths of a split's (images, labels) files."""
    images, labels = locate(folder, expected_file_names(split))
    return images, labels


def find_dataset_files(folder: str | os.PathLike) -> list[str]:
    """Paths of all four files (train then test; images then labels)."""
    return locate(folder, [n for split in SPLIT_PREFIX for n in expected_file_names(split)])


def missing_files_message(folder: str, missing: list[str]) -> str:
    where = f"folder {folder}" if os.path.isdir(folder) else f"folder {folder} (does not exist)"
    return f"missing {', '.join(missing)} in {where}: put the MNIST-format idx files there or set data.dir"


def read_split(folder: str | os.PathLike, split: str, image_shape: tuple, classes: int):
    """Read and check one split: ``(images uint8 (N, *image_shape), labels uint8 (N,))``.

    Raises:
      DataError: on missing or corrupt files, wrong image size, mismatched
        counts, or labels outside ``[0, classes)``.
    """
    images_path, labels_path = find_split_files(folder, split)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != tuple(image_shape):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected {tuple(image_shape)}")
    if len(images) != len(labels):
        raise DataError(
            f"{folder}: {split} split has {len(images)} images but {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= classes:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside [0, {classes})")
    return images, labels
