"""Pooling layers with hand-derived backward passes (jaxbp/layers/DERIVATIONS.md §3-§4).

Pooling has no weights; its backward only routes each output delta back to the inputs that
produced it:
  * max_pool (§3.1): dx[i] = sum of dy[j] over the windows j whose winner is input i: seed
    000's max-pool "upsampling" (the Q&A deriving a 1-D convolutional layer's delta), the
    3x12x12 -> 3x24x24 step of seed 002 (the Q&A tracing a conv 3@5x5 / sigmoid / max-pool /
    dense network). Residual: each window's winner (int8).
  * avg_pool (§3.2): dx[i] = sum of dy[j] / n[j] over the windows j holding input i, n[j]
    the real inputs in window j. No residual.
  * channel_max (§4, maxout): dx[..., g * G + i] = dy[..., g] where i wins group g, else 0
    (seed 001, the Q&A on a kernel bank with a max across kernels). Residual: the winners.

Both spatial pools read windows the same way: the input is padded (or cropped) to the span
the windows cover, and one strided slice per window offset gathers that element of every
window at once (`_window_elements`); no `reduce_window`, whose max backward is slow on CPU.
`_spread` is the transpose of that gather, and the "pool.spread" slot of `jaxbp.fast` (for
windows that tile the input, `jaxbp/fast/pooling.py` has a reshape instead).
"""
from __future__ import annotations

import itertools
from functools import partial, reduce
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbp import fast
from jaxbp._spatial import IntOrTuple, Padding
from jaxbp.reference import pooling as reference
from jaxbp.reference.pooling import PoolGeometry, channel_groups, pool_geometry


def _index_dtype(count: int):
    """Smallest integer type for a position among `count` candidates (the saved residual)."""
    return jnp.int8 if count <= np.iinfo(np.int8).max else jnp.int32


def _offsets(geometry: PoolGeometry):
    """Every offset inside a window, in row-major order (the order ties are broken in)."""
    return itertools.product(*(range(k) for k in geometry.window))


def _pad_spatial(x, value, pairs):
    config = [(0, 0, 0), *pairs, (0, 0, 0)]
    return lax.pad(x, jnp.array(value, x.dtype), config)


def _to_extent(x, geometry: PoolGeometry, value):
    """Pads with `value` (and crops inputs no window reaches) to exactly `geometry.extent`."""
    return _pad_spatial(x, value, [(lo, e - n - lo, 0) for n, (lo, _), e in
                                   zip(geometry.in_sizes, geometry.pads, geometry.extent)])


def _from_extent(d, geometry: PoolGeometry):
    """Transpose of `_to_extent`: drops padded positions, zero-fills uncovered inputs."""
    return _pad_spatial(d, 0, [(-lo, n + lo - e, 0) for n, (lo, _), e in
                               zip(geometry.in_sizes, geometry.pads, geometry.extent)])


def _spatial_slice(a, start, sizes, strides):
    """`sizes` elements per spatial axis from `start` in steps of `strides`, all batch/channels."""
    limit = [b + (n - 1) * s + 1 for b, n, s in zip(start, sizes, strides)]
    return lax.slice(a, (0, *start, 0), (a.shape[0], *limit, a.shape[-1]), (1, *strides, 1))


def _window_elements(x, geometry: PoolGeometry, fill):
    """For each window offset in row-major order, that element of every window at once:
    `(batch, *out_sizes, channels)` each, padded positions reading `fill`."""
    x_extent = _to_extent(x, geometry, fill)
    return (_spatial_slice(x_extent, offset, geometry.out_sizes, geometry.stride)
            for offset in _offsets(geometry))


def _spread(delta, winner, *, geometry: PoolGeometry):
    """The input delta over `geometry.extent` from per-window deltas (DERIVATIONS.md §3):
        dx[p] = sum over offsets d of share[(p - d) / stride], share = delta, or where
    `winner` is given delta where d is the window's winner and 0 elsewhere; overlapping
    windows add up. Dilating the per-window arrays once (window j moved to k - 1 + j * stride)
    makes each offset a unit-stride shift by k - 1 - d: no scatter, no per-offset padding."""
    dilate = [(k - 1, k - 1, s - 1) for k, s in zip(geometry.window, geometry.stride)]
    deltas = _pad_spatial(delta, 0, dilate)
    winners = None if winner is None else _pad_spatial(winner, -1, dilate)
    unit = [1] * len(geometry.window)
    total = None
    for index, offset in enumerate(_offsets(geometry)):
        start = [k - 1 - d for k, d in zip(geometry.window, offset)]
        share = _spatial_slice(deltas, start, geometry.extent, unit)
        if winners is not None:
            share = jnp.where(_spatial_slice(winners, start, geometry.extent, unit) == index,
                              share, 0)
        total = share if total is None else total + share
    return total


def _input_delta(delta, winner, geometry: PoolGeometry, spread: fast.Choice):
    """dL/dx: `_spread` (or the formulation `spread` names), cut back from the extent to x."""
    return _from_extent(spread.run(_spread, delta, winner, geometry=geometry), geometry)


def _choose_spread(x, geometry: PoolGeometry) -> fast.Choice:
    """The formulation of the "pool.spread" slot for this call, from static shapes."""
    return fast.choose("pool.spread", x.shape, geometry)


def _first_maximum(a, b):
    """Keeps the larger of two (value, position) pairs, NaN counting as largest and the
    lower position winning ties; a total order, so any reduction order gives the same winner."""
    (value_a, position_a), (value_b, position_b) = a, b
    nan_a, nan_b = jnp.isnan(value_a), jnp.isnan(value_b)
    tied = (value_b == value_a) | (nan_a & nan_b)
    b_wins = (value_b > value_a) | (nan_b & ~nan_a) | (tied & (position_b < position_a))
    return jnp.where(b_wins, value_b, value_a), jnp.where(b_wins, position_b, position_a)


@jax.custom_jvp
def _first_maxima(candidates):
    """The maximum over the last axis and the position of its first maximum, by one
    variadic reduction: XLA stores both, where a chain of elementwise selects was recomputed
    inside the backward for every input position, and a separate maximum read the windows
    twice (experiments/results/README.md, "Fusion: recomputed producers")."""
    window_axis = candidates.ndim - 1
    positions = lax.broadcasted_iota(_index_dtype(candidates.shape[-1]), candidates.shape,
                                     window_axis)
    lowest = (jnp.array(-jnp.inf, candidates.dtype), jnp.array(0, positions.dtype))
    return lax.reduce((candidates, positions), lowest, _first_maximum, (window_axis,))


@_first_maxima.defjvp
def _first_maxima_jvp(primals, tangents):
    """d max = the tangent of the winning candidate (JAX cannot differentiate a variadic
    reduction; the forward rule is differentiated for second derivatives)."""
    (candidates,), (d_candidates,) = primals, tangents
    maximum, winner = _first_maxima(candidates)
    d_maximum = jnp.take_along_axis(d_candidates, winner[..., None].astype(jnp.int32),
                                    axis=-1)[..., 0]
    return (maximum, winner), (d_maximum, np.zeros(winner.shape, jax.dtypes.float0))


def _max_and_winner(x, geometry: PoolGeometry):
    """Window maxima and the row-major position of the first maximum in each window."""
    return _first_maxima(jnp.stack(list(_window_elements(x, geometry, -jnp.inf)), axis=-1))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_pool(x, geometry: PoolGeometry, spread: fast.Choice):
    return _max_and_winner(x, geometry)[0]


def _max_pool_fwd(x, geometry: PoolGeometry, spread: fast.Choice):
    return _max_and_winner(x, geometry)


def _max_pool_bwd(geometry: PoolGeometry, spread: fast.Choice, winner, dy):
    """dx[i] = sum_j dy[j] [winner(j) == i] (DERIVATIONS.md §3.1)."""
    return (_input_delta(dy, winner, geometry, spread),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
             padding: Padding = "VALID"):
    """Max pooling over 1 to 3 spatial axes.

    Backward: dx[i] = sum of dy[j] over the windows j whose winner is input i
    (DERIVATIONS.md §3.1; seed 000's max-pool "upsampling" in the 1-D conv layer Q&A, and
    seed 002's 3x12x12 -> 3x24x24 step in the Q&A tracing a conv/pool/dense network).
    Tie rule: the first maximum in row-major order within the window wins, so a
    delta is never split or duplicated. Padded positions hold -inf and never win.
    NaN counts as the largest value, so it propagates as in `lax.max` and PyTorch.

    Args:
      x: `(batch, *spatial, channels)`, floating point, 1 to 3 spatial axes.
      window: window size, an int or one int per spatial axis.
      stride: an int or one per axis; defaults to `window`. Smaller than the
        window means overlapping windows, whose deltas add up at shared winners.
      padding: "VALID", "SAME" or one `(low, high)` pair per axis, each side
        smaller than the window.

    Returns:
      `(batch, *out_spatial, channels)`, out = floor((in + low + high - window) / stride) + 1.
      Residual saved for backward: the winner's position within each window
      (int8 for windows of up to 127 elements), the same shape as the output.
    """
    geometry = pool_geometry("max_pool", x, window, stride, padding)
    return _max_pool(x, geometry, _choose_spread(x, geometry))


def _real_counts(geometry: PoolGeometry, dtype):
    """Number of unpadded inputs in each window, shape `(1, *out_sizes, 1)`."""
    per_axis = [np.array([min(j * s + k, lo + n) - max(j * s, lo) for j in range(o)])
                for o, s, k, (lo, _), n in zip(geometry.out_sizes, geometry.stride,
                                               geometry.window, geometry.pads,
                                               geometry.in_sizes)]
    counts = reduce(np.multiply.outer, per_axis)
    return jnp.asarray(counts.reshape(1, *geometry.out_sizes, 1), dtype)


def _average(x, geometry: PoolGeometry):
    return reduce(jnp.add, _window_elements(x, geometry, 0)) / _real_counts(
        geometry, x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool(x, geometry: PoolGeometry, spread: fast.Choice):
    return _average(x, geometry)


def _avg_pool_fwd(x, geometry: PoolGeometry, spread: fast.Choice):
    return _average(x, geometry), None


def _avg_pool_bwd(geometry: PoolGeometry, spread: fast.Choice, _, dy):
    """dx[i] = sum over the windows j holding i of dy[j] / n[j] (DERIVATIONS.md §3.2)."""
    return (_input_delta(dy / _real_counts(geometry, dy.dtype), None, geometry, spread),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def avg_pool(x, window: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
             padding: Padding = "VALID"):
    """Average pooling over 1 to 3 spatial axes; padded positions are left out.

    Each output is the mean of the real inputs its window covers (PyTorch's
    `count_include_pad=False`): a window with n unpadded inputs divides by n.
    Backward: dx[i] = sum of dy[j] / n[j] over every window j containing input i
    (DERIVATIONS.md §3.2).

    Args:
      x: `(batch, *spatial, channels)`, floating point, 1 to 3 spatial axes.
      window: window size, an int or one int per spatial axis.
      stride: an int or one per axis; defaults to `window`.
      padding: "VALID", "SAME" or one `(low, high)` pair per axis, each side
        smaller than the window.

    Returns:
      `(batch, *out_spatial, channels)`, sizes as for `max_pool`. Nothing is
      saved for backward: the counts n depend on the shapes only.
    """
    geometry = pool_geometry("avg_pool", x, window, stride, padding)
    return _avg_pool(x, geometry, _choose_spread(x, geometry))


def _channel_winner(x, group_size: int):
    groups = channel_groups(x, group_size)
    return jnp.argmax(groups, axis=-1).astype(_index_dtype(group_size))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _channel_max(x, group_size: int):
    return reference.channel_max(x, group_size)


def _channel_max_fwd(x, group_size: int):
    return reference.channel_max(x, group_size), _channel_winner(x, group_size)


def _channel_max_bwd(group_size: int, winner, dy):
    """dx[..., g * G + i] = dy[..., g] [i == winner(g)] (DERIVATIONS.md §4)."""
    position = lax.broadcasted_iota(winner.dtype, (*winner.shape, group_size), winner.ndim)
    dx = jnp.where(position == winner[..., None], dy[..., None], 0)
    return (dx.reshape(*dy.shape[:-1], dy.shape[-1] * group_size),)


_channel_max.defvjp(_channel_max_fwd, _channel_max_bwd)


def channel_max(x, group_size: int):
    """Max over consecutive groups of `group_size` channels (maxout).

    DERIVATIONS.md §4; seed 001's "winner kernel" (the Q&A on a kernel bank with a max
    across kernels): l_p = max_i l_p^{c i}, so
    dl_p / dl_p^{c i} = [i == w(p)] and only the winning map gets the delta:
    dx[..., g * group_size + i] = dy[..., g] if i is the winner of group g, else 0.
    Tie rule: the first maximum (lowest channel) in the group wins.

    Args:
      x: `(..., channels)`, floating point; channels divisible by `group_size`.
      group_size: number of consecutive channels pooled into one.

    Returns:
      `(..., channels // group_size)`. Residual saved for backward: the winner's
      index within each group (int8 for groups of up to 127).
    """
    channel_groups(x, group_size)
    return _channel_max(x, int(group_size))
