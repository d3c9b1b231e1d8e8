"""Activations with hand-derived backward rules.

Each forward is the one in `jaxbp.reference.activations`; only the backward is
ours. Sigmoid, tanh and softmax save their output (the derivative is a function
of it); relu and leaky relu save a boolean mask, a quarter to an eighth of the
bytes of a copy of the input.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxbp.reference import activations as reference
from jaxbp.reference.activations import check_floating, check_slope


def _saving_output(forward: Callable, derivative: Callable):
    """custom_vjp of `forward` whose bwd is `derivative(y, g)` with y = forward(x) saved."""
    rule = jax.custom_vjp(forward)

    def fwd(x):
        y = forward(x)
        return y, y

    rule.defvjp(fwd, lambda y, g: (derivative(y, g),))
    return rule


def _saving_mask(forward: Callable, derivative: Callable):
    """custom_vjp of `forward` whose bwd is `derivative(x > 0, g)`."""
    rule = jax.custom_vjp(forward)
    rule.defvjp(lambda x: (forward(x), x > 0), lambda mask, g: (derivative(mask, g),))
    return rule


def _softmax_derivative(s, g):
    # Full Jacobian diag(s) - s s^T applied to g (DERIVATIONS.md §5); its diagonal alone
    # (seed 001, the blog post on a conv net with a softmax output) is wrong.
    return s * (g - jnp.sum(g * s, axis=-1, keepdims=True))


_sigmoid = _saving_output(reference.sigmoid, lambda s, g: g * s * (1 - s))
_tanh = _saving_output(reference.tanh, lambda t, g: g * (1 - t * t))
_softmax = _saving_output(reference.softmax, _softmax_derivative)
_relu = _saving_mask(reference.relu, lambda mask, g: jnp.where(mask, g, 0.0))


@functools.lru_cache(maxsize=None)
def _leaky_relu(negative_slope: float):
    """One rule per static slope, so the slope is a Python constant, never traced."""
    return _saving_mask(functools.partial(reference.leaky_relu, negative_slope=negative_slope),
                        lambda mask, g: jnp.where(mask, g, negative_slope * g))


def sigmoid(x):
    """Logistic sigmoid s = 1 / (1 + exp(-x)) of a float array, elementwise (same shape and dtype).

    Backward: dx = delta * s * (1 - s), with s saved from the forward (DERIVATIONS.md
    §5; the sigma' factor of eq. 1-2 in seed 002, the Q&A tracing a small CNN's
    deltas). The forward is `jax.nn.sigmoid`, which does not overflow for large |x|.
    """
    check_floating("sigmoid", "x", x)
    return _sigmoid(x)


def tanh(x):
    """Hyperbolic tangent t = tanh(x) of a float array, elementwise (same shape and dtype).

    Backward: dx = delta * (1 - t^2), with t saved (DERIVATIONS.md §5; the t' factors
    of seed 001, the blog post on a conv net with a winner kernel and tanh units).
    """
    check_floating("tanh", "x", x)
    return _tanh(x)


def relu(x):
    """Rectified linear unit max(x, 0) of a float array, elementwise (same shape and dtype).

    Backward (DERIVATIONS.md §5): dx = delta * [x > 0], saving only the boolean
    mask. At x == 0 the derivative is taken to be 0, the value `jax.nn.relu` uses.
    """
    check_floating("relu", "x", x)
    return _relu(x)


def leaky_relu(x, negative_slope: float = 0.01):
    """x where x > 0, else negative_slope * x, elementwise.

    Backward (DERIVATIONS.md §5): dx = delta where x > 0, else negative_slope * delta,
    saving the boolean mask; the slope is static. At x == 0 the derivative is the slope, so
    `negative_slope=0` gives exactly relu's rule (`jax.nn.leaky_relu` uses 1 there).

    Args:
      x: floating array of any shape.
      negative_slope: Python number multiplying the non-positive part.

    Returns:
      Array of the shape and dtype of `x`.
    """
    check_floating("leaky_relu", "x", x)
    check_slope("leaky_relu", negative_slope)
    return _leaky_relu(float(negative_slope))(x)


def softmax(x):
    """Softmax s = exp(x) / sum(exp(x)) over the last axis, computed with the row max subtracted.

    Backward uses the full Jacobian, not its diagonal: dx = s * (delta - <delta, s>),
    the inner product taken over the last axis, with s saved (DERIVATIONS.md §5, with
    a worked numeric contrast). Seed 001, the blog post on a conv net with a softmax
    output, writes this factor as D_sigma' = diag(s(1 - s)), which drops the
    off-diagonal terms -s_i s_j and is wrong.

    Args:
      x: floating array of shape `(..., classes)`, at least 1-D.

    Returns:
      Array of the shape and dtype of `x`; each row along the last axis sums to 1.
    """
    check_floating("softmax", "x", x, min_ndim=1)
    return _softmax(x)
