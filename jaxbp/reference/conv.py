"""Plain N-dimensional convolution and its transpose, differentiated by JAX.

`conv` is `lax.conv_general_dilated` plus bias; `conv_transpose` is, by definition, the
pullback of that convolution with respect to its input (JAX's own transpose of it), plus
bias.

Also home of the argument checking and the resolved hyperparameters (`ConvGeometry`,
`TransposeGeometry`) that `jaxbp.layers.conv` shares, so both twins accept and reject
exactly the same inputs.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
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


class TransposeGeometry(NamedTuple):
    """Validated, static (hashable) hyperparameters of one `conv_transpose` call.

    Attributes:
      conv: the convolution the call is the adjoint of, taking an x of spatial size `sizes`
        to y's. Its high padding is the given one less stride * (output_padding // stride):
        an output_padding of a stride or more (allowed below the dilation) adds rows past the
        windows of y's n positions, and the conv that has exactly n outputs pads less.
      sizes: spatial sizes of the result.
      pads: the padding as given, resolved to one (low, high) pair per axis.
      output_padding: per axis, as given or as "SAME" implies.
    """
    conv: ConvGeometry
    sizes: Tuple[int, ...]
    pads: Pairs
    output_padding: Tuple[int, ...]


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


class _Window(NamedTuple):
    rank: int
    w_shape: Tuple[int, ...]
    strides: Tuple[int, ...]
    dilation: Tuple[int, ...]
    windows: Tuple[int, ...]   # effective (dilated) kernel extent per axis


def _check_window(layer: str, rank: Optional[int], input_name: str, x, w, stride,
                  dilation) -> _Window:
    """The checks conv and conv_transpose share: x is channels-last with `rank` spatial axes
    (any of 1 to 3 for None), w is `(*kernel_spatial, in_ch // groups, out_ch)` with kernel
    sizes >= 1, stride and dilation ints >= 1 per axis. `input_name` is what messages call x."""
    rank = check_channels_last(layer, x, rank or 1, rank or 3)
    w_shape = tuple(getattr(w, "shape", ()))
    if len(w_shape) != rank + 2:
        raise fail(layer, f"expected kernel of shape (*kernel_spatial, in_ch // groups, out_ch) "
                          f"with {rank} spatial axes for {input_name} of shape {x.shape}, got "
                          f"shape {w_shape or type(w).__name__}")
    if min(w_shape[:rank]) < 1:
        raise fail(layer, f"kernel spatial sizes must be >= 1, got kernel shape {w_shape}")
    strides = spatial_tuple(layer, "stride", stride, rank)
    dilations = spatial_tuple(layer, "dilation", dilation, rank)
    windows = tuple(effective_window(k, d) for k, d in zip(w_shape[:rank], dilations))
    return _Window(rank, w_shape, strides, dilations, windows)


def _group_count(layer: str, groups) -> int:
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise fail(layer, f"groups must be an int >= 1, got {groups!r}")
    return int(groups)


def _check_groups(layer: str, groups, x_shape, w_shape) -> int:
    groups = _group_count(layer, groups)
    in_ch, out_ch = x_shape[-1], w_shape[-1]
    if in_ch % groups or out_ch % groups:
        raise fail(layer, f"groups={groups} must divide both the input channels ({in_ch}) and "
                          f"the output channels ({out_ch}); x shape {x_shape}, w shape {w_shape}")
    if w_shape[-2] * groups != in_ch:
        raise fail(layer, f"kernel of shape {w_shape} expects {w_shape[-2] * groups} input "
                          f"channels (w.shape[-2] * groups = {w_shape[-2]} * {groups}), but x of "
                          f"shape {x_shape} has {in_ch}")
    return groups


def _check_transposed_groups(layer: str, groups, y_shape, w_shape) -> int:
    groups = _group_count(layer, groups)
    out_ch = w_shape[-1]
    if y_shape[-1] != out_ch:
        raise fail(layer, f"kernel of shape {w_shape} takes y with {out_ch} channels "
                          f"(w.shape[-1], the out_ch of the conv it transposes), but y of shape "
                          f"{y_shape} has {y_shape[-1]}")
    if out_ch % groups:
        raise fail(layer, f"groups={groups} must divide the channels of y ({out_ch}); "
                          f"y shape {y_shape}, w shape {w_shape}")
    return groups


def _check_bias(layer: str, b, channels: int, why: str) -> None:
    if b is not None and tuple(getattr(b, "shape", ())) != (channels,):
        raise fail(layer, f"expected bias of shape ({channels},) ({why}), "
                          f"got {getattr(b, 'shape', type(b).__name__)}")


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
    window = _check_window(layer, rank, "x", x, w, stride, dilation)
    groups = _check_groups(layer, groups, x.shape, window.w_shape)
    _check_bias(layer, b, window.w_shape[-1], f"out_ch of kernel {window.w_shape}")
    in_sizes = x.shape[1:-1]
    pads = resolve_padding(layer, padding, in_sizes, window.windows, window.strides)
    output_sizes(layer, in_sizes, window.windows, window.strides, pads)
    return ConvGeometry(window.strides, pads, window.dilation, groups)


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


def transpose_geometry(layer: str, rank: Optional[int], y, w, b, stride, padding, dilation,
                       groups, output_padding) -> TransposeGeometry:
    """Checks shapes and hyperparameters of a transposed convolution before XLA sees them.

    Sizes as PyTorch's ConvTranspose: per axis the result has
    `(n - 1) * stride - low - high + (k - 1) * dilation + 1 + output_padding` positions, and
    output_padding must be smaller than the stride or the dilation. "SAME" is conv's "SAME"
    for an input of `n * stride`, the size the result then has (as TensorFlow's transposed
    convolution); it implies output_padding `max(stride - (k - 1) * dilation - 1, 0)`, so a
    given one must be 0.

    Args:
      layer: name used in error messages.
      rank: required number of spatial axes, or None for any of 1, 2, 3.
      y, w, b, stride, padding, dilation, groups, output_padding: as for `conv_transpose`.

    Returns:
      The resolved `TransposeGeometry`.

    Raises:
      LayerArgumentError (a ValueError) naming `layer`, what it got and what was expected.
    """
    window = _check_window(layer, rank, "y", y, w, stride, dilation)
    strides, w_shape = window.strides, window.w_shape
    groups = _check_transposed_groups(layer, groups, y.shape, w_shape)
    _check_bias(layer, b, w_shape[-2] * groups,
                f"in_ch = w.shape[-2] * groups = {w_shape[-2]} * {groups}")
    extra = spatial_tuple(layer, "output_padding", output_padding, window.rank, minimum=0)
    if any(e >= max(s, d) for e, s, d in zip(extra, strides, window.dilation)):
        raise fail(layer, f"output_padding must be smaller than the stride or the dilation on "
                          f"every axis, got output_padding={output_padding!r} with stride "
                          f"{strides} and dilation {window.dilation}")
    same = tuple(n * s for n, s in zip(y.shape[1:-1], strides))
    pads = resolve_padding(layer, padding, same, window.windows, strides)
    # The positions some window of y's reaches, less the padding: the result without extra.
    reached = [(n - 1) * s + k_eff - lo - hi
               for n, s, k_eff, (lo, hi) in zip(y.shape[1:-1], strides, window.windows, pads)]
    if isinstance(padding, str) and padding.upper() == "SAME":
        if any(extra):
            raise fail(layer, f"output_padding must be 0 with padding SAME, which settles the "
                              f"output size (y's times the stride, {same}), got "
                              f"{output_padding!r}")
        extra = tuple(size - r for size, r in zip(same, reached))
    sizes = tuple(r + e for r, e in zip(reached, extra))
    if min(sizes) < 1:
        raise fail(layer, f"padding {pads} leaves no output: (n - 1) * stride - low - high + "
                          f"(k - 1) * dilation + 1 + output_padding = {sizes} for y of spatial "
                          f"size {tuple(y.shape[1:-1])}")
    conv_pads = tuple((lo, hi - s * (e // s)) for (lo, hi), s, e in zip(pads, strides, extra))
    return TransposeGeometry(ConvGeometry(strides, conv_pads, window.dilation, groups), sizes,
                             pads, extra)


def transposed_shape(y_shape: Sequence[int], w_shape: Sequence[int],
                     geometry: TransposeGeometry) -> Tuple[int, ...]:
    """The shape of `conv_transpose`'s result, `(batch, *sizes, in_ch)`: the x of the conv
    it is the adjoint of."""
    return (y_shape[0], *geometry.sizes, w_shape[-2] * geometry.conv.groups)


def conv_transpose_forward(y, w, b, geometry: TransposeGeometry):
    """The pullback of `conv_forward(·, w)` at y, plus b: JAX's own transpose of the
    convolution, which is what `conv_transpose` is. The conv is linear in x, so its pullback
    is the same at every x; zeros will do."""
    x = jnp.zeros(transposed_shape(y.shape, w.shape, geometry), y.dtype)
    _, pullback = jax.vjp(lambda v: conv_forward(v, w, None, geometry.conv), x)
    return plus_bias(pullback(y)[0], b)


def conv_transpose(y, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1,
                   output_padding=0):
    """Plain twin of `jaxbp.layers.conv.conv_transpose` (same arguments and shapes),
    differentiated by JAX.

    y `(batch, *spatial, out_ch)`, w `(*kernel_spatial, in_ch // groups, out_ch)`, b
    `(in_ch,)` or None -> `(batch, *out_spatial, in_ch)`.
    """
    return conv_transpose_forward(y, w, b, transpose_geometry(
        "conv_transpose", None, y, w, b, stride, padding, dilation, groups, output_padding))


def fixed_rank(rank: int, full: Callable, apply: Callable,
               geometry: Callable = conv_geometry) -> Callable:
    """Builds `<full>{rank}d`: `full` (`conv` or `conv_transpose`, whose signature and
    defaults it takes) additionally requiring `rank` spatial axes.

    `geometry(layer, rank, x, w, b, **hyperparameters)` checks the arguments (`conv_geometry`
    or `transpose_geometry`), and `apply(x, w, b, geometry)` computes the layer.
    """
    layer = f"{full.__name__}{rank}d"
    signature = inspect.signature(full)

    def fixed(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return apply(*bound.args, geometry(layer, rank, *bound.args, **bound.kwargs))

    fixed.__name__ = fixed.__qualname__ = layer
    fixed.__module__ = full.__module__
    fixed.__signature__ = signature
    fixed.__doc__ = (f"{rank}-D `{full.__name__}`, restricted to an input of shape "
                     f"`(batch, *{rank} spatial, channels)`; see `{full.__name__}` for the "
                     f"arguments.")
    return fixed


conv1d, conv2d, conv3d = (fixed_rank(r, conv, conv_forward) for r in (1, 2, 3))
conv_transpose1d, conv_transpose2d, conv_transpose3d = (
    fixed_rank(r, conv_transpose, conv_transpose_forward, transpose_geometry) for r in (1, 2, 3))
