"""The layer tests' shorthand for `jaxbp.testing.check_rule`: one cotangent, the forward and
the VJP only, on given inputs; the full check (finite differences, second order, jit, vmap)
runs in tests/test_testing.py for every built-in rule and where a test asks for it."""
from __future__ import annotations

from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxbp.testing import CheckOptions, check_rule, relative_error, tolerance

__all__ = ["assert_matches_reference", "random_inputs", "relative_error", "tolerance"]


def random_inputs(seed: int, shapes: Sequence[tuple], dtype) -> list:
    """Standard-normal arrays of the given shapes; distinct values, so no ties.

    Drawn with NumPy: `jax.random` would compile a sampler for every new shape and dtype,
    which costs more than the layer under test.
    """
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def assert_matches_reference(layer_fn: Callable, reference_fn: Callable, args: Sequence,
                             argnums: Sequence[int]) -> None:
    """`check_rule` of `layer_fn` (a rule, or a rule under jit/vmap) against `reference_fn`
    on `args`: forward and the VJP of `argnums` for one random cotangent, in the args' dtype.

    Raises:
      jaxbp.testing.RuleMismatch: with "forward differs" or "gradient of argument i".
    """
    dtype = jnp.result_type(*[a for a in args if hasattr(a, "dtype")])
    options = CheckOptions(dtype=jnp.dtype(dtype).name, argnums=tuple(argnums), cotangents=1,
                           directions=0, second_order=False, transforms=False)
    check_rule(layer_fn, reference_fn, *args, options=options)
