"""N-dimensional convolution with a hand-derived backward pass (one rule for 1-D, 2-D and 3-D).

Forward (cross-correlation, channels-last, `c` running over the group of `co`):
    y[n, o, co] = sum_{k, c} x_pad[n, o * s + k * d, c] w[k, c, co] + b[co]

Backward, given the output delta dy = dL/dy:
  * input delta (`_input_delta`): the FULL correlation of dy with the 180-degree-rotated kernel,
    dx[p] = sum_k dy[(p - k * d) / s] w[k] (seed 003_9b8e0dca2bc08eb5.txt; in 1-D seed
    000_103740f910ca9c16.txt's delta(l-1)_i = sum_a delta(l)_{i-a} w_a), with in/out channels
    swapped per group (seed 003's question on inputs of depth > 1).
  * kernel gradient (`_kernel_grad`): dw[k, c, co] = sum_{n, o} x_pad[n, o * s + k * d, c]
    dy[n, o, co], the VALID correlation of the padded input with dy (seeds
    002_ccdd42be840614dd.txt, 004_dd8ea2c9e43caa87.txt: dE/dW1 = dG1 V1 + dG2 V2 + dG3 V4 + dG4 V5).
  * bias gradient (`_bias_grad`): db[co] = sum_{n, o} dy[n, o, co] (the bias question of seeds
    002 and 003).
Each gradient is a separate function of static shapes, so alternative formulations can be swapped
in per shape at trace time. For 1-3 input channels XLA's CPU convolutions are slow, so there the
forward is a stored sum over kernel taps of small products (`_forward_by_taps`, few outputs) or
one matmul over the stacked tap windows (`_forward_by_tap_matmul`, many outputs) and, with 16
or more outputs, the kernel gradient one matmul over the stacked tap windows
(`_kernel_grad_by_taps`). Where the input delta has few channels and the image is narrow
against the kernel, it is one matmul of each dy row with the kernel laid out as a banded matrix
along the width (`_input_delta_by_band`). `_forward`, `_input_delta` and `_kernel_grad` choose
(measurements by the constants below).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbp import runtime
from jaxbp.reference.conv import (ConvGeometry, channels_last_numbers, conv_forward,
                                  conv_geometry, effective_window, fixed_rank, plus_bias)


def _unreached(size: int, kernel: int, dilation: int, stride: int, pad: Tuple[int, int]) -> int:
    """Rows at the high end of the padded input that no window covers, the stride having
    overshot them; nothing flowed out of them, so their delta is 0."""
    lo, hi = pad
    return (size + lo + hi - effective_window(kernel, dilation)) % stride


def _per_axis(x_shape: Sequence[int], w_shape: Sequence[int], geometry: ConvGeometry):
    """Zips (size, kernel, dilation, stride, (lo, hi)) over the spatial axes."""
    rank = len(x_shape) - 2
    return zip(x_shape[1:-1], w_shape[:rank], geometry.dilation, geometry.strides, geometry.pads)


def _swap_channels(w, groups: int):
    """`(*k, in/G, out)` -> `(*k, out/G, in)`: within each group the output channels become the
    inputs of the backward correlation and the input channels its outputs."""
    *kernel, group_in, out = w.shape
    split = w.reshape(*kernel, group_in, groups, out // groups)
    swapped = jnp.swapaxes(split, -3, -1)
    return swapped.reshape(*kernel, out // groups, groups * group_in)


def _input_delta_by_conv(dy, w, x_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dx `(batch, *spatial, in)` from dy `(batch, *out_spatial, out)`.

    FULL correlation of dy, spread out by the stride (stride - 1 zeros between entries), with the
    rotated, channel-swapped kernel: pad (k_eff - 1 - lo) low and (k_eff - 1 - hi + unreached)
    high, so the result lands on the unpadded input and unreached rows get delta 0.
    """
    rank = dy.ndim - 2
    pads = tuple((effective_window(k, d) - 1 - lo,
                  effective_window(k, d) - 1 - hi + _unreached(n, k, d, s, (lo, hi)))
                 for n, k, d, s, (lo, hi) in _per_axis(x_shape, w.shape, geometry))
    rotated = lax.rev(_swap_channels(w, geometry.groups), tuple(range(rank)))
    return lax.conv_general_dilated(
        dy, rotated, window_strides=(1,) * rank, padding=pads, lhs_dilation=geometry.strides,
        rhs_dilation=geometry.dilation, dimension_numbers=channels_last_numbers(rank),
        feature_group_count=geometry.groups)


def _width_band(w, dy_width: int, in_width: int, low: int):
    """The kernel as one banded matrix per tap of the leading kernel axes, `(leading taps,
    dy_width * out, in_width * in)`: entry [l, (j, co), (u, c)] = w[l, q, c, co] where
    u + low = j + q for a width tap q, else 0. A row of dy times it is that row's share of
    the input delta along the whole width at once, every width tap included."""
    *kernel, inputs, outputs = w.shape
    taps, dy_at, x_at = np.ogrid[:kernel[-1], :dy_width, :in_width]
    shifts = jnp.asarray(x_at + low == dy_at + taps, w.dtype)
    leading = w.reshape(-1, kernel[-1], inputs, outputs)
    band = jnp.einsum("qju,lqco->ljouc", shifts, leading)
    return band.reshape(leading.shape[0], dy_width * outputs, in_width * inputs)


def _input_delta_by_band(dy, w, x_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dx `(batch, *spatial, in)` (stride 1, dilation 1, groups 1) as one matmul and a sum of
    shifts: each row of dy (the last spatial axis with the channels) times `_width_band` gives,
    per leading kernel tap l, a row of the delta, dx[n, u, :] = sum_l R[n, u + low - l, l, :]
    along the leading axes: the full correlation of dy with the rotated kernel (seed
    003_9b8e0dca2bc08eb5.txt), its width taps done inside the product. For few input
    channels XLA's convolution runs that correlation at about 20 GFLOP/s; the band does some
    multiplications by zero but at matmul speed.
    """
    rank = dy.ndim - 2
    *kernel, inputs, outputs = w.shape
    lows = [lo for lo, _ in geometry.pads]
    band = _width_band(w, dy.shape[-2], x_shape[-2], lows[-1])
    rows = dy.reshape(*dy.shape[:-2], dy.shape[-2] * outputs)
    per_tap = lax.dot_general(rows, band, (((rank,), (1,)), ((), ())))
    total = None
    for index, tap in enumerate(itertools.product(*(range(k) for k in kernel[:-1]))):
        shift = [(t - lo, n - m - t + lo, 0) for t, lo, n, m in
                 zip(tap, lows, x_shape[1:-2], dy.shape[1:-2])]
        part = lax.pad(per_tap[..., index, :], jnp.zeros((), dy.dtype),
                       [(0, 0, 0), *shift, (0, 0, 0)])
        total = part if total is None else total + part
    return total.reshape(x_shape)


def _kernel_grad_by_conv(x, dy, w_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dw `(*kernel, in/G, out)`: VALID correlation of the padded x with the spread-out dy.

    The batch axis is the contracted (feature) axis and the input channels play the batch, so
    one correlation gives every (kernel tap, in channel, out channel); `batch_group_count` pairs
    each output-channel group with its own input channels. The kernel dilation becomes the
    window stride, and the unreached high rows are cut off so exactly `kernel` taps come out.
    """
    rank = x.ndim - 2
    pads = tuple((lo, hi - _unreached(n, k, d, s, (lo, hi)))
                 for n, k, d, s, (lo, hi) in _per_axis(x.shape, w_shape, geometry))
    spatial = tuple(range(1, rank + 1))
    numbers = lax.ConvDimensionNumbers(lhs_spec=(rank + 1, 0) + spatial,
                                       rhs_spec=(rank + 1, 0) + spatial,
                                       out_spec=(rank, rank + 1) + tuple(range(rank)))
    return lax.conv_general_dilated(
        x, dy, window_strides=geometry.dilation, padding=pads, rhs_dilation=geometry.strides,
        dimension_numbers=numbers, batch_group_count=geometry.groups)


def _tap_windows(x, kernel: Sequence[int], geometry: ConvGeometry):
    """For each kernel tap k in row-major order, `x_pad[:, o * s + k * d, :]` at every output
    position o: a `(batch, *out, in)` strided slice of the padded input."""
    rank = x.ndim - 2
    x_pad = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *((lo, hi, 0) for lo, hi in
                                                             geometry.pads), (0, 0, 0)])
    out_sizes = [(n - effective_window(k, d)) // s + 1 for n, k, d, s in
                 zip(x_pad.shape[1:-1], kernel, geometry.dilation, geometry.strides)]
    for tap in itertools.product(*(range(k) for k in kernel)):
        start = [t * d for t, d in zip(tap, geometry.dilation)]
        limit = [a + (o - 1) * s + 1 for a, o, s in zip(start, out_sizes, geometry.strides)]
        yield tap, lax.slice(x_pad, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                             (1, *geometry.strides, 1))


def _stacked_tap_windows(x, kernel: Sequence[int], geometry: ConvGeometry, axis: int):
    """The `_tap_windows` stacked on a new `axis`, taps in row-major order."""
    return jnp.stack([window for _, window in _tap_windows(x, kernel, geometry)], axis=axis)


def _summed_tap_products(x, w, b, geometry: ConvGeometry):
    """y `(batch, *out, out_ch)` as one product per kernel tap k, summed:
    y[n, o, :] = sum_k x_pad[n, o * s + k * d, :] @ w[k] + b (groups == 1).

    With 1-3 input channels each product contracts over so few values that XLA fuses them all
    into one elementwise loop, while its convolution runs such shapes at 2-8 GFLOP/s.
    """
    rank = x.ndim - 2
    total = None
    for tap, window in _tap_windows(x, w.shape[:rank], geometry):
        product = lax.dot_general(window, w[tap], (((rank + 1,), (0,)), ((), ())))
        total = product if total is None else total + product
    return plus_bias(total, b)


def _stored(y):
    """y, as the result of a product with the identity over its channels.

    XLA's CPU compiler treats the summed tap products as a cheap elementwise loop and repeats
    them inside every later loop that reads y, including the backward's: behind ReLU and max
    pooling, each input delta recomputed five outputs of 25 taps each, and the classic LeNet-5
    step took 44 ms instead of 17 (batch 128). A matrix product is a library call whose result
    is stored once. Exact for finite y; a row holding an infinity turns NaN, which stops
    training all the same.
    """
    channels = y.shape[-1]
    return lax.dot_general(y, jnp.eye(channels, dtype=y.dtype), (((y.ndim - 1,), (0,)), ((), ())))


def _forward_by_taps(x, w, b, geometry: ConvGeometry):
    """`_summed_tap_products`, stored (`_stored`): for few outputs, where the identity product
    costs less than the taps."""
    return _stored(_summed_tap_products(x, w, b, geometry))


def _forward_by_tap_matmul(x, w, b, geometry: ConvGeometry):
    """y `(batch, *out, out_ch)` as one matmul: the tap windows stacked next to the input
    channels, `(batch, *out, taps, in)`, contracted with w reshaped to `(taps, in, out)`
    (groups == 1). Its result is stored like any product's, and for many outputs the stack
    of taps * in values per position costs less than `_stored`'s identity product.
    """
    rank = x.ndim - 2
    windows = _stacked_tap_windows(x, w.shape[:rank], geometry, axis=-2)
    kernel = w.reshape(-1, *w.shape[-2:])
    return plus_bias(lax.dot_general(windows, kernel, (((rank + 1, rank + 2), (0, 1)), ((), ()))),
                      b)


def _kernel_grad_by_taps(x, dy, w_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dw `(*kernel, in, out)` (groups == 1) as dw[k] = sum_{n, o} x_pad[n, o * s + k * d, :]^T
    dy[n, o, :]: the tap windows stacked on a leading axis, contracted with dy in one product
    (each kernel entry the sum of the inputs it met times their deltas, seed
    004_dd8ea2c9e43caa87.txt).

    For 1-3 input channels the stack is small and the product a plain (taps, batch * positions)
    x (batch * positions, out) matmul, where XLA's correlation first transposes dy.
    """
    rank = x.ndim - 2
    windows = _stacked_tap_windows(x, w_shape[:rank], geometry, axis=0)
    positions = tuple(range(rank + 1))
    contract = (tuple(p + 1 for p in positions), positions)
    grad = lax.dot_general(windows, dy, (contract, ((), ())))
    return grad.reshape(w_shape)


# At most this many input channels (and groups == 1) select a per-tap forward instead of XLA's
# convolution. Measured at batch 128 on 28x28 single-channel inputs (2 cores, XLA CPU, jaxbp's
# runtime defaults), alone: 5x5 to 3 outputs 0.4 ms vs 5.7 ms for XLA's convolution, 5x5 to 6
# 1.7 vs 10 ms, 3x3 to 32 1.1 vs 7 ms. Which per-tap forward (`_forward`) was measured in whole
# train steps (experiments/bench.py's models, batch 128 / 1024, ms): seed002 (5x5 to 3)
# summed taps alone 3.7 / 16.2, stored 3.7 / 20.8, tap matmul 7.8 / 45.3; classic LeNet-5 (5x5
# to 6) 44.1 / 318, 17.2 / 118, 22.0 / 148; lenet5 (3x3 to 32) 54.6 / 321, 53.2 / 322,
# 47.8 / 304; wide (3x3 to 32) 200 / 1411, 216 / 1481, 200 / 1494. Summed taps alone are fast
# until XLA repeats them (`_stored`), so they are always stored or replaced.
_TAPS_MAX_CHANNELS = 3
# ...and at least this many output channels also select `_kernel_grad_by_taps`. Same inputs:
# 3x3 to 32 outputs 3.6 ms vs 6.0 ms for XLA's correlation (wide's train step 152 vs 174-202
# ms), but 5x5 to 6 outputs 3.9 vs 3.1 ms and 5x5 to 3 3.4 vs 2.2 ms.
_TAPS_KERNEL_GRAD_MIN_OUT = 16


def _formulations_apply(geometry: ConvGeometry) -> bool:
    """Whether a formulation other than XLA's convolution may be chosen: groups 1, and the
    formulations on (`runtime.formulations_enabled`: the CPU backend, JAXBP_TUNING not 0)."""
    return geometry.groups == 1 and runtime.formulations_enabled()


def _few_input_channels(x, geometry: ConvGeometry) -> bool:
    """Whether the per-tap formulations apply."""
    return x.shape[-1] <= _TAPS_MAX_CHANNELS and _formulations_apply(geometry)


def _forward(x, w, b, geometry: ConvGeometry):
    """The forward: for few input channels `_forward_by_taps` when there are fewer outputs
    than taps * inputs (the identity product is then the cheaper way to store y), else
    `_forward_by_tap_matmul`; otherwise XLA's convolution (`conv_forward`, the reference)."""
    if not _few_input_channels(x, geometry):
        return conv_forward(x, w, b, geometry)
    *kernel, inputs, outputs = w.shape
    if outputs < math.prod(kernel) * inputs:
        return _forward_by_taps(x, w, b, geometry)
    return _forward_by_tap_matmul(x, w, b, geometry)


# `_input_delta_by_band` replaces XLA's correlation when (input channels) x (its multiplications
# / the correlation's) is at most this (stride 1, dilation 1, groups 1). XLA slows down as the
# delta gets fewer channels, the band as the width grows against the kernel's. Measured alone
# (ms, XLA / band, batch 128 unless noted; product in brackets): 14x14 5x5 valid, 6 channels
# from 16 (classic LeNet-5's second layer, [8.6]) 4.6 / 4.3, batch 1024 36 / 18; 16x16 [11]
# 6.6 / 3.0; 20x20 [15] 10.4 / 6.3; 14x14 "same" [17] 7.1 / 8.9, batch 1024 34 / 30; 28x28
# "same" [34] 17 / 21; 3x3 10x10 valid, 8 channels [17] 1.3 / 1.2, 12 [26] 1.4 / 1.7; 3x3
# "same" 3 channels at 14x14 [14] 3.8 / 2.1, 16 [75] 2.8 / 5.8, 32 to 64 [149] 12 / 31.
_BAND_MAX_COST = 16


def _band_cost(dy_shape: Sequence[int], x_shape: Sequence[int], w_shape: Sequence[int]) -> float:
    """Input channels times the band's multiplications over the correlation's: every dy row
    meets every input column, where the correlation pairs each input with the kernel's taps."""
    rank = len(x_shape) - 2
    band = math.prod(dy_shape[1:-1]) * x_shape[-2]
    correlation = math.prod(x_shape[1:-1]) * w_shape[rank - 1]
    return x_shape[-1] * band / correlation


def _input_delta(dy, w, x_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dx, by `_input_delta_by_band` where it is measured faster (`_BAND_MAX_COST`), else by
    `_input_delta_by_conv`."""
    unit = all(s == 1 for s in geometry.strides) and all(d == 1 for d in geometry.dilation)
    if (unit and _formulations_apply(geometry)
            and _band_cost(dy.shape, x_shape, w.shape) <= _BAND_MAX_COST):
        return _input_delta_by_band(dy, w, x_shape, geometry)
    return _input_delta_by_conv(dy, w, x_shape, geometry)


def _kernel_grad(x, dy, w_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dw `(*kernel, in/G, out)`, by `_kernel_grad_by_taps` for few inputs and many outputs,
    else by `_kernel_grad_by_conv`."""
    if _few_input_channels(x, geometry) and w_shape[-1] >= _TAPS_KERNEL_GRAD_MIN_OUT:
        return _kernel_grad_by_taps(x, dy, w_shape, geometry)
    return _kernel_grad_by_conv(x, dy, w_shape, geometry)


# `_bias_grad` sums rows of at least this many values. Measured alone (2 cores, ms): a
# 1024x28x28x6 delta 4.1 summed per channel, 1.2 in rows of 64; 128x28x28x3 0.26 / 0.14.
_BIAS_ROW_WIDTH = 64


def _bias_grad(dy):
    """dL/db `(out,)`: the delta summed over the batch and every output position.

    Consecutive positions are first summed side by side, as rows of m * out values: XLA's
    reduction over a few channels at a time runs at a quarter of memory speed."""
    channels = dy.shape[-1]
    positions = dy.size // channels
    side_by_side = max(1, _BIAS_ROW_WIDTH // channels) if runtime.formulations_enabled() else 1
    while positions % side_by_side:
        side_by_side -= 1
    rows = dy.reshape(positions // side_by_side, side_by_side * channels)
    return jnp.sum(rows, axis=0).reshape(side_by_side, channels).sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv(x, w, b, geometry: ConvGeometry, with_bias: bool):
    del with_bias
    return _forward(x, w, b, geometry)


def _conv_fwd(x, w, b, geometry, with_bias):
    del with_bias
    return _forward(x, w, b, geometry), (x, w)


def _conv_bwd(geometry, with_bias, residuals, dy):
    x, w = residuals
    return (_input_delta(dy, w, x.shape, geometry), _kernel_grad(x, dy, w.shape, geometry),
            _bias_grad(dy) if with_bias else None)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _apply(x, w, b, geometry: ConvGeometry):
    return _conv(x, w, b, geometry, b is not None)


def conv(x, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1):
    """N-dimensional convolution (a cross-correlation, as in every framework), 1 to 3 spatial axes.

    Args:
      x: input `(batch, *spatial, in_ch)`.
      w: kernel `(*kernel_spatial, in_ch // groups, out_ch)`.
      b: bias `(out_ch,)` or None.
      stride: int or one int per spatial axis.
      padding: "VALID", "SAME" or one `(low, high)` pair per spatial axis.
      dilation: kernel dilation, int or one int per spatial axis.
      groups: feature groups; divides in_ch and out_ch.

    Returns:
      y `(batch, *out_spatial, out_ch)`. Backward: dx = full correlation of dy with the rotated
      kernel (seed 003_9b8e0dca2bc08eb5.txt), dw = correlation of x with dy summed over the batch
      (seed 004_dd8ea2c9e43caa87.txt), db = dy summed over batch and positions (seed
      002_ccdd42be840614dd.txt). Residuals: x and w.

    Raises:
      ValueError: bad shapes or hyperparameters, checked before XLA sees them.
    """
    return _apply(x, w, b, conv_geometry("conv", None, x, w, b, stride, padding, dilation,
                                         groups))


conv1d, conv2d, conv3d = (fixed_rank(r, _apply) for r in (1, 2, 3))
