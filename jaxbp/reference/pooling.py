"""Plain pooling twins of `jaxbp.layers.pooling`, differentiated by JAX itself.

Also home of the argument checking both twins share, so a bad window, stride or
padding is rejected with the same message by the hand layer and its oracle.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbp._spatial import (IntOrTuple, Padding, Pairs, check_channels_last, fail,
                            output_sizes, resolve_padding, spatial_tuple)


class PoolGeometry(NamedTuple):
    """Static description of a pooling window sliding over the spatial axes.

    Hashable, so the hand layers pass it to `jax.custom_vjp` as a nondiff argument.
    """
    window: Tuple[int, ...]
    stride: Tuple[int, ...]
    pads: Pairs
    in_sizes: Tuple[int, ...]
    out_sizes: Tuple[int, ...]

    @property
    def extent(self) -> Tuple[int, ...]:
        """Span of the padded input that some window covers, per axis."""
        return tuple((o - 1) * s + k for o, s, k in zip(self.out_sizes, self.stride, self.window))

    @property
    def window_size(self) -> int:
        return math.prod(self.window)

    @property
    def tiles(self) -> bool:
        """True where the windows partition `extent`: no overlap and no gaps."""
        return self.window == self.stride


def check_floating(layer: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise fail(layer, f"expected a floating-point input, got dtype {x.dtype}")


def pool_geometry(layer: str, x, window: IntOrTuple, stride: Optional[IntOrTuple],
                  padding: Padding) -> PoolGeometry:
    """Validates the pooling arguments against `x` and resolves them per spatial axis.

    Padding must be smaller than the window on each side, so every window holds
    at least one real input (a max over padding alone would be -inf, a mean 0/0).
    """
    rank = check_channels_last(layer, x, 1, 3)
    check_floating(layer, x)
    windows = spatial_tuple(layer, "window", window, rank)
    strides = windows if stride is None else spatial_tuple(layer, "stride", stride, rank)
    in_sizes = tuple(x.shape[1:-1])
    pads = resolve_padding(layer, padding, in_sizes, windows, strides)
    if any(side >= k for pair, k in zip(pads, windows) for side in pair):
        raise fail(layer, f"padding {pads} must be smaller than the window {windows} on every "
                          f"side, or a window could cover padding only")
    out = output_sizes(layer, in_sizes, windows, strides, pads)
    return PoolGeometry(windows, strides, pads, in_sizes, out)


def _reduce_windows(x, init, op, geometry: PoolGeometry):
    # A concrete NumPy init value is what lets JAX recognise the max/add monoid, and so
    # differentiate the reduction.
    return lax.reduce_window(x, np.array(init, x.dtype), op, (1, *geometry.window, 1),
                             (1, *geometry.stride, 1), ((0, 0), *geometry.pads, (0, 0)))


def max_pool(x, window: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
             padding: Padding = "VALID"):
    """Max over each window; padded positions hold -inf. See `jaxbp.layers.max_pool`."""
    geometry = pool_geometry("max_pool", x, window, stride, padding)
    return _reduce_windows(x, -jnp.inf, lax.max, geometry)


def avg_pool(x, window: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
             padding: Padding = "VALID"):
    """Mean of the real (unpadded) inputs in each window. See `jaxbp.layers.avg_pool`."""
    geometry = pool_geometry("avg_pool", x, window, stride, padding)
    ones = jnp.ones((1, *geometry.in_sizes, 1), x.dtype)
    counts = _reduce_windows(ones, 0, lax.add, geometry)
    return _reduce_windows(x, 0, lax.add, geometry) / counts


def channel_groups(x, group_size: int):
    """Checks `channel_max`'s arguments and splits the last axis into `(C // g, g)`."""
    if getattr(x, "ndim", 0) < 1:
        raise fail("channel_max", f"expected an input with a channel axis, got shape "
                                  f"{getattr(x, 'shape', type(x).__name__)}")
    check_floating("channel_max", x)
    is_int = isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool)
    if not is_int or group_size < 1:
        raise fail("channel_max", f"group_size must be an int >= 1, got {group_size!r}")
    channels = x.shape[-1]
    if channels % group_size:
        raise fail("channel_max", f"{channels} channels (input shape {x.shape}) are not "
                                  f"divisible by group_size {group_size}")
    return x.reshape(*x.shape[:-1], channels // group_size, group_size)


def channel_max(x, group_size: int):
    """Max over consecutive groups of channels (maxout). See `jaxbp.layers.channel_max`.

    Picked by `argmax` (the first maximum, the hand rule's tie rule) rather than `jnp.max`:
    JAX differentiates `jnp.max` by comparing the input with the maximum, and where XLA
    recomputes the input inside a fused program (batch norm's output, say) with other
    rounding, no entry compares equal and the delta is lost (NaN without optimisations).
    An index gathered once cannot miss.
    """
    groups = channel_groups(x, group_size)
    winner = jnp.argmax(groups, axis=-1, keepdims=True)
    return jnp.take_along_axis(groups, winner, axis=-1)[..., 0]
