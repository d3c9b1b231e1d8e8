"""Another formulation of the pooling rules' slot (`jaxbp/layers/pooling.py`):

  tiled  pool.spread  the input delta for windows that partition the input (stride ==
                      window, as in the 3x24x24 -> 3x12x12 max pool of seed 002, the Q&A
                      tracing a conv/pool/dense network; jaxbp/layers/DERIVATIONS.md
                      §3.1-§3.2): a reshape interleaves the per-window deltas back, where
                      the plain spread sums one shifted copy per window offset.

Chosen wherever it applies, on every platform: it does less of the same work, on no
threshold (measured: experiments/results/README.md, "Pooling: tiled spread").
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxbp.fast import Formulation
from jaxbp.reference.pooling import PoolGeometry


def _interleave(outer, inner):
    return [d for pair in zip(outer, inner) for d in pair]


def _as_blocks(a, geometry: PoolGeometry):
    """`(batch, *out, C)` -> `(batch, o1, 1, o2, 1, ..., C)`, to broadcast over tiled windows."""
    ones = [1] * len(geometry.window)
    return a.reshape(a.shape[0], *_interleave(geometry.out_sizes, ones), a.shape[-1])


def spread_tiled(delta, winner, *, geometry: PoolGeometry):
    """The spread over `geometry.extent` for windows that tile it: window j's delta broadcast
    over its block (or, given `winner`, kept at the winner's position only), the blocks
    reshaped into place."""
    blocks = _as_blocks(delta, geometry)
    if winner is None:
        blocks = jnp.broadcast_to(blocks, (delta.shape[0], *_interleave(
            geometry.out_sizes, geometry.window), delta.shape[-1]))
    else:
        ones = [1] * len(geometry.window)
        position = jnp.arange(geometry.window_size, dtype=winner.dtype).reshape(
            1, *_interleave(ones, geometry.window), 1)
        blocks = jnp.where(position == _as_blocks(winner, geometry), blocks, 0)
    return blocks.reshape(delta.shape[0], *geometry.extent, delta.shape[-1])


def _tiles(x_shape, geometry: PoolGeometry) -> bool:
    return geometry.tiles


FORMULATIONS = (
    Formulation("pool.spread", "tiled", spread_tiled, _tiles,
                "windows that tile the input (stride == window)", _tiles, platform=None),
)
