"""Test-wide JAX settings: float64 available, and no silent promotion.

Strict dtype promotion and raising rank promotion make a test fail where a
layer would mix float32 with float64 or broadcast shapes by accident.
"""
import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
