"""Plain twins of `jaxbp.layers.norm` (layer norm, batch norm), differentiated by JAX itself,
and batch norm's running statistics: plain functions the network uses as they are at run time
(they are never differentiated, so they have no hand rule).

Both norms compute x̂ = (x - μ) / sqrt(var + eps) and x̂ * scale + offset with `(C,)` scale and
offset on the last axis; they differ only in the axes μ and the biased variance run over: the
last axis (layer norm) or every axis but the last (batch norm, per channel).
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp
from jax import lax

from jaxbp._spatial import fail
from jaxbp.reference.activations import check_floating


def check_per_feature(layer: str, x, **params) -> None:
    """Raises unless each of `params` is a floating `(C,)` array, C being x's last axis."""
    for name, p in params.items():
        check_floating(layer, name, p)
        if tuple(p.shape) != (x.shape[-1],):
            raise fail(layer, f"expected {name} of shape ({x.shape[-1]},) for x of shape "
                              f"{tuple(x.shape)}, got {tuple(p.shape)}")


def check_norm(layer: str, x, scale, offset, eps, min_ndim: int) -> None:
    """Raises unless x is floating with `min_ndim` axes or more, scale and offset are `(C,)`
    and eps is a static number > 0."""
    check_floating(layer, "x", x, min_ndim=min_ndim)
    check_per_feature(layer, x, scale=scale, offset=offset)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or eps <= 0:
        raise fail(layer, f"eps must be a number > 0 (static), got {eps!r}")


def feature_axis(x) -> tuple:
    """The axes layer norm's statistics run over: the last."""
    return (x.ndim - 1,)


def batch_axes(x) -> tuple:
    """Every axis but the last: batch norm's statistics and every parameter gradient's sum."""
    return tuple(range(x.ndim - 1))


def normalized(x, eps: float, axes: tuple):
    """x̂ = (x - mean) / sqrt(var + eps), mean and biased variance over `axes`, and
    1 / sqrt(var + eps) (with `axes` kept, of size 1)."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    inverse_std = 1.0 / jnp.sqrt(jnp.mean(centred * centred, axis=axes, keepdims=True) + eps)
    return centred * inverse_std, inverse_std


def per_feature(p, x):
    """A `(C,)` parameter broadcast over x's `(..., C)`."""
    return lax.broadcast_in_dim(p, x.shape, (x.ndim - 1,))


def affine(x_hat, scale, offset):
    """x̂ * scale + offset, feature by feature."""
    return x_hat * per_feature(scale, x_hat) + per_feature(offset, x_hat)


def layer_norm(x, scale, offset, *, eps: float = 1e-5):
    """y = x̂ * scale + offset, x̂ normalised over the last axis (biased variance)."""
    check_norm("layer_norm", x, scale, offset, eps, min_ndim=1)
    return affine(normalized(x, eps, feature_axis(x))[0], scale, offset)


def batch_norm(x, scale, offset, *, eps: float = 1e-5):
    """y = x̂ * scale + offset, x̂ normalised per channel over the batch and every position with
    the batch's own statistics (biased variance): PyTorch's training mode."""
    check_norm("batch_norm", x, scale, offset, eps, min_ndim=2)
    return affine(normalized(x, eps, batch_axes(x))[0], scale, offset)


def batch_norm_update(x, mean, var, *, momentum: float = 0.9):
    """Running statistics after one training batch: momentum * old + (1 - momentum) * batch's.

    Conventions: the momentum is Flax's (the weight of the old value; PyTorch's momentum m is
    our 1 - m), the variance folded in is the batch's unbiased one, n / (n - 1) times the
    biased one that normalises the batch, as PyTorch updates its running_var (n = values per
    channel, batch times positions). With n = 1 the unbiased estimate is 0/0; the biased one,
    0, stands in (as Flax always does; PyTorch refuses to train there).

    Args:
      x: `(batch, *spatial, C)` or `(batch, C)`, floating point.
      mean, var: `(C,)`, the running statistics so far.
      momentum: a static number in [0, 1].

    Returns:
      `(new_mean, new_var)`, each `(C,)`.
    """
    check_floating("batch_norm_update", "x", x, min_ndim=2)
    check_per_feature("batch_norm_update", x, mean=mean, var=var)
    if (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)
            or not 0 <= momentum <= 1):
        raise fail("batch_norm_update", f"momentum must be a number in [0, 1], got {momentum!r}")
    n = x.size // x.shape[-1]
    axes = batch_axes(x)
    unbiased_var = jnp.var(x, axis=axes) * (n / max(n - 1, 1))
    return (momentum * mean + (1 - momentum) * jnp.mean(x, axis=axes),
            momentum * var + (1 - momentum) * unbiased_var)


def batch_norm_inference(x, scale, offset, mean, var, *, eps: float = 1e-5):
    """Evaluation mode: (x - mean) / sqrt(var + eps) * scale + offset with the running
    statistics, so each example's output no longer depends on the rest of its batch.

    Args:
      x: `(batch, *spatial, C)` or `(batch, C)`, floating point.
      scale, offset, mean, var: `(C,)`.
      eps: a static number > 0.

    Returns:
      Array of x's shape and dtype.
    """
    check_norm("batch_norm_inference", x, scale, offset, eps, min_ndim=2)
    check_per_feature("batch_norm_inference", x, mean=mean, var=var)
    inverse_std = 1.0 / jnp.sqrt(var + eps)
    return affine((x - per_feature(mean, x)) * per_feature(inverse_std, x), scale, offset)
