"""Losses with hand-derived backward rules; both average over the batch axis.

Their plain twins, with the same signatures, are `jaxbp.reference.quadratic` and
`jaxbp.reference.softmax_cross_entropy`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbp.reference import losses as reference
from jaxbp.reference.losses import check_cross_entropy, check_quadratic


@jax.custom_vjp
def _quadratic(pred, target):
    return reference.quadratic(pred, target)


def _quadratic_fwd(pred, target):
    return reference.quadratic(pred, target), pred - target


def _quadratic_bwd(diff, g):
    d_pred = g * diff / diff.shape[0]
    return d_pred, -d_pred


_quadratic.defvjp(_quadratic_fwd, _quadratic_bwd)


def quadratic(pred, target):
    """Quadratic cost: mean over the batch of 1/2 sum (a - y)^2.

    The cost of seed 001 (the blog post on a conv net with a softmax output) and seed
    002 (the Q&A tracing a small CNN's deltas); DERIVATIONS.md §6.
    Backward: d pred = (a - y) / batch and d target = -(a - y) / batch, saving only
    a - y. Composed with an output sigmoid this gives seed 002's
    delta^L = (a^L - y) * sigma'(z^L) (per example).

    Args:
      pred: `(batch, ...)` predictions a.
      target: targets y, the shape and dtype of pred (one-hot for classification).

    Returns:
      Scalar loss.
    """
    check_quadratic(pred, target)
    return _quadratic(pred, target)


@jax.custom_vjp
def _softmax_cross_entropy(logits, labels):
    return reference.softmax_cross_entropy(logits, labels)


def _cross_entropy_fwd(logits, labels):
    log_probs = reference.log_softmax(logits)
    return reference.mean_negative_log_likelihood(log_probs, labels), (jnp.exp(log_probs), labels)


def _cross_entropy_bwd(residuals, g):
    probs, labels = residuals
    onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
    # Integer labels have no tangent space; None is turned into the float0 zero JAX expects.
    return g * (probs - onehot) / probs.shape[0], None


_softmax_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def softmax_cross_entropy(logits, labels):
    """Mean over the batch of -log softmax(logits)[label], computed with log-sum-exp.

    Backward is the fused softmax-plus-log delta d logits = (softmax(logits) -
    onehot(labels)) / batch, saving the probabilities and labels (DERIVATIONS.md §6).
    Unlike the quadratic cost over a softmax (seed 001, the blog post on a conv net
    with a softmax output) it needs no softmax Jacobian. Labels get no gradient.

    Args:
      logits: `(batch, classes)` scores.
      labels: `(batch,)` integer class indices in [0, classes); an index out of
        range makes the loss NaN.

    Returns:
      Scalar loss.
    """
    check_cross_entropy(logits, labels)
    return _softmax_cross_entropy(logits, labels)
