"""Shared oracle comparisons: a hand-derived rule against `jax.grad` of its plain twin."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCE = {jnp.dtype("float64"): 1e-10, jnp.dtype("float32"): 1e-4}


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (absolute error where expected is all zero)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    return float(np.max(np.abs(actual - expected), initial=0.0)) / scale


def random_inputs(seed: int, shapes: Sequence[tuple], dtype) -> list:
    """Standard-normal arrays of the given shapes; distinct values, so no ties.

    Drawn with NumPy: `jax.random` would compile a sampler for every new shape and dtype,
    which costs more than the layer under test.
    """
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def vjp_grads(fn: Callable, args: Sequence, argnums: Sequence[int], cotangent_seed: int = 99):
    """Gradients of <fn(*args), c> w.r.t. `args[argnums]` for a fixed random cotangent c, under jit."""
    out = jax.eval_shape(fn, *args)
    (cotangent,) = random_inputs(cotangent_seed, [out.shape], out.dtype)

    @jax.jit
    def grads(*a):
        return jax.grad(lambda *b: jnp.sum(fn(*b) * cotangent), argnums=tuple(argnums))(*a)

    return grads(*args)


def assert_matches_reference(layer_fn: Callable, reference_fn: Callable, args: Sequence,
                             argnums: Sequence[int]) -> None:
    """Asserts forward values and every requested gradient agree within the dtype's tolerance."""
    dtype = jnp.result_type(*[a for a in args if hasattr(a, "dtype")])
    tol = TOLERANCE[jnp.dtype(dtype)]
    out, ref_out = layer_fn(*args), reference_fn(*args)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert relative_error(out, ref_out) <= tol, "forward differs from the reference"
    got = vjp_grads(layer_fn, args, argnums)
    want = vjp_grads(reference_fn, args, argnums)
    for i, g, w in zip(argnums, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"argument {i}: shape/dtype"
        err = relative_error(g, w)
        assert err <= tol, f"gradient of argument {i}: relative error {err:.3g} > {tol:g}"
