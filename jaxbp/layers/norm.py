"""Layer and batch normalisation with one hand-derived backward pass (jaxbp/layers/DERIVATIONS.md
§8, §9).

Forward: x̂ = (x - μ) / σ with μ the mean and σ = sqrt(var + eps) (biased variance) over some
axes, y = x̂ ⊙ scale + offset with `(C,)` scale and offset on the last axis. Layer norm takes
the statistics over the last axis, batch norm over every other one (batch and positions, per
channel); nothing else differs, so both are `_normalize` with their axes.

Backward, with g = δ ⊙ scale: μ and σ depend on every value they average, so the input delta
has three terms, not one:
    dx = (g - mean(g) - x̂ ⊙ mean(g ⊙ x̂)) / σ      (means over the statistics' axes)
    dscale = Σ δ ⊙ x̂,  doffset = Σ δ             (sums over every axis but the last)
For batch norm the statistics' axes are the sums' axes, so the means are the parameter
gradients scaled: dx = scale / σ ⊙ (δ - doffset / m - x̂ ⊙ dscale / m), m values per channel.
An all-ones δ makes g constant along those axes, so the second term cancels the first and the
third vanishes (Σ x̂ = 0): dx = 0, and a rule that lost the third term looks right. That is
why `jaxbp.testing.check_rule` draws non-uniform cotangents.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbp.reference.norm import (affine, batch_axes, check_norm, feature_axis, normalized,
                                  per_feature)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, offset, eps: float, axes: tuple):
    return affine(normalized(x, eps, axes)[0], scale, offset)


def _normalize_fwd(x, scale, offset, eps, axes):
    x_hat, inverse_std = normalized(x, eps, axes)
    return affine(x_hat, scale, offset), (x_hat, inverse_std, scale)


def _normalize_bwd(eps, axes, residuals, dy):
    del eps
    x_hat, inverse_std, scale = residuals
    parameter_axes = batch_axes(dy)
    dscale, doffset = jnp.sum(dy * x_hat, axis=parameter_axes), jnp.sum(dy, axis=parameter_axes)
    if axes == parameter_axes:
        # Batch norm: scale is constant over the averaged values, so mean(g) = scale Σδ / m and
        # mean(g x̂) = scale Σδx̂ / m, the parameter gradients' own sums; XLA does not find
        # that itself (experiments/results/README.md, "Batch norm's backward from two sums").
        m = dy.size // dy.shape[-1]
        dx = ((dy - per_feature(doffset / m, dy) - x_hat * per_feature(dscale / m, dy))
              * inverse_std * per_feature(scale, dy))
    else:
        g = dy * per_feature(scale, dy)
        mean_g = jnp.mean(g, axis=axes, keepdims=True)
        mean_g_x_hat = jnp.mean(g * x_hat, axis=axes, keepdims=True)
        dx = (g - mean_g - x_hat * mean_g_x_hat) * inverse_std
    return dx, dscale, doffset


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def layer_norm(x, scale, offset, *, eps: float = 1e-5):
    """Layer normalisation over the last axis.

    Backward: dx = (g - mean(g) - x̂ mean(g x̂)) / σ with g = δ scale, means over the last
    axis; dscale = Σ δ x̂, doffset = Σ δ. Saves x̂, 1/σ (one per row) and scale.

    Args:
      x: `(..., C)` floating point.
      scale, offset: `(C,)`.
      eps: added to the variance, a static Python number > 0.

    Returns:
      Array of x's shape and dtype.
    """
    check_norm("layer_norm", x, scale, offset, eps, min_ndim=1)
    return _normalize(x, scale, offset, float(eps), feature_axis(x))


def batch_norm(x, scale, offset, *, eps: float = 1e-5):
    """Batch normalisation in training mode: per channel, over the batch and every position,
    with the batch's own statistics (biased variance), as PyTorch's training mode.

    Backward: dx = (g - mean(g) - x̂ mean(g x̂)) / σ with g = δ scale, the means over every
    axis but the last (m = batch × positions values per channel), computed as
    scale / σ (δ - doffset / m - x̂ dscale / m); dscale = Σ δ x̂, doffset = Σ δ. Saves x̂,
    1/σ (one per channel) and scale. The running statistics for evaluation are
    `jaxbp.reference.batch_norm_update` and `batch_norm_inference`.

    Args and result as `layer_norm`'s, but x is `(batch, *spatial, C)` or `(batch, C)`.
    """
    check_norm("batch_norm", x, scale, offset, eps, min_ndim=2)
    return _normalize(x, scale, offset, float(eps), batch_axes(x))
