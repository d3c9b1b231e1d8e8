"""Global average pooling and nearest upsampling with hand-derived backward passes
(jaxbp/layers/DERIVATIONS.md §8).

  * global_avg_pool: y[n, c] = (1/P) sum_p x[n, p, c] over the P spatial positions, so every
    input gets an equal share of its channel's delta: dx[n, p, c] = dy[n, c] / P.
  * upsample: y[n, u, c] = x[n, floor(u / f), c], each input copied into an f-block, so each
    input's delta is the sum of its block's deltas: dx = sum pooling of dy over f-blocks.
Neither saves anything for the backward: both deltas depend on the shapes only.
"""
from __future__ import annotations

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp

from jaxbp._spatial import IntOrTuple
from jaxbp.reference import resample as reference
from jaxbp.reference.resample import check_global_avg_pool, upsample_factors


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _global_avg_pool(x, shape: Tuple[int, ...]):
    del shape
    return reference.global_avg_pool(x)


def _global_avg_pool_fwd(x, shape):
    return _global_avg_pool(x, shape), None


def _global_avg_pool_bwd(shape, _, dy):
    positions = math.prod(shape[1:-1])
    share = (dy / positions).reshape(shape[0], *([1] * (len(shape) - 2)), shape[-1])
    return (jnp.broadcast_to(share, shape),)


_global_avg_pool.defvjp(_global_avg_pool_fwd, _global_avg_pool_bwd)


def global_avg_pool(x):
    """Mean over every spatial position: `(batch, *spatial, C)` -> `(batch, C)`, 1 to 3
    spatial axes.

    Backward: dx[n, p, c] = dy[n, c] / P, P the number of spatial positions. Saves nothing.
    """
    check_global_avg_pool(x)
    return _global_avg_pool(x, tuple(x.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _upsample(x, factors: Tuple[int, ...]):
    return reference.upsample(x, factors)


def _upsample_fwd(x, factors):
    return _upsample(x, factors), None


def _upsample_bwd(factors, _, dy):
    blocks = []
    for size, f in zip(dy.shape[1:-1], factors):
        blocks += [size // f, f]
    summed = dy.reshape(dy.shape[0], *blocks, dy.shape[-1])
    return (jnp.sum(summed, axis=tuple(range(2, 2 * len(factors) + 1, 2))),)


_upsample.defvjp(_upsample_fwd, _upsample_bwd)


def upsample(x, factor: IntOrTuple):
    """Nearest-neighbour upsampling by `factor` (an int, or one per spatial axis).

    Backward: dx[n, i, c] = sum of dy[n, u, c] over the block u in [i * f, (i + 1) * f) per
    axis: a sum pool of the delta with window and stride f. Saves nothing.

    Args:
      x: `(batch, *spatial, C)`, floating point, 1 to 3 spatial axes.
      factor: int >= 1, or one per spatial axis.

    Returns:
      `(batch, *(spatial * factor), C)`.
    """
    return _upsample(x, upsample_factors(x, factor))
