"""Argument checking and window geometry shared by every spatial layer.

Convolution and pooling slide a window over the spatial axes of a channels-last
array `(batch, *spatial, channels)`. Both accept the same forms of stride,
dilation and padding, so both validate them here: a bad value is reported as a
`ValueError` naming the layer and what was expected, before XLA sees anything.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np

IntOrTuple = Union[int, Sequence[int]]
Padding = Union[str, Sequence[Tuple[int, int]]]
Pairs = Tuple[Tuple[int, int], ...]


class LayerArgumentError(ValueError):
    """Raised when a layer receives shapes or hyperparameters it cannot use."""


def fail(layer: str, message: str) -> LayerArgumentError:
    """Builds the one-line error every layer raises: `"<layer>: <message>"`."""
    return LayerArgumentError(f"{layer}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def spatial_tuple(layer: str, name: str, value: IntOrTuple, rank: int,
                  minimum: int = 1) -> Tuple[int, ...]:
    """Expands an int, or checks a tuple, into `rank` Python ints >= `minimum`.

    Args:
      layer: layer name used in the error message.
      name: argument name used in the error message (e.g. "stride").
      value: an int applied to every spatial axis, or one int per axis.
      rank: number of spatial axes.
      minimum: smallest allowed value.

    Returns:
      A tuple of `rank` ints.
    """
    values = (value,) * rank if _is_int(value) else value
    try:
        values = tuple(values)
    except TypeError:
        raise fail(layer, f"{name} must be an int or a tuple of {rank} ints, got {value!r}") from None
    if len(values) != rank or not all(_is_int(v) for v in values):
        raise fail(layer, f"{name} must be an int or a tuple of {rank} ints "
                          f"(one per spatial axis), got {value!r}")
    if any(v < minimum for v in values):
        raise fail(layer, f"{name} must be >= {minimum} on every axis, got {value!r}")
    return tuple(int(v) for v in values)


def resolve_padding(layer: str, padding: Padding, in_sizes: Sequence[int],
                    windows: Sequence[int], strides: Sequence[int]) -> Pairs:
    """Turns "VALID", "SAME", an int or explicit pairs into one `(low, high)` pair per axis.

    "SAME" follows XLA/TensorFlow: output size `ceil(in / stride)`, the extra
    padding going to the high side. An int p is p on both sides of every axis
    (PyTorch's `padding=p`). `windows` are the effective (dilated) window sizes.

    Args:
      layer: layer name used in the error message.
      padding: "VALID", "SAME" (any case), an int >= 0 or a sequence of `(low, high)`
        int pairs.
      in_sizes: spatial sizes of the input.
      windows: effective window size per axis, `(k - 1) * dilation + 1`.
      strides: stride per axis.

    Returns:
      A tuple of `(low, high)` pairs, one per spatial axis.
    """
    rank = len(in_sizes)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * rank
        if mode == "SAME":
            pairs = []
            for size, window, stride in zip(in_sizes, windows, strides):
                out = -(-size // stride)
                total = max((out - 1) * stride + window - size, 0)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise fail(layer, f'padding must be "VALID", "SAME", an int or {rank} (low, high) '
                          f"pairs, got {padding!r}")
    if _is_int(padding):
        if padding < 0:
            raise fail(layer, f"padding must be >= 0, got {padding!r}")
        return ((int(padding), int(padding)),) * rank
    try:
        pairs = tuple(tuple(p) for p in padding)
    except TypeError:
        pairs = ()
    if (len(pairs) != rank or any(len(p) != 2 for p in pairs)
            or not all(_is_int(v) and v >= 0 for p in pairs for v in p)):
        raise fail(layer, f'padding must be "VALID", "SAME", an int or {rank} (low, high) '
                          f"pairs of ints >= 0, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def output_sizes(layer: str, in_sizes: Sequence[int], windows: Sequence[int],
                 strides: Sequence[int], pads: Pairs) -> Tuple[int, ...]:
    """Spatial output sizes `floor((in + low + high - window) / stride) + 1`.

    Raises if the (effective) window is larger than the padded input on any axis.
    """
    sizes = []
    for axis, (size, window, stride, (lo, hi)) in enumerate(zip(in_sizes, windows, strides, pads)):
        padded = size + lo + hi
        if window > padded:
            raise fail(layer, f"window of size {tuple(windows)} (after dilation) does not fit the "
                              f"padded input of spatial size "
                              f"{tuple(s + l + h for s, (l, h) in zip(in_sizes, pads))} "
                              f"(axis {axis}: {window} > {padded})")
        sizes.append((padded - window) // stride + 1)
    return tuple(sizes)


def check_channels_last(layer: str, x, min_rank: int = 1, max_rank: int = 3) -> int:
    """Checks `x` is `(batch, *spatial, channels)` and returns the spatial rank."""
    ndim = getattr(x, "ndim", None)
    if ndim is None or not (min_rank + 2 <= ndim <= max_rank + 2):
        shape = getattr(x, "shape", type(x).__name__)
        raise fail(layer, f"expected input of shape (batch, *spatial, channels) with "
                          f"{min_rank} to {max_rank} spatial axes, got shape {shape}")
    return ndim - 2
