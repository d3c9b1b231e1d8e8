"""Networks from (init, apply) layer pairs, run through the hand rules or their plain twins.

The layer protocol follows `jax.example_libraries.stax`: a layer is a pair of functions,
`init` that infers the output shape from the input shape and draws the parameters, and
`apply` that runs the layer. Two changes:

  * `apply(params, x, ops=HAND)` takes the primitives to run through: `HAND` (the
    hand-derived custom_vjp rules) or `REFERENCE` (the plain twins, differentiated by JAX).
    One set of parameters thus runs through either, which is how `jaxbp check` compares
    them on a whole network.
  * `init(rng, input_shape, dtype=float32)` takes the parameter dtype and finds the output
    shape by evaluating the layer abstractly (`jax.eval_shape`), so the layer's own argument
    checks reject shapes that cannot fit before any data is seen. Parameters are dicts
    (`{"w": ..., "b": ...}`, `{}` when none); `input_shape` excludes the batch axis.

Every layer comes from the registry (`jaxbp.registry`): `layer("conv", 6, 5, padding=1)`
builds any registered layer, its required hyperparameters positional in order, the rest by
keyword, and `Conv`, `Dense`, ... are that for the built-in ones.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxbp import registry
from jaxbp._spatial import fail
from jaxbp.initializers import (constant, glorot_normal, glorot_uniform, he_normal, he_uniform,
                                initializer, lecun_normal, lecun_uniform, normal, ones,
                                truncated_normal, uniform, variance_scaling, zeros)
from jaxbp.registry import HAND, REFERENCE, Ops
from jaxbp.schema import REQUIRED

Shape = Tuple[int, ...]

__all__ = [
    "Ops", "HAND", "REFERENCE", "Layer", "layer", "serial", "Conv", "MaxPool", "AvgPool",
    "ChannelMax", "Dense", "Flatten", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Softmax",
    "initializer", "constant", "glorot_normal", "glorot_uniform", "he_normal", "he_uniform",
    "lecun_normal", "lecun_uniform", "normal", "ones", "truncated_normal", "uniform",
    "variance_scaling", "zeros",
]


class Layer(NamedTuple):
    """`init(rng, input_shape, dtype=float32) -> (output_shape, params)`;
    `apply(params, x, ops=HAND) -> y`, x of shape `(batch, *input_shape)`."""
    init: Callable
    apply: Callable


def _output_shape(apply: Callable, params, input_shape: Shape, dtype) -> Shape:
    """One example's output shape by abstract evaluation: the layer's checks run, no FLOPs."""
    example = jax.ShapeDtypeStruct((1, *input_shape), dtype)
    return tuple(jax.eval_shape(lambda p, x: apply(p, x, HAND), params, example).shape[1:])


def layer(name: str, *args, **hyperparameters) -> Layer:
    """The registered layer `name` as an (init, apply) pair.

    Args:
      name: a registered layer (`jaxbp.registry.layer_names()`).
      *args: its required hyperparameters in order (e.g. conv's features and kernel).
      **hyperparameters: any of its hyperparameters by name; left out, the default.

    Raises:
      jaxbp.schema.ConfigError: an unknown, missing or bad hyperparameter, as one line.
    """
    primitive = registry.get(name)
    required = [k for k, key in primitive.hyperparameters.items() if key.default is REQUIRED]
    if len(args) > len(required):
        raise fail(name, f"takes {len(required)} positional hyperparameters "
                         f"({', '.join(required) or 'none'}), got {len(args)}")
    given = dict(zip(required, args))
    twice = sorted(set(given) & set(hyperparameters))
    if twice:
        raise fail(name, f"{', '.join(twice)} given both by position and by name")
    hyper = primitive.check({**given, **hyperparameters})

    def init(rng, input_shape: Sequence[int], dtype=jnp.float32):
        input_shape = tuple(input_shape)
        params = primitive.init(rng, input_shape, dtype, hyper)
        return _output_shape(apply, params, input_shape, dtype), params

    def apply(params, x, ops: Ops = HAND):
        return primitive.call(ops.of(primitive), x, params, hyper)

    return Layer(init, apply)


def _constructor(name: str) -> Callable[..., Layer]:
    def make(*args, **hyperparameters) -> Layer:
        return layer(name, *args, **hyperparameters)
    make.__name__ = make.__qualname__ = "".join(part.title() for part in name.split("_"))
    make.__doc__ = f"`layer({name!r}, ...)`: the registered `{name}` layer (see `layer`)."
    return make


Conv = _constructor("conv")
Dense = _constructor("dense")
MaxPool = _constructor("max_pool")
AvgPool = _constructor("avg_pool")
ChannelMax = _constructor("channel_max")
Flatten = _constructor("flatten")
Sigmoid = _constructor("sigmoid")
Tanh = _constructor("tanh")
Relu = _constructor("relu")
LeakyRelu = _constructor("leaky_relu")
Softmax = _constructor("softmax")


def serial(*layers: Layer) -> Layer:
    """Layers in sequence; the parameters are a list with one entry per layer."""
    def init(rng, input_shape: Sequence[int], dtype=jnp.float32):
        shape, params = tuple(input_shape), []
        for each, key in zip(layers, jax.random.split(rng, len(layers))):
            shape, p = each.init(key, shape, dtype)
            params.append(p)
        return shape, params

    def apply(params, x, ops: Ops = HAND):
        for each, p in zip(layers, params):
            x = each.apply(p, x, ops)
        return x

    return Layer(init, apply)
