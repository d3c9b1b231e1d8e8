"""Training-time augmentation without TensorFlow: random crops of a padded image and
mirror images, drawn in NumPy from (seed, epoch) alone, so a resumed run sees the same
batches as an uninterrupted one."""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import numpy as np


class Augment(NamedTuple):
    """`data.augment`: pad every spatial axis by `crop_padding` background values and crop a
    random window of the original size; with `flip`, mirror the last spatial axis of half the
    examples. `background` is the value padding takes (a black pixel after normalisation)."""
    crop_padding: int = 0
    flip: bool = False
    background: float = 0.0

    @classmethod
    def of(cls, augment_cfg, split) -> "Augment":
        """From a config's `data.augment`, padding with the darkest value of `split`."""
        crop = augment_cfg.get("crop_padding", 0)
        background = float(split.images.min()) if crop and len(split.images) else 0.0
        return cls(crop, augment_cfg.get("flip", False), background)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The augmentation's generator for one epoch; apart from the batch order's stream."""
    return np.random.default_rng([int(seed), int(epoch), 1])


def crop(images: np.ndarray, padding: int, background: float,
         offsets: np.ndarray) -> np.ndarray:
    """Each example of `(batch, *spatial, C)` padded by `padding` on both sides of every
    spatial axis and cropped back to its size at its row of `offsets` `(batch, spatial rank)`
    (each 0..2 padding)."""
    spatial = images.shape[1:-1]
    pads = [(0, 0)] + [(padding, padding)] * len(spatial) + [(0, 0)]
    padded = np.pad(images, pads, constant_values=background)
    index = [np.arange(len(images)).reshape(-1, *([1] * len(spatial)))]
    for axis, size in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[axis] = size
        index.append(offsets[:, axis].reshape(-1, *([1] * len(spatial)))
                     + np.arange(size).reshape(1, *shape))
    return padded[tuple(index)]


def flip(images: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """The last spatial axis of the examples of `(batch, *spatial, C)` where the boolean
    `(batch,)` `mirrored` is set, mirrored."""
    mirror = images[:, ..., ::-1, :]
    return np.where(mirrored.reshape(-1, *([1] * (images.ndim - 1))), mirror, images)


def augmented(batches: Iterator, augment: Augment, seed: int, epoch: int,
              batch_size: Optional[int] = None, rows: slice = slice(None)) -> Iterator:
    """`(images, labels)` batches of epoch `epoch` with `augment` applied to the images.

    The batches may hold only `rows` of global batches of `batch_size` examples (a process's
    part, `jaxbp.app.parallel.process_rows`): the random draws are made for the global batch
    and these rows taken, so every example is augmented as in a single-process run.
    """
    rng = epoch_rng(seed, epoch)
    for images, labels in batches:
        n = len(images) if batch_size is None else batch_size
        if augment.crop_padding:
            offsets = rng.integers(0, 2 * augment.crop_padding + 1,
                                   size=(n, images.ndim - 2))[rows]
            images = crop(images, augment.crop_padding, augment.background, offsets)
        if augment.flip:
            images = flip(images, (rng.random(n) < 0.5)[rows])
        yield images, labels
