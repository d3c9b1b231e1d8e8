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

`conv_transpose` (DERIVATIONS.md §10) is the input delta made a layer: its forward is
`_input_delta`, and its backward is conv's forward and conv's kernel gradient with the roles
of x and dy swapped, each in its plain formulation.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxbp import fast
from jaxbp.reference.conv import (ConvGeometry, TransposeGeometry, channels_last_numbers,
                                  conv_forward, conv_geometry, effective_window, fixed_rank,
                                  plus_bias, transpose_geometry, transposed_shape)


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


conv1d, conv2d, conv3d = (fixed_rank(r, conv, _apply) for r in (1, 2, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv_transpose(y, w, b, geometry: TransposeGeometry, with_bias: bool):
    return _conv_transpose_fwd(y, w, b, geometry, with_bias)[0]


def _conv_transpose_fwd(y, w, b, geometry, with_bias):
    """z = conv's input delta (§2.2-§2.3) with y as the delta, plus b; z has conv's x shape."""
    x_shape = transposed_shape(y.shape, w.shape, geometry)
    z = plus_bias(_input_delta(y, w, x_shape=x_shape, geometry=geometry.conv), b)
    return z, (y, w)


def _conv_transpose_bwd(geometry, with_bias, residuals, dz):
    """dy = conv(dz, w), the conv whose input delta z is (DERIVATIONS.md §10); dw = conv's kernel
    gradient (§2.4) with dz as its x and y as its dy; db = dz summed over batch and positions."""
    y, w = residuals
    dy = conv_forward(dz, w, None, geometry.conv)
    dw = _kernel_grad(dz, y, w_shape=w.shape, geometry=geometry.conv)
    db = _bias_grad(dz) if with_bias else None
    return dy, dw, db


_conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


def _apply_transpose(y, w, b, geometry: TransposeGeometry):
    return _conv_transpose(y, w, b, geometry, b is not None)


def conv_transpose(y, w, b=None, *, stride=1, padding="VALID", dilation=1, groups=1,
                   output_padding=0):
    """Transposed convolution, the exact adjoint of `conv`: the seeds' rot180 symmetry, made a
    layer. The backward of conv_transpose is conv, as the backward of conv is conv_transpose.

    `conv_transpose(dy, w, stride=s, padding=p, dilation=d, groups=g)` is the input delta of
    `conv(x, w, stride=s, padding=p, dilation=d, groups=g)` for an x of the result's size:
    the full correlation of y, spread out by the stride, with the rotated, channel-swapped
    kernel (`_input_delta`, DERIVATIONS.md §2.2-§2.3). Sizes as PyTorch's ConvTranspose, the
    padding being the conv's: per axis
    `(n - 1) * stride - low - high + (k - 1) * dilation + 1 + output_padding`.

    Args:
      y: input `(batch, *spatial, out_ch)`, shaped like the output of the conv it transposes.
      w: that conv's kernel, `(*kernel_spatial, in_ch // groups, out_ch)`.
      b: bias `(in_ch,)` or None.
      stride: int or one int per spatial axis.
      padding: the conv's padding: "VALID", "SAME", an int or one `(low, high)` pair per
        spatial axis. "SAME" is conv's "SAME" for an input of `n * stride`: the result has
        `n * stride` positions per axis, the output_padding that takes being implied.
      dilation: kernel dilation, int or one int per spatial axis.
      groups: feature groups; divides out_ch.
      output_padding: int or one per spatial axis, smaller than the stride or the dilation
        (PyTorch's rule): the rows added at the high end, which the stride leaves open.

    Returns:
      z `(batch, *out_spatial, in_ch)`. Backward (DERIVATIONS.md §10), given dz:
      dy = conv(dz, w) with the same stride, padding, dilation and groups; dw = conv's kernel
      gradient with dz playing x and y playing dy, summed over the batch; db = dz summed over
      batch and positions. Residuals: y and w.

    Raises:
      ValueError: bad shapes or hyperparameters, checked before XLA sees them.
    """
    return _apply_transpose(y, w, b, transpose_geometry(
        "conv_transpose", None, y, w, b, stride, padding, dilation, groups, output_padding))


conv_transpose1d, conv_transpose2d, conv_transpose3d = (
    fixed_rank(r, conv_transpose, _apply_transpose, transpose_geometry) for r in (1, 2, 3))
