"""Other formulations of the convolution rule's slots (`jaxbp/layers/conv.py`), faster than
XLA's CPU convolutions for some shapes: thin inputs (1-3 channels), 4-7 input channels and
thin input deltas.

Each computes the same equation as the plain formulation it replaces
(jaxbp/layers/DERIVATIONS.md §2):

  taps        conv.forward      y[n, o] = sum_k x_pad[n, o * s + k * d] @ w[k] + b, one small
                                product per kernel tap k, summed, then stored (`stored`)
  padded      conv.forward      XLA's convolution with the input channels zero-padded to a
                                multiple of 8 (the added terms are 0)
  band        conv.input_delta  the full correlation of dy with the rotated kernel
                                (DERIVATIONS.md §2.2; seed 003, the rotated-kernel post) as
                                one matmul per dy row with a banded matrix
  band        conv.kernel_grad  dw[k] = sum_{n, o} x_pad[n, o * s + k * d]^T dy[n, o]
                                (DERIVATIONS.md §2.4; seed 004, the filter gradient worked
                                by hand) as one matmul of every padded input row with every
                                delta row it meets, keeping the pairs whose width offset is a
                                kernel tap
  rows        conv.bias_grad    db = sum_{n, o} dy[n, o] (DERIVATIONS.md §2.5), summing
                                several positions side by side first

All need groups == 1. Which one runs is chosen by `jaxbp.fast` from the thresholds below,
CPU measurements each (`experiments/results/README.md`, the section named beside it).
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbp.fast import Formulation
from jaxbp.reference.conv import ConvGeometry, conv_forward, effective_window, plus_bias

# The thresholds; the measurements behind each: experiments/results/README.md, the section
# named beside it.
_TAPS_MAX_CHANNELS = 3          # taps: "Convolution: per-tap forward"
_PADDED_INPUTS = range(4, 8)    # padded: "Convolution: padded input channels"
_PADDED_MIN_OUT = 16
_PADDED_MULTIPLE = 8
_BAND_MAX_COST = 16             # band: "Convolution: banded input delta"
_BAND_KERNEL_GRAD_MAX_OUT = 8   # kernel_grad band: "Convolution: banded kernel gradient"
_BAND_KERNEL_GRAD_MAX_WASTE = 10
_BIAS_ROW_WIDTH = 64            # rows: "Convolution: bias gradient by rows"


# ---------------------------------------------------------------- tap windows

def _padded(x, geometry: ConvGeometry):
    """x `(batch, *spatial, in)` with the geometry's zero padding on every spatial axis."""
    return lax.pad(x, jnp.zeros((), x.dtype),
                   [(0, 0, 0), *((lo, hi, 0) for lo, hi in geometry.pads), (0, 0, 0)])


def _tap_windows(x, kernel: Sequence[int], geometry: ConvGeometry):
    """For each kernel tap k in row-major order, `x_pad[:, o * s + k * d, :]` at every output
    position o: a `(batch, *out, in)` strided slice of the padded input."""
    x_pad = _padded(x, geometry)
    out_sizes = [(n - effective_window(k, d)) // s + 1 for n, k, d, s in
                 zip(x_pad.shape[1:-1], kernel, geometry.dilation, geometry.strides)]
    for tap in itertools.product(*(range(k) for k in kernel)):
        start = [t * d for t, d in zip(tap, geometry.dilation)]
        limit = [a + (o - 1) * s + 1 for a, o, s in zip(start, out_sizes, geometry.strides)]
        yield tap, lax.slice(x_pad, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                             (1, *geometry.strides, 1))


# ---------------------------------------------------------------- conv.forward

def _first_of_pair(a, b):
    """Of two (value, position) pairs, the one at the lower position: a total order, so the
    reduction in `stored` returns its position-0 operand whatever order XLA reduces in."""
    (value_a, position_a), (value_b, position_b) = a, b
    b_first = position_b < position_a
    return jnp.where(b_first, value_b, value_a), jnp.where(b_first, position_b, position_a)


@jax.custom_jvp
def stored(y):
    """y itself, bit for bit (infinities and NaN included), as the result of a variadic
    reduction: y paired with zeros, keeping the first of each pair.

    XLA's CPU compiler treats the summed tap products as a cheap elementwise loop and repeats
    them inside every later loop that reads y, the backward's included. A variadic reduction
    is a result XLA stores once, as fast as the product with the identity that stored it
    before (which turned a row holding an infinity into NaN); an optimization barrier does not
    do it, XLA's CPU pipeline removing barriers before fusion. Measurements:
    experiments/results/README.md, "Convolution: storing the summed taps".
    """
    pair = jnp.stack([y, jnp.zeros_like(y)], axis=-1)
    position = lax.broadcasted_iota(jnp.int8, pair.shape, y.ndim)
    init = (np.array(0, y.dtype), np.array(2, np.int8))
    value, _ = lax.reduce((pair, position), init, _first_of_pair, (y.ndim,))
    return value


# JAX cannot differentiate a variadic reduction; what it computes is the identity.
stored.defjvp(lambda primals, tangents: (stored(*primals), *tangents))


def forward_by_taps(x, w, b, *, geometry: ConvGeometry):
    """y `(batch, *out, out_ch)` as one product per kernel tap k, summed and stored:
    y[n, o, :] = sum_k x_pad[n, o * s + k * d, :] @ w[k] + b.

    With 1-3 input channels each product contracts over so few values that XLA fuses them all
    into one elementwise loop, where its convolution is slow for so few channels.
    """
    rank = x.ndim - 2
    total = None
    for tap, window in _tap_windows(x, w.shape[:rank], geometry):
        product = lax.dot_general(window, w[tap], (((rank + 1,), (0,)), ((), ())))
        total = product if total is None else total + product
    return stored(plus_bias(total, b))


def _taps_selected(x_shape, w_shape, geometry: ConvGeometry) -> bool:
    """1-3 input channels."""
    return x_shape[-1] <= _TAPS_MAX_CHANNELS


def forward_padded(x, w, b, *, geometry: ConvGeometry):
    """y `(batch, *out, out_ch)` by XLA's convolution with the input channels zero-padded to a
    multiple of 8, the kernel's input axis with them: the same sum plus terms that are 0 * 0,
    which XLA's CPU convolution computes faster than the unpadded one (6 -> 16 channels of 5x5
    on 14x14: 0.71 ms padded beforehand, 0.96 unpadded)."""
    rank = x.ndim - 2
    extra = -x.shape[-1] % _PADDED_MULTIPLE
    x = jnp.pad(x, [(0, 0)] * (rank + 1) + [(0, extra)])
    w = jnp.pad(w, [(0, 0)] * rank + [(0, extra), (0, 0)])
    return conv_forward(x, w, b, geometry)


def _padded_selected(x_shape, w_shape, geometry: ConvGeometry) -> bool:
    """4-7 input channels and at least 16 outputs."""
    return x_shape[-1] in _PADDED_INPUTS and w_shape[-1] >= _PADDED_MIN_OUT


# ---------------------------------------------------------------- conv.input_delta

def _width_band(w, dy_width: int, in_width: int, low: int):
    """The kernel as one banded matrix per tap of the leading kernel axes, `(leading taps,
    dy_width * out, in_width * in)`: entry [l, (j, co), (u, c)] = w[l, q, c, co] where
    u + low = j + q for a width tap q, else 0. A row of dy times it is that row's share of
    the input delta along the whole width at once, every width tap included. Built as
    shifted slices of the zero-padded kernel, row block j starting at tap low - j."""
    *kernel, inputs, outputs = w.shape
    leading = w.reshape(-1, kernel[-1], inputs, outputs)
    before = max(0, dy_width - 1 - low)
    after = max(0, low + in_width - kernel[-1])
    padded = jnp.pad(leading, ((0, 0), (before, after), (0, 0), (0, 0)))
    starts = [before + low - j for j in range(dy_width)]
    band = jnp.stack([padded[:, a:a + in_width] for a in starts], axis=1)
    band = jnp.transpose(band, (0, 1, 4, 2, 3))  # (leading, j, out, u, in)
    return band.reshape(leading.shape[0], dy_width * outputs, in_width * inputs)


def input_delta_by_band(dy, w, *, x_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dx `(batch, *spatial, in)` (stride 1, dilation 1) as one matmul and a sum of shifts:
    each row of dy (the last spatial axis with the channels) times `_width_band` gives, per
    leading kernel tap l, a row of the delta, dx[n, u, :] = sum_l R[n, u + low - l, l, :]
    along the leading axes: the full correlation of dy with the rotated kernel, its width taps
    done inside the product. It multiplies by the band's zeros, but at matmul speed, where
    XLA's correlation is slow for thin deltas."""
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
    # stored: XLA would recompute the shifted sum in every consumer, four times over in the
    # spread of a 2x2 max pool below (experiments/results/README.md, "banded kernel gradient")
    return stored(total.reshape(x_shape))


def _unit_steps(x_shape, w_shape, geometry: ConvGeometry) -> bool:
    """Stride 1, dilation 1, groups 1: what the band is written for."""
    return (geometry.groups == 1 and all(s == 1 for s in geometry.strides)
            and all(d == 1 for d in geometry.dilation))


def band_cost(x_shape, w_shape, geometry: ConvGeometry) -> float:
    """Input channels times the band's multiplications over the correlation's: every dy row
    meets every input column, where the correlation pairs each input with the kernel's taps
    (stride 1, so dy has the unpadded output sizes below)."""
    rank = len(x_shape) - 2
    dy_sizes = [n + lo + hi - k + 1 for n, k, (lo, hi) in
                zip(x_shape[1:-1], w_shape[:rank], geometry.pads)]
    band = math.prod(dy_sizes) * x_shape[-2]
    correlation = math.prod(x_shape[1:-1]) * w_shape[rank - 1]
    return x_shape[-1] * band / correlation


def _band_selected(x_shape, w_shape, geometry: ConvGeometry) -> bool:
    return band_cost(x_shape, w_shape, geometry) <= _BAND_MAX_COST


# ---------------------------------------------------------------- conv.kernel_grad

def _leading_rows_transposed(x, kernel: Sequence[int], out_sizes: Sequence[int],
                             geometry: ConvGeometry):
    """The padded input as `(leading taps * padded width * in, batch * leading out positions)`:
    row (l, u, c), column (n, o) holds x_pad[n, o * s + l * d, u, c] along the leading axes
    (every axis but the width), the whole padded width kept."""
    rank = x.ndim - 2
    x_pad = _padded(x, geometry)
    # (width, in, batch, *leading): a leading-axis slice is then a block of whole columns
    moved = jnp.moveaxis(x_pad, (rank, rank + 1), (0, 1))
    rows = []
    for tap in itertools.product(*(range(k) for k in kernel[:-1])):
        start = [t * d for t, d in zip(tap, geometry.dilation)]
        limit = [a + (o - 1) * s + 1 for a, o, s in zip(start, out_sizes, geometry.strides)]
        rows.append(lax.slice(moved, (0, 0, 0, *start), (*moved.shape[:3], *limit),
                              (1, 1, 1, *geometry.strides[:-1])))
    stacked = jnp.stack(rows)
    return stacked.reshape(-1, x.shape[0] * math.prod(out_sizes))


def kernel_grad_by_band(x, dy, *, w_shape: Sequence[int], geometry: ConvGeometry):
    """dL/dw `(*kernel, in, out)` as one matmul: every padded input row against every delta
    row that meets it along the leading axes, summed over the batch and the leading
    positions, G[(l, u, c), (j, co)] = sum_{n, o} x_pad[n, o * s + l * d, u, c] dy[n, o, j, co];
    then dw[l, q, c, co] = sum_j G[(l, j * s + q * d, c), (j, co)], the pairs whose width
    offset is a kernel tap (DERIVATIONS.md §2.4; seed 004, the filter gradient worked by
    hand). It multiplies every pair, not only the kernel's width taps, but at matmul speed,
    reading dy as it lies, where XLA's correlation is slow for a thin input and first
    transposes dy."""
    *kernel, inputs, outputs = w_shape
    rows = _leading_rows_transposed(x, kernel, dy.shape[1:-2], geometry)
    pairs = rows @ dy.reshape(rows.shape[1], dy.shape[-2] * outputs)
    padded_width = rows.shape[0] // (math.prod(kernel[:-1]) * inputs)
    pairs = pairs.reshape(-1, padded_width, inputs, dy.shape[-2], outputs)
    taps, u, j = np.ogrid[:kernel[-1], :padded_width, :dy.shape[-2]]
    tap_of_pair = jnp.asarray(u == j * geometry.strides[-1] + taps * geometry.dilation[-1],
                              x.dtype)
    return jnp.einsum("lucjo,quj->lqco", pairs, tap_of_pair).reshape(w_shape)


def _kernel_band_selected(x_shape, w_shape, geometry: ConvGeometry) -> bool:
    """1-3 input channels, at most 8 outputs, and a padded width at most 10 times the kernel's
    (the band multiplies that many pairs per useful one)."""
    *kernel, inputs, outputs = w_shape
    lo, hi = geometry.pads[-1]
    padded_width = x_shape[-2] + lo + hi
    return (x_shape[-1] <= _TAPS_MAX_CHANNELS and outputs <= _BAND_KERNEL_GRAD_MAX_OUT
            and padded_width <= _BAND_KERNEL_GRAD_MAX_WASTE * kernel[-1])


# ---------------------------------------------------------------- conv.bias_grad

def _side_by_side(positions: int, channels: int) -> int:
    """How many consecutive positions `bias_grad_by_rows` sums at once: enough for rows of
    `_BIAS_ROW_WIDTH` values, lowered until it divides the positions."""
    count = max(1, _BIAS_ROW_WIDTH // channels)
    while positions % count:
        count -= 1
    return count


def bias_grad_by_rows(dy):
    """dL/db `(out,)`: dy summed as rows of m * out values (m consecutive positions side by
    side), then the m partial sums folded: XLA's reduction over a few channels at a time runs
    at a quarter of memory speed."""
    channels = dy.shape[-1]
    positions = dy.size // channels
    count = _side_by_side(positions, channels)
    rows = dy.reshape(positions // count, count * channels)
    return jnp.sum(rows, axis=0).reshape(count, channels).sum(axis=0)


def _rows_selected(x_shape, w_shape, geometry: ConvGeometry) -> bool:
    """At most 32 output channels: at least two positions fit in a row."""
    return _BIAS_ROW_WIDTH // w_shape[-1] >= 2


def _groups_one(x_shape, w_shape, geometry: ConvGeometry) -> bool:
    return geometry.groups == 1


def _always(*shapes) -> bool:
    return True


FORMULATIONS = (
    Formulation("conv.forward", "taps", forward_by_taps, _groups_one, "groups 1",
                _taps_selected),
    Formulation("conv.forward", "padded", forward_padded, _groups_one, "groups 1",
                _padded_selected),
    Formulation("conv.input_delta", "band", input_delta_by_band, _unit_steps,
                "stride 1, dilation 1 and groups 1", _band_selected),
    Formulation("conv.kernel_grad", "band", kernel_grad_by_band, _groups_one, "groups 1",
                _kernel_band_selected),
    Formulation("conv.bias_grad", "rows", bias_grad_by_rows, _always, "nothing",
                _rows_selected),
)
