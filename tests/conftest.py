"""Test-wide JAX settings: jaxbp's runtime defaults, float64 available, no silent promotion.

Importing jaxbp applies its runtime defaults before JAX starts; doing it here, before any
test computes, makes in-process runs numerically identical to `python -m jaxbp` runs (the
resume-after-kill test compares the two bit for bit). Strict dtype promotion and
raising rank promotion make a test fail where a layer would mix float32 with float64 or
broadcast shapes by accident.
"""
import jaxbp  # noqa: F401  (its runtime defaults must precede the backend's start)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
