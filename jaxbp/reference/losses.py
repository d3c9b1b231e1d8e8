"""Plain losses, differentiated by JAX itself. Both average over the batch axis."""
from __future__ import annotations

import jax.numpy as jnp

from jaxbp._spatial import fail
from jaxbp.reference.activations import check_floating


def check_quadratic(pred, target) -> None:
    """Raises unless pred and target are float arrays of one shape and dtype with a batch axis."""
    check_floating("quadratic", "pred", pred, min_ndim=1)
    check_floating("quadratic", "target", target, min_ndim=1)
    if pred.shape != target.shape:
        raise fail("quadratic", f"pred and target must have the same shape, got pred "
                                f"{tuple(pred.shape)} and target {tuple(target.shape)}")
    if pred.dtype != target.dtype:
        raise fail("quadratic", f"pred and target must share one dtype, got {pred.dtype} "
                                f"and {target.dtype}")
    if pred.shape[0] == 0:
        raise fail("quadratic", f"the batch is empty (shape {tuple(pred.shape)})")


def check_cross_entropy(logits, labels) -> None:
    """Raises unless logits are float `(batch, classes)` and labels integer `(batch,)`."""
    check_floating("softmax_cross_entropy", "logits", logits)
    if logits.ndim != 2 or 0 in logits.shape:
        raise fail("softmax_cross_entropy", f"expected non-empty logits of shape "
                                            f"(batch, classes), got {tuple(logits.shape)}")
    dtype = getattr(labels, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        got = type(labels).__name__ if dtype is None else dtype
        raise fail("softmax_cross_entropy", f"labels must be an integer array of class "
                                            f"indices, got {got}")
    if tuple(labels.shape) != (logits.shape[0],):
        raise fail("softmax_cross_entropy", f"expected labels of shape ({logits.shape[0]},) "
                                            f"for logits {tuple(logits.shape)}, "
                                            f"got {tuple(labels.shape)}")


def quadratic(pred, target):
    """mean over the batch of 1/2 sum (a - y)^2; pred and target `(batch, ...)`, same shape."""
    check_quadratic(pred, target)
    diff = pred - target
    return 0.5 * jnp.sum(diff * diff) / pred.shape[0]


def log_softmax(logits):
    """log softmax over the last axis via log-sum-exp shifted by the row maximum."""
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def mean_negative_log_likelihood(log_probs, labels):
    """-mean_n log_probs[n, labels[n]]; an out-of-range label yields NaN, not a silent value."""
    picked = jnp.take_along_axis(log_probs, labels[:, None], axis=1, mode="fill")
    return -jnp.mean(picked)


def softmax_cross_entropy(logits, labels):
    """mean over the batch of -log softmax(logits)[label].

    logits `(batch, classes)` floats, labels `(batch,)` integers.
    """
    check_cross_entropy(logits, labels)
    return mean_negative_log_likelihood(log_softmax(logits), labels)
