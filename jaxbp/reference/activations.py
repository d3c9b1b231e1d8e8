"""Plain activations, differentiated by JAX itself.

`jaxbp.layers.activations` reuses these forwards inside its `custom_vjp` rules,
so the hand layers and their oracle compute identical values and differ only in
how the gradient is obtained.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxbp._spatial import fail


def check_floating(layer: str, name: str, x, min_ndim: int = 0) -> None:
    """Raises unless `x` is a floating-point array with at least `min_ndim` axes.

    Integer inputs are refused rather than promoted: their cotangent would have to
    be a `float0` zero, so a gradient through them silently means nothing.
    """
    dtype, ndim = getattr(x, "dtype", None), getattr(x, "ndim", None)
    if dtype is None or ndim is None:
        raise fail(layer, f"{name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise fail(layer, f"{name} must have a floating-point dtype, got {dtype} "
                          f"(shape {tuple(x.shape)})")
    if ndim < min_ndim:
        raise fail(layer, f"{name} must have at least {min_ndim} axes, got shape {tuple(x.shape)}")


def check_slope(layer: str, negative_slope) -> None:
    """The leaky slope is a static Python number; a traced or array slope is refused."""
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise fail(layer, f"negative_slope must be a Python number (static), "
                          f"got {type(negative_slope).__name__}")


def sigmoid(x):
    """Logistic function; `jax.nn.sigmoid` does not overflow for large |x|."""
    check_floating("sigmoid", "x", x)
    return jax.nn.sigmoid(x)


def tanh(x):
    """Hyperbolic tangent."""
    check_floating("tanh", "x", x)
    return jnp.tanh(x)


def relu(x):
    """max(x, 0) written as a select, so JAX's gradient at x == 0 is 0.

    `jnp.maximum(x, 0)` would split the tie and give 1/2 at 0; the select gives the
    same 0 that `jax.nn.relu` uses.
    """
    check_floating("relu", "x", x)
    return jnp.where(x > 0, x, 0.0)


def leaky_relu(x, negative_slope: float = 0.01):
    """x where x > 0, else negative_slope * x (so the slope branch owns x == 0)."""
    check_floating("leaky_relu", "x", x)
    check_slope("leaky_relu", negative_slope)
    return jnp.where(x > 0, x, negative_slope * x)


def softmax(x):
    """Softmax over the last axis; the row maximum is subtracted so exp cannot overflow."""
    check_floating("softmax", "x", x, min_ndim=1)
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)
