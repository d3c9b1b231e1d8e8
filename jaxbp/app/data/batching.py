"""Mini-batches of an in-memory split, reproducible from (seed, epoch) alone."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from jaxbp.app.data.errors import DataError


def _check_count(what: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{what} must be an integer >= {minimum}, got {value!r}")


def num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    """How many batches one epoch over ``n`` examples yields."""
    _check_count("number of examples", n, 0)
    _check_count("batch_size", batch_size, 1)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Example indices for one epoch: a permutation that depends on (seed, epoch) only.

    Seeding a fresh generator per epoch (instead of advancing one across
    epochs) is what lets a run resumed at epoch ``e`` see exactly the batches
    an uninterrupted run would.
    """
    _check_count("seed", seed, 0)
    _check_count("epoch", epoch, 0)
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def epoch_batches(
    split, batch_size: int, seed: int, epoch: int, *, shuffle: bool = True,
    drop_remainder: bool = True, rows: slice = slice(None)
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(images, labels)`` batches of one epoch over ``split``.

    Args:
      split: a :class:`jaxbp.app.data.Split` (anything with ``images``/``labels``).
      batch_size: examples per batch.
      seed, epoch: the permutation is a function of these two only.
      shuffle: False keeps the stored order (e.g. for evaluation).
      drop_remainder: drop the last, smaller batch.
      rows: which rows of each batch to read (a process's part of the global batch,
        ``jaxbp.app.parallel.process_rows``); all of them by default.
    """
    n = len(split.labels)
    # Checked here, not inside the generator, so bad arguments fail at the call.
    count = num_batches(n, batch_size, drop_remainder)
    order = epoch_order(n, seed, epoch, shuffle)
    return _take_batches(split, order, batch_size, count, rows)


def _take_batches(split, order: np.ndarray, batch_size: int, count: int, rows: slice):
    for b in range(count):
        idx = order[b * batch_size:(b + 1) * batch_size][rows]
        yield split.images[idx], split.labels[idx]
