"""A rule of your own, end to end (README, "Add your own rule"): softplus, derived by hand.

    y = softplus(x) = log(1 + e^x),   dy/dx = e^x / (1 + e^x) = sigmoid(x),
    so the backward is  dx = delta * sigmoid(x),  saving x.

`configs/my_softplus.yaml` names this module in `imports:` and uses the layer as
`type: my_softplus`; `jaxbp check` then holds the rule to `jax.grad` of `plain_softplus`.
"""
import jax
import jax.numpy as jnp

import jaxbp


def plain_softplus(x):
    """The plain twin: JAX differentiates it itself."""
    return jnp.logaddexp(x, 0.0)


@jax.custom_vjp
def softplus(x):
    return plain_softplus(x)


def _softplus_fwd(x):
    return plain_softplus(x), x


def _softplus_bwd(x, delta):
    return (delta * jax.nn.sigmoid(x),)


softplus.defvjp(_softplus_fwd, _softplus_bwd)

jaxbp.register_layer("my_softplus", hand=softplus, reference=plain_softplus)
