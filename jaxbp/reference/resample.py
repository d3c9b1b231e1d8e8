"""Plain twins of `jaxbp.layers.resample`: global average pooling and nearest upsampling."""
from __future__ import annotations

import jax.numpy as jnp

from jaxbp._spatial import IntOrTuple, check_channels_last, spatial_tuple
from jaxbp.reference.pooling import check_floating


def check_global_avg_pool(x) -> None:
    check_channels_last("global_avg_pool", x, 1, 3)
    check_floating("global_avg_pool", x)


def global_avg_pool(x):
    """`(batch, *spatial, C)` -> `(batch, C)`: the mean over every spatial position."""
    check_global_avg_pool(x)
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def upsample_factors(x, factor: IntOrTuple):
    """Checks `upsample`'s arguments; the factor per spatial axis."""
    rank = check_channels_last("upsample", x, 1, 3)
    check_floating("upsample", x)
    return spatial_tuple("upsample", "factor", factor, rank)


def upsample(x, factor: IntOrTuple):
    """Nearest-neighbour upsampling: each input repeated `factor` times along each spatial
    axis, `(batch, *spatial, C)` -> `(batch, *(spatial * factor), C)`."""
    for axis, f in enumerate(upsample_factors(x, factor), start=1):
        x = jnp.repeat(x, f, axis=axis)
    return x
