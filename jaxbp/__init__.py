"""jaxbp: CNN layers with hand-derived backward passes, proven against jax.grad.

`jaxbp.layers` and `jaxbp.losses` carry `jax.custom_vjp` rules written from the
derivations; `jaxbp.reference` holds their plain twins, differentiated by JAX,
which serve as the oracle.
"""
from jaxbp import layers, losses, reference

__version__ = "0.1.0"
__all__ = ["layers", "losses", "reference"]
