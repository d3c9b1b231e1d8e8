"""MNIST-1D, generated offline by the ``mnist1d`` package and cached as .npz.

Only ``make_dataset`` is used: the package's ``get_dataset`` downloads.
"""

from __future__ import annotations

import importlib.metadata
import os
import random

import numpy as np

from jaxbp.app.data.errors import DataError

SEQUENCE_LENGTH = 40
_KEYS = {"train": ("x", "y"), "test": ("x_test", "y_test")}


def cache_path(data_root: str) -> str:
    """Where the generated arrays live; keyed on the package version, since
    the data are made with that version's default arguments."""
    version = importlib.metadata.version("mnist1d")
    return os.path.join(data_root, f"mnist1d-{version}.npz")


def generate() -> dict[str, np.ndarray]:
    """The default MNIST-1D split (4000 train, 1000 test, length 40).

    ``make_dataset`` reseeds Python's and NumPy's global generators; their
    states are restored so that callers' randomness is left as it was.
    """
    from mnist1d.data import get_dataset_args, make_dataset  # slow import, only when generating

    saved = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return {key: np.asarray(data[key]) for pair in _KEYS.values() for key in pair}


def prepare_mnist1d(data_root: str) -> str:
    """Generate and cache the arrays unless cached; returns the .npz path."""
    path = cache_path(data_root)
    if os.path.isfile(path):
        return path
    arrays = generate()
    try:
        os.makedirs(data_root, exist_ok=True)
        # Write then rename, so a concurrent or interrupted run never sees half a file.
        partial = f"{path}.{os.getpid()}.partial.npz"
        np.savez(partial, **arrays)
        os.replace(partial, path)
    except OSError as err:
        raise DataError(f"cannot write MNIST-1D cache {path}: {err}") from err
    return path


def read_mnist1d(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(signals float64 (N, 40, 1), labels int64 (N,))`` of one split."""
    x_key, y_key = _KEYS[split]
    try:
        with np.load(path) as arrays:
            x, y = arrays[x_key], arrays[y_key]
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"corrupt MNIST-1D cache {path} ({err}): delete it to regenerate") from err
    return x.reshape(len(x), SEQUENCE_LENGTH, 1), y.astype(np.int64)
