"""Pooling layers with hand-derived backward passes.

Pooling has no weights; its backward only routes each output delta back to the
inputs that produced it: to the window's winner for a max ("upsample" in seed
000_103740f910ca9c16.txt, the 3x12x12 -> 3x24x24 step of seed
002_ccdd42be840614dd.txt), spread evenly for a mean.

Both pools read windows the same way: the input is padded (or cropped) to the
span the windows cover, and one strided slice per window offset gathers that
element of every window at once (`_window_elements`); no `reduce_window`, whose
max backward is slow on CPU. `_spread` is the transpose of that gather.
"""
from __future__ import annotations

import itertools
from functools import partial, reduce
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def _interleave(outer, inner):
    return [d for pair in zip(outer, inner) for d in pair]


def _as_blocks(a, geometry: PoolGeometry):
    """`(batch, *out, C)` -> `(batch, o1, 1, o2, 1, ..., C)`, to broadcast over tiled windows."""
    ones = [1] * len(geometry.window)
    return a.reshape(a.shape[0], *_interleave(geometry.out_sizes, ones), a.shape[-1])


def _spread_tiled(delta, winner, geometry: PoolGeometry):
    """`_spread` for windows that partition the input: a reshape interleaves them back."""
    blocks = _as_blocks(delta, geometry)
    if winner is None:
        blocks = jnp.broadcast_to(blocks, (delta.shape[0], *_interleave(
            geometry.out_sizes, geometry.window), delta.shape[-1]))
    else:
        ones = [1] * len(geometry.window)
        position = jnp.arange(geometry.window_size, dtype=winner.dtype).reshape(
            1, *_interleave(ones, geometry.window), 1)
        blocks = jnp.where(position == _as_blocks(winner, geometry), blocks, 0)
    return _from_extent(blocks.reshape(delta.shape[0], *geometry.extent, delta.shape[-1]),
                        geometry)


def _spread_overlapping(delta, winner, geometry: PoolGeometry):
    """`_spread` for any geometry: dx[p] = sum over offsets d of the share of window
    (p - d) / stride. Dilating the per-window arrays once (window j moved to
    k - 1 + j * stride) makes that window a unit-stride shift by k - 1 - d, so no
    scatter and no per-offset full-size padding is needed."""
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
    return _from_extent(total, geometry)


def _spread(delta, winner, geometry: PoolGeometry):
    """Input delta from per-window deltas: window j sends `delta[j]` to each of its elements,
    or, where `winner` is given, to element `winner[j]` only; overlapping windows add up."""
    if geometry.tiles:
        return _spread_tiled(delta, winner, geometry)
    return _spread_overlapping(delta, winner, geometry)


def _first_maximum(a, b):
    """Keeps the larger of two (value, position) pairs, NaN counting as largest and the
    lower position winning ties; a total order, so any reduction order gives the same winner."""
    (value_a, position_a), (value_b, position_b) = a, b
    nan_a, nan_b = jnp.isnan(value_a), jnp.isnan(value_b)
    tied = (value_b == value_a) | (nan_a & nan_b)
    b_wins = (value_b > value_a) | (nan_b & ~nan_a) | (tied & (position_b < position_a))
    return jnp.where(b_wins, value_b, value_a), jnp.where(b_wins, position_b, position_a)


def _max_and_winner(x, geometry: PoolGeometry):
    """Window maxima and the row-major position of the first maximum in each window.

    One variadic reduction over the stacked window elements: XLA keeps its winner as a
    stored array, where a chain of elementwise selects was recomputed inside the
    backward for every input position (classic LeNet-5's first pool, batch 1024:
    28 -> 10 ms forward and backward)."""
    candidates = jnp.stack(list(_window_elements(x, geometry, -jnp.inf)), axis=-1)
    window_axis = candidates.ndim - 1
    positions = lax.broadcasted_iota(_index_dtype(geometry.window_size), candidates.shape,
                                     window_axis)
    lowest = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, positions.dtype))
    # JAX cannot differentiate a variadic reduction; the maximum alone is one it can.
    _, winner = lax.reduce((lax.stop_gradient(candidates), positions), lowest, _first_maximum,
                           (window_axis,))
    return jnp.max(candidates, axis=window_axis), winner


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, geometry: PoolGeometry):
    return _max_and_winner(x, geometry)[0]


def _max_pool_fwd(x, geometry: PoolGeometry):
    return _max_and_winner(x, geometry)


def _max_pool_bwd(geometry: PoolGeometry, winner, dy):
    return (_spread(dy, winner, geometry),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
             padding: Padding = "VALID"):
    """Max pooling over 1 to 3 spatial axes.

    Backward: dx[i] = sum of dy[j] over the windows j whose winner is input i
    (seed 000_103740f910ca9c16.txt's "upsample"; seed 002_ccdd42be840614dd.txt).
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
    return _max_pool(x, pool_geometry("max_pool", x, window, stride, padding))


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


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _avg_pool(x, geometry: PoolGeometry):
    return _average(x, geometry)


def _avg_pool_fwd(x, geometry: PoolGeometry):
    return _average(x, geometry), None


def _avg_pool_bwd(geometry: PoolGeometry, _, dy):
    return (_spread(dy / _real_counts(geometry, dy.dtype), None, geometry),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def avg_pool(x, window: IntOrTuple, *, stride: Optional[IntOrTuple] = None,
             padding: Padding = "VALID"):
    """Average pooling over 1 to 3 spatial axes; padded positions are left out.

    Each output is the mean of the real inputs its window covers (PyTorch's
    `count_include_pad=False`): a window with n unpadded inputs divides by n.
    Backward: dx[i] = sum of dy[j] / n[j] over every window j containing input i.

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
    return _avg_pool(x, pool_geometry("avg_pool", x, window, stride, padding))


def _channel_winner(x, group_size: int):
    groups = channel_groups(x, group_size)
    return jnp.argmax(groups, axis=-1).astype(_index_dtype(group_size))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _channel_max(x, group_size: int):
    return reference.channel_max(x, group_size)


def _channel_max_fwd(x, group_size: int):
    return reference.channel_max(x, group_size), _channel_winner(x, group_size)


def _channel_max_bwd(group_size: int, winner, dy):
    position = lax.broadcasted_iota(winner.dtype, (*winner.shape, group_size), winner.ndim)
    dx = jnp.where(position == winner[..., None], dy[..., None], 0)
    return (dx.reshape(*dy.shape[:-1], dy.shape[-1] * group_size),)


_channel_max.defvjp(_channel_max_fwd, _channel_max_bwd)


def channel_max(x, group_size: int):
    """Max over consecutive groups of `group_size` channels (maxout).

    Seed 001_3d5194c7da1093ab.txt's "winner kernel": l_p = max_i l_p^{c i}, so
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
