"""Fully connected layer and flatten with hand-derived backward rules."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Imported by name: the package attribute `jaxbp.reference.dense` is the function, not this module.
from jaxbp.reference.dense import check_dense, check_flatten
from jaxbp.reference.dense import dense as reference_dense
from jaxbp.reference.dense import flatten as reference_flatten

# Dimension numbers contracting the shared axis in place, so neither product
# needs an explicit transpose of x, w or delta.
_CONTRACT_BATCH = (((0,), (0,)), ((), ()))   # x^T delta: (batch, in), (batch, out) -> (in, out)
_CONTRACT_OUT = (((1,), (1,)), ((), ()))     # delta W^T: (batch, out), (in, out) -> (batch, in)


def _dense_fwd(x, w, *b):
    return reference_dense(x, w, *b), (x, w)


def _input_and_weight_grads(residuals, delta):
    x, w = residuals
    return lax.dot_general(delta, w, _CONTRACT_OUT), lax.dot_general(x, delta, _CONTRACT_BATCH)


def _all_grads(residuals, delta):
    return _input_and_weight_grads(residuals, delta) + (jnp.sum(delta, axis=0),)


@jax.custom_vjp
def _linear(x, w):
    return reference_dense(x, w)


@jax.custom_vjp
def _affine(x, w, b):
    return reference_dense(x, w, b)


_linear.defvjp(_dense_fwd, _input_and_weight_grads)
_affine.defvjp(_dense_fwd, _all_grads)


def dense(x, w, b=None):
    """Fully connected layer y = x W + b.

    Backward (DERIVATIONS.md §1; seed 002, the Q&A tracing a small CNN's deltas, eq.
    2-3; seed 000, the Q&A deriving a 1-D conv layer's delta): delta_x = delta W^T,
    dW = x^T delta, db = sum over the batch of delta. The activation's f' factor of
    those seeds' recursion comes from the activation's own rule when the two are
    composed. Saves x and w.

    Args:
      x: `(batch, in)` inputs.
      w: `(in, out)` weights, the dtype of x.
      b: `(out,)` bias, or None for no bias.

    Returns:
      `(batch, out)` outputs.
    """
    check_dense(x, w, b)
    return _linear(x, w) if b is None else _affine(x, w, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _flatten(x, in_shape):
    del in_shape
    return reference_flatten(x)


def _flatten_fwd(x, in_shape):
    del in_shape
    return reference_flatten(x), None


def _flatten_bwd(in_shape, _, delta):
    return (delta.reshape(in_shape),)


_flatten.defvjp(_flatten_fwd, _flatten_bwd)


def flatten(x):
    """Flattens every axis but the batch axis.

    Backward: the delta is reshaped back to the input's shape (DERIVATIONS.md §7;
    seed 002, the Q&A tracing a small CNN's deltas: the 432-long delta becomes
    3x12x12). Nothing traced is saved; the input shape is a static argument.

    Args:
      x: `(batch, ...)` array.

    Returns:
      `(batch, prod(...))` array.
    """
    check_flatten(x)
    return _flatten(x, tuple(x.shape))
