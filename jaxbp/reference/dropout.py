"""Plain twin of `jaxbp.layers.dropout`, differentiated by JAX itself, and the pieces both
share: the argument check, the mask (drawn identically by both, so they agree for one key)
and the masked, rescaled copy."""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from jaxbp._spatial import fail
from jaxbp.reference.activations import check_floating


def check_dropout(x, rate, key) -> None:
    """Raises unless x is floating, rate a static number in [0, 1) and key one PRNG key."""
    check_floating("dropout", "x", x)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise fail("dropout", f"rate must be a number in [0, 1), got {rate!r}")
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    raw = dtype == jnp.uint32 and len(shape) == 1
    if not (typed or raw):
        described = f"dtype {dtype}, shape {shape}" if dtype is not None else type(key).__name__
        raise fail("dropout", f"key must be one PRNG key (jax.random.key or "
                              f"jax.random.PRNGKey), got {described}")


def keep_mask(key, rate: float, shape):
    """True where an entry is kept, independently with probability 1 - rate.

    The uniform draw is float32 whatever x's dtype and whether x64 is on, so one key gives
    one mask in every precision (`jax.random.bernoulli` draws in the default float dtype).
    """
    return jax.random.uniform(key, shape, jnp.float32) >= rate


def dropped(x, keep, rate: float):
    """x / (1 - rate) where `keep`, 0 elsewhere: a diagonal map, its own transpose."""
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def dropout(x, rate: float, key):
    """Inverted dropout: each entry kept with probability 1 - rate and scaled by
    1 / (1 - rate), so the expected output is x; rate 0 returns x."""
    check_dropout(x, rate, key)
    if rate == 0:
        return x
    return dropped(x, keep_mask(key, rate, x.shape), rate)
