"""jaxbp: CNN layers with hand-derived backward passes, proven against jax.grad.

`jaxbp.layers` and `jaxbp.losses` carry `jax.custom_vjp` rules written from the
derivations (`jaxbp/layers/DERIVATIONS.md`); `jaxbp.reference` holds their plain twins,
differentiated by JAX, which serve as the oracle. Every layer and loss is registered once
(`jaxbp.registry`; the built-in ones in `jaxbp.builtins`): `register_layer` adds your own,
and `jaxbp.nn`, the experiment configs, `jaxbp check` and the benchmark then know it;
`jaxbp.testing.check_rule` proves a rule against its twin.

Importing jaxbp applies its measured CPU defaults (`jaxbp.runtime`: an XLA flag and malloc
settings) unless JAXBP_TUNING=0; import it before the first JAX computation.
"""
from jaxbp import runtime

runtime.configure_on_import()  # before any JAX computation; importing jax itself is fine

from jaxbp import layers, losses, reference, testing  # noqa: E402
from jaxbp import builtins  # noqa: E402, F401  (registers the built-in primitives)
from jaxbp.registry import register_layer, register_loss  # noqa: E402

__version__ = "0.1.0"
__all__ = ["layers", "losses", "reference", "testing", "register_layer", "register_loss"]
