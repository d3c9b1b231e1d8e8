"""N-dimensional convolution with a hand-derived backward pass (one rule for 1-D, 2-D and 3-D).

Forward (jaxbp/layers/DERIVATIONS.md §2.1; a cross-correlation, channels-last, `c` running
over the group of `co`):
    y[n, o, co] = sum_{k, c} x_pad[n, o * s + k * d, c] w[k, c, co] + b[co]

Backward, given the output delta dy = dL/dy:
  * input delta (`_input_delta`, DERIVATIONS.md §2.2-§2.3, depth > 1 in §2.6): the FULL
    correlation of dy, spread out by the stride, with the 180-degree-rotated kernel, in/out
    channels swapped per group:
        dx[p, c] = sum_{k, co} dy[(p - k * d) / s, co] w[k, c, co]
    over the taps k where (p - k * d) / s is an output position (p indexes the padded input)
    (seed 003, the rotated-kernel post with pictures, stride and input depth; in 1-D seed
    000's delta(l-1)_i = sum_a delta(l)_{i-a} w_a, a Q&A on a 1-D convolutional layer).
  * kernel gradient (`_kernel_grad`, DERIVATIONS.md §2.4): the VALID correlation of the
    padded input with dy, summed over the batch:
        dw[k, c, co] = sum_{n, o} x_pad[n, o * s + k * d, c] dy[n, o, co]
    (seed 004, the Q&A working a 3x3 input's 2x2 filter gradient by hand: dE/dW1 =
    dG1 V1 + dG2 V2 + dG3 V4 + dG4 V5; seed 002, the Q&A tracing a conv/pool/dense net).
  * bias gradient (`_bias_grad`, DERIVATIONS.md §2.5): db[co] = sum_{n, o} dy[n, o, co].
Residuals: x and w.

Each of the forward and the three gradients is a slot of `jaxbp.fast`, which may choose a
faster formulation of the same equation for the call's shapes (`jaxbp/fast/conv.py`); the
functions here are the plain ones, XLA's convolutions.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp import fast
from jaxbp.reference.conv import (ConvGeometry, channels_last_numbers, conv_forward,
                                  conv_geometry, effective_window, fixed_rank)


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


def _input_delta(dy, w, *, x_shape: Sequence[int], geometry: ConvGeometry):
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


def _kernel_grad(x, dy, *, w_shape: Sequence[int], geometry: ConvGeometry):
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


def _bias_grad(dy):
    """dL/db `(out,)`: db[co] = sum_{n, o} dy[n, o, co], the delta summed over the batch and
    every output position."""
    return jnp.sum(dy, axis=tuple(range(dy.ndim - 1)))


class _Plan(NamedTuple):
    """The formulation of each slot ("conv.<field>") for one call, chosen by `jaxbp.fast`
    from static shapes; a static argument of `_conv`."""
    forward: fast.Choice
    input_delta: fast.Choice
    kernel_grad: fast.Choice
    bias_grad: fast.Choice


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv(x, w, b, geometry: ConvGeometry, with_bias: bool, plan: _Plan):
    return _conv_fwd(x, w, b, geometry, with_bias, plan)[0]


def _conv_fwd(x, w, b, geometry, with_bias, plan):
    y = plan.forward.run(conv_forward, x, w, b, geometry=geometry)
    return y, (x, w)


def _conv_bwd(geometry, with_bias, plan, residuals, dy):
    """dx = full correlation of dy with the rotated kernel (DERIVATIONS.md §2.2), dw = valid
    correlation of x_pad with dy (§2.4), db = dy summed over batch and positions (§2.5)."""
    x, w = residuals
    dx = plan.input_delta.run(_input_delta, dy, w, x_shape=x.shape, geometry=geometry)
    dw = plan.kernel_grad.run(_kernel_grad, x, dy, w_shape=w.shape, geometry=geometry)
    db = plan.bias_grad.run(_bias_grad, dy) if with_bias else None
    return dx, dw, db


_conv.defvjp(_conv_fwd, _conv_bwd)


def _apply(x, w, b, geometry: ConvGeometry):
    plan = _Plan(*(fast.choose(f"conv.{slot}", x.shape, w.shape, geometry)
                   for slot in _Plan._fields))
    return _conv(x, w, b, geometry, b is not None, plan)


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
      kernel (DERIVATIONS.md §2.2; seed 003, the rotated-kernel post), dw = correlation of x
      with dy summed over the batch (§2.4; seed 004, the filter gradient worked by hand),
      db = dy summed over batch and positions (§2.5). Residuals: x and w.

    Raises:
      ValueError: bad shapes or hyperparameters, checked before XLA sees them.
    """
    return _apply(x, w, b, conv_geometry("conv", None, x, w, b, stride, padding, dilation,
                                         groups))


conv1d, conv2d, conv3d = (fixed_rank(r, _apply) for r in (1, 2, 3))
