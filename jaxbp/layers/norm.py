"""Layer normalisation with a hand-derived backward pass (jaxbp/layers/DERIVATIONS.md §8).

Forward over the last axis (C features): x̂ = (x - μ) / σ with μ the mean, σ = sqrt(var + eps)
(biased variance), y = x̂ ⊙ scale + offset.

Backward, with g = δ ⊙ scale: the mean and the variance depend on every feature, so the
input delta has three terms, not one:
    dx = (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂)) / σ      (means over the last axis)
    dscale = Σ δ ⊙ x̂,  doffset = Σ δ             (sums over every axis but the last)
An all-ones δ makes the last two terms of dx vanish (Σ x̂ = 0), which is why
`jaxbp.testing.check_rule` draws non-uniform cotangents.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbp.reference.norm import affine, check_layer_norm, normalized, per_feature


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, offset, eps: float):
    return affine(normalized(x, eps)[0], scale, offset)


def _layer_norm_fwd(x, scale, offset, eps):
    x_hat, inverse_std = normalized(x, eps)
    return affine(x_hat, scale, offset), (x_hat, inverse_std, scale)


def _layer_norm_bwd(eps, residuals, dy):
    del eps
    x_hat, inverse_std, scale = residuals
    g = dy * per_feature(scale, dy)
    mean_g = jnp.mean(g, axis=-1, keepdims=True)
    mean_g_x_hat = jnp.mean(g * x_hat, axis=-1, keepdims=True)
    dx = (g - mean_g - x_hat * mean_g_x_hat) * inverse_std
    batch_axes = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * x_hat, axis=batch_axes), jnp.sum(dy, axis=batch_axes)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x, scale, offset, *, eps: float = 1e-5):
    """Layer normalisation over the last axis.

    Backward: dx = (g - mean(g) - x̂ mean(g x̂)) / σ with g = δ scale; dscale = Σ δ x̂,
    doffset = Σ δ. Saves x̂, 1/σ and scale.

    Args:
      x: `(..., C)` floating point.
      scale, offset: `(C,)`.
      eps: added to the variance, a static Python number > 0.

    Returns:
      Array of x's shape and dtype.
    """
    check_layer_norm(x, scale, offset, eps)
    return _layer_norm(x, scale, offset, float(eps))
