"""Inverted dropout with a hand-derived backward pass (jaxbp/layers/DERIVATIONS.md §9).

Forward: y = x ⊙ keep / (1 - rate), keep drawn from the key (`jaxbp.reference.dropout`'s
`keep_mask`, so the twin draws the very same mask). Backward: y is linear in x with a
diagonal Jacobian, so dx = δ ⊙ keep / (1 - rate), with the SAME mask.
"""
from __future__ import annotations

import functools

import jax

from jaxbp.reference.dropout import check_dropout, dropped, keep_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dropout(x, key, rate: float):
    return dropped(x, keep_mask(key, rate, x.shape), rate)


def _dropout_fwd(x, key, rate):
    keep = keep_mask(key, rate, x.shape)
    return dropped(x, keep, rate), keep


def _dropout_bwd(rate, keep, dy):
    return dropped(dy, keep, rate), None   # the key has no gradient


_dropout.defvjp(_dropout_fwd, _dropout_bwd)


def dropout(x, rate: float, key):
    """Inverted dropout: keeps each entry with probability 1 - rate, scaled by 1 / (1 - rate).

    Backward: dx = δ ⊙ keep / (1 - rate). Saves the bool mask, one byte per entry as relu's,
    rather than the key: redrawing the mask in the backward would generate the random bits a
    second time (threefry, dozens of integer ops per entry, more than the rest of the layer)
    to save that byte.

    Args:
      x: floating point, any shape (e.g. `(batch, *spatial, C)`).
      rate: the probability of dropping an entry, a static Python number in [0, 1); 0 returns
        x itself.
      key: a PRNG key, typed (`jax.random.key`) or raw uint32 (`jax.random.PRNGKey`).

    Returns:
      Array of x's shape and dtype.
    """
    check_dropout(x, rate, key)
    if rate == 0:
        return x
    return _dropout(x, key, float(rate))
