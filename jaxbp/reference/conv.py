"""Plain N-dimensional convolution: `lax.conv_general_dilated` plus bias, differentiated by JAX.

Also home of the argument checking and the resolved hyperparameters
(`ConvGeometry`) that `jaxbp.layers.conv` shares, so both twins accept and
reject exactly the same inputs.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np
from jax import lax

from jaxbp._spatial import (Pairs, check_channels_last, fail, output_sizes, resolve_padding,
                            spatial_tuple)


class ConvGeometry(NamedTuple):
    """Validated, static (hashable) hyperparameters of one convolution call."""
    strides: Tuple[int, ...]
    pads: Pairs
    dilation: Tuple[int, ...]
    groups: int


def channels_last_numbers(rank: int) -> lax.ConvDimensionNumbers:
    """Dimension numbers for x `(batch, *spatial, C)`, w `(*kernel, I, O)`,
    y `(batch, *spatial, O)`."""
    spatial = tuple(range(1, rank + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, rank + 1) + spatial,
                                    rhs_spec=(rank + 1, rank) + tuple(range(rank)),
                                    out_spec=(0, rank + 1) + spatial)


def effective_window(kernel: int, dilation: int) -> int:
    """Extent of a kernel of `kernel` taps spread `dilation` apart: `(k - 1) * d + 1`."""
    return (kernel - 1) * dilation + 1


def _check_groups(layer: str, groups, x_shape, w_shape) -> int:
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise fail(layer, f"groups must be an int >= 1, got {groups!r}")
    groups = int(groups)
    in_ch, out_ch = x_shape[-1], w_shape[-1]
    if in_ch % groups or out_ch % groups:
        raise fail(layer, f"groups={groups} must divide both the input channels ({in_ch}) and "
                          f"the output channels ({out_ch}); x shape {x_shape}, w shape {w_shape}")
    if w_shape[-2] * groups != in_ch:
        raise fail(layer, f"kernel of shape {w_shape} expects {w_shape[-2] * groups} input "
                          f"channels (w.shape[-2] * groups = {w_shape[-2]} * {groups}), but x of "
                          f"shape {x_shape} has {in_ch}")
    return groups


def conv_geometry(layer: str, rank: Optional[int], x, w, b, stride, padding, dilation,
                  groups) -> ConvGeometry:
    """Checks shapes and hyperparameters of a convolution call before XLA sees them.

    Args:
      layer: name used in error messages.
      rank: required number of spatial axes, or None for any of 1, 2, 3.
      x, w, b, stride, padding, dilation, groups: as for `conv`.

    Returns:
      The resolved `ConvGeometry`.

    Raises:
      LayerArgumentError (a ValueError) naming `layer`, the shapes got and what was expected.
    """
    rank = check_channels_last(layer, x, rank or 1, rank or 3)
    w_shape = tuple(getattr(w, "shape", ()))
    if len(w_shape) != rank + 2:
        raise fail(layer, f"expected kernel of shape (*kernel_spatial, in_ch // groups, out_ch) "
                          f"with {rank} spatial axes for x of shape {x.shape}, got shape "
                          f"{w_shape or type(w).__name__}")
    if min(w_shape[:rank]) < 1:
        raise fail(layer, f"kernel spatial sizes must be >= 1, got kernel shape {w_shape}")
    groups = _check_groups(layer, groups, x.shape, w_shape)
    if b is not None and tuple(getattr(b, "shape", ())) != (w_shape[-1],):
        raise fail(layer, f"expected bias of shape ({w_shape[-1]},) (out_ch of kernel {w_shape}), "
                          f"got {getattr(b, 'shape', type(b).__name__)}")
    strides = spatial_tuple(layer, "stride", stride, rank)
    dilations = spatial_tuple(layer, "dilation", dilation, rank)
    windows = [effective_window(k, d) for k, d in zip(w_shape[:rank], dilations)]
    in_sizes = x.shape[1:-1]
    pads = resolve_padding(layer, padding, in_sizes, windows, strides)
    output_sizes(layer, in_sizes, windows, strides, pads)
    return ConvGeometry(strides, pads, dilations, groups)


def plus_bias(y, b):
    """y + b over the last (channel) axis; y itself when b is None."""
    return y if b is None else y + lax.broadcast_in_dim(b, y.shape, (y.ndim - 1,))


def conv_forward(x, w, b, geometry: ConvGeometry):
    """`y[n, o, co] = sum_{k, c} x_pad[n, o * stride + k * dilation, c] w[k, c, co] + b[co]`
    (the channels `c` restricted to the group of `co`)."""
    y = lax.conv_general_dilated(
        x, w, window_strides=geometry.strides, padding=geometry.pads,
        rhs_dilation=geometry.dilation, dimension_numbers=channels_last_numbers(x.ndim - 2),
        feature_group_count=geometry.groups)
    return plus_bias(y, b)


def conv(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1):
    """Plain twin of `jaxbp.layers.conv.conv` (same arguments and shapes), differentiated by JAX.

    x `(batch, *spatial, in_ch)`, w `(*kernel_spatial, in_ch // groups, out_ch)`, b `(out_ch,)`
    or None -> `(batch, *out_spatial, out_ch)`.
    """
    return conv_forward(x, w, b, conv_geometry("conv", None, x, w, b, stride, padding,
                                               dilation, groups))


def fixed_rank(rank: int, apply: Callable) -> Callable:
    """Builds `conv{rank}d`: `conv` that additionally requires `rank` spatial axes.

    `apply(x, w, b, geometry)` computes the convolution once the arguments are checked.
    """
    layer = f"conv{rank}d"

    def conv_nd(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1):
        return apply(x, w, b, conv_geometry(layer, rank, x, w, b, stride, padding, dilation,
                                            groups))

    conv_nd.__name__ = conv_nd.__qualname__ = layer
    conv_nd.__module__ = apply.__module__
    conv_nd.__doc__ = (f"{rank}-D convolution: `conv` restricted to x of shape "
                       f"`(batch, *{rank} spatial, in_ch)`; see `conv` for the arguments.")
    return conv_nd


conv1d, conv2d, conv3d = (fixed_rank(r, conv_forward) for r in (1, 2, 3))
