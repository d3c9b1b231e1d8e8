"""Training-time augmentation without TensorFlow: random crops of a padded image and
mirror images, drawn in NumPy from (seed, epoch) alone, so a resumed run sees the same
batches as an uninterrupted one."""
from __future__ import annotations

from typing import Iterator, NamedTuple

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


def random_crop(images: np.ndarray, padding: int, background: float,
                rng: np.random.Generator) -> np.ndarray:
    """Each example of `(batch, *spatial, C)` padded by `padding` on both sides of every
    spatial axis and cropped back to its size at a random offset (0..2 padding per axis)."""
    spatial = images.shape[1:-1]
    pads = [(0, 0)] + [(padding, padding)] * len(spatial) + [(0, 0)]
    padded = np.pad(images, pads, constant_values=background)
    offsets = rng.integers(0, 2 * padding + 1, size=(len(images), len(spatial)))
    index = [np.arange(len(images)).reshape(-1, *([1] * len(spatial)))]
    for axis, size in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[axis] = size
        index.append(offsets[:, axis].reshape(-1, *([1] * len(spatial)))
                     + np.arange(size).reshape(1, *shape))
    return padded[tuple(index)]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The last spatial axis of each example of `(batch, *spatial, C)` mirrored with
    probability 1/2."""
    flipped = rng.random(len(images)) < 0.5
    mirror = images[:, ..., ::-1, :]
    return np.where(flipped.reshape(-1, *([1] * (images.ndim - 1))), mirror, images)


def augmented(batches: Iterator, augment: Augment, seed: int, epoch: int) -> Iterator:
    """`(images, labels)` batches of epoch `epoch` with `augment` applied to the images."""
    rng = epoch_rng(seed, epoch)
    for images, labels in batches:
        if augment.crop_padding:
            images = random_crop(images, augment.crop_padding, augment.background, rng)
        if augment.flip:
            images = random_flip(images, rng)
        yield images, labels
