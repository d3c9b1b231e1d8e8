"""Plain twin of `jaxbp.layers.norm.layer_norm`, differentiated by JAX itself."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxbp._spatial import fail
from jaxbp.reference.activations import check_floating


def check_layer_norm(x, scale, offset, eps) -> None:
    """Raises unless x is floating `(..., C)` and scale, offset are `(C,)`, eps a number > 0."""
    check_floating("layer_norm", "x", x, min_ndim=1)
    for name, p in (("scale", scale), ("offset", offset)):
        check_floating("layer_norm", name, p)
        if tuple(p.shape) != (x.shape[-1],):
            raise fail("layer_norm", f"expected {name} of shape ({x.shape[-1]},) for x of shape "
                                     f"{tuple(x.shape)}, got {tuple(p.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise fail("layer_norm", f"eps must be a number > 0 (static), got {eps!r}")


def normalized(x, eps: float):
    """x̂ = (x - mean) / sqrt(var + eps) over the last axis, and 1 / sqrt(var + eps)."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    inverse_std = 1.0 / jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred * inverse_std, inverse_std


def per_feature(p, x):
    """A `(C,)` parameter broadcast over x's `(..., C)`."""
    return lax.broadcast_in_dim(p, x.shape, (x.ndim - 1,))


def affine(x_hat, scale, offset):
    """x̂ * scale + offset, feature by feature."""
    return x_hat * per_feature(scale, x_hat) + per_feature(offset, x_hat)


def layer_norm(x, scale, offset, *, eps: float = 1e-5):
    """y = x̂ * scale + offset, x̂ normalised over the last axis (biased variance)."""
    check_layer_norm(x, scale, offset, eps)
    return affine(normalized(x, eps)[0], scale, offset)
