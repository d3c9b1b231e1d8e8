"""Networks from (init, apply) layer pairs, run through the hand rules or their plain twins.

The layer protocol follows `jax.example_libraries.stax`: a layer is a pair of functions,
`init` that infers the output shape from the input shape and draws the parameters, and
`apply` that runs the layer (`init, apply = layer` unpacks it as in stax). The changes:

  * `apply(params, x, ops=HAND)` takes the primitives to run through: `HAND` (the
    hand-derived custom_vjp rules) or `REFERENCE` (the plain twins, differentiated by JAX).
    One set of parameters thus runs through either, which is how `jaxbp check` compares
    them on a whole network.
  * `init(rng, input_shape, dtype=float32)` takes the parameter dtype and finds the output
    shape by evaluating the layer abstractly (`jax.eval_shape`), so the layer's own argument
    checks reject shapes that cannot fit before any data is seen. Parameters are dicts
    (`{"w": ..., "b": ...}`, `{}` when none); `input_shape` excludes the batch axis.
  * Training and evaluation differ for some layers, as in Flax and PyTorch:
    `apply(..., train=True, rng=key)` draws dropout masks from `rng` and normalises batch
    norm with the batch's statistics; `train=False` (the default) runs their `inference`.
    Non-trainable state (batch norm's running statistics) comes from
    `layer.init_state(input_shape, dtype)`; pass it as `state=` and `apply` returns
    `(y, new_state)`, the statistics renewed in training and unchanged in evaluation.
    Stateless layers have the state `{}`.

Every layer comes from the registry (`jaxbp.registry`): `layer("conv", 6, 5, padding=1)`
builds any registered layer, its required hyperparameters positional in order, the rest by
keyword, and `Conv`, `Dense`, ... are that for the built-in ones. `serial` chains layers and
`residual` adds a shortcut around them.

`serial`'s apply also takes `probes=`: one zero vector per layer, each layer's output passed
through `probe`, so that differentiating with respect to the probes gives every example's
squared delta norm at every layer, as the train step logs them (`jaxbp.app.norms`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxbp import layers as hand_layers
from jaxbp import reference, registry
from jaxbp._spatial import fail
from jaxbp.initializers import (constant, glorot_normal, glorot_uniform, he_normal, he_uniform,
                                initializer, lecun_normal, lecun_uniform, normal, ones,
                                truncated_normal, uniform, variance_scaling, zeros)
from jaxbp.registry import HAND, REFERENCE, Ops
from jaxbp.schema import REQUIRED

Shape = Tuple[int, ...]

__all__ = [
    "Ops", "HAND", "REFERENCE", "Layer", "layer", "abstract_init", "part_key", "serial",
    "residual", "probe", "Conv", "MaxPool", "AvgPool", "ChannelMax", "Dense", "Flatten",
    "Sigmoid", "Tanh", "Relu", "LeakyRelu",
    "Softmax", "initializer", "constant", "glorot_normal", "glorot_uniform", "he_normal",
    "he_uniform", "lecun_normal", "lecun_uniform", "normal", "ones", "truncated_normal",
    "uniform", "variance_scaling", "zeros",
]


def _no_state(input_shape: Sequence[int], dtype=jnp.float32) -> dict:
    del input_shape, dtype
    return {}


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer: `init, apply = layer`, plus the state it keeps.

    init(rng, input_shape, dtype=float32) -> (output_shape, params).
    apply(params, x, ops=HAND, *, train=False, rng=None, state=None) -> y, or
      `(y, new_state)` when `state` is given; x of shape `(batch, *input_shape)`.
    init_state(input_shape, dtype=float32) -> the non-trainable state (`{}` for none).
    parts: the named layers a composite is made of, each name its key in the parameter
      tree: `serial`'s by index ("0", "1", ...), `residual`'s "layers" and "shortcut";
      empty for a registered layer. Lets a caller run the parts one at a time
      (`jaxbp explain` records each part's input, output and deltas).
    """
    init: Callable
    apply: Callable
    init_state: Callable = _no_state
    parts: Tuple[Tuple[str, "Layer"], ...] = ()

    def __iter__(self):
        return iter((self.init, self.apply))


def _output_shape(apply: Callable, params, input_shape: Shape, dtype) -> Shape:
    """One example's output shape by abstract evaluation (training mode, which needs no
    state): the layer's checks run, no FLOPs."""
    example = jax.ShapeDtypeStruct((1, *input_shape), dtype)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return tuple(jax.eval_shape(lambda p, x, k: apply(p, x, HAND, train=True, rng=k),
                                params, example, key).shape[1:])


def abstract_init(layer: Layer, input_shape: Sequence[int], dtype=jnp.float32):
    """`(output_shape, params)` of `layer.init` evaluated abstractly: the params as
    `jax.ShapeDtypeStruct`s, nothing drawn; the layer's own checks run."""
    out = {}

    def init(rng):
        out["shape"], params = layer.init(rng, tuple(input_shape), dtype)
        return params

    params = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
    return out["shape"], params


def part_key(rng, index: int):
    """The PRNG key of part `index` of a composite (its position in `Layer.parts`): folded
    in, so a layer's masks do not depend on how many random layers come before it; None
    for None."""
    return None if rng is None else jax.random.fold_in(rng, index)


def _result(y, state, given):
    return y if given is None else (y, state)


def layer(name: str, *args, **hyperparameters) -> Layer:
    """The registered layer `name` as a `Layer`.

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

    def init_state(input_shape: Sequence[int], dtype=jnp.float32):
        return primitive.init_state(tuple(input_shape), dtype, hyper)

    def apply(params, x, ops: Ops = HAND, *, train: bool = False, rng=None, state=None):
        if not train and primitive.inference is not None:
            if primitive.state and state is None:
                raise fail(name, "evaluation (train=False) uses the state kept in training; "
                                 "pass state= (from init_state), or train=True")
            return _result(primitive.infer(x, params, state or {}, hyper), state, state)
        if primitive.random and rng is None:
            raise fail(name, "training draws random numbers; pass rng= (a PRNG key)")
        y = primitive.call(ops.of(primitive), x, params, hyper, key=rng)
        if primitive.state and state is not None:
            state = primitive.updated(jax.lax.stop_gradient(x), state, hyper)
        return _result(y, state, state)

    return Layer(init, apply, init_state)


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


@jax.custom_vjp
def probe(y, s):
    """y itself; `s` zeros of shape `(batch,)` and y's dtype, which y does not depend on.

    Backward: δy passes through unchanged, and the cotangent reported for `s` is not its
    (zero) derivative but each example's squared delta norm: entry n is Σ δy[n]², summed
    over that example's entries. So differentiating with respect to `s` reads the deltas'
    size from the middle of the backward pass without returning the deltas. This is Flax's
    `perturb` (a zero added to an intermediate, whose gradient is the intermediate's delta)
    reduced to norms. First-order differentiation only: a derivative of the reported value
    means nothing.

    Raises:
      ValueError: `s` is not of shape `(batch,)`.
    """
    _check_probe(y, s)
    return y


def _check_probe(y, s) -> None:
    if jnp.shape(s) != jnp.shape(y)[:1]:
        raise fail("probe", f"s must have shape (batch,) = {jnp.shape(y)[:1]}, got "
                            f"{jnp.shape(s)}")


def _probe_fwd(y, s):
    _check_probe(y, s)
    return y, None


def _probe_bwd(_, delta):
    squares = jnp.sum(jnp.square(delta.reshape(delta.shape[0], -1)), axis=1)
    return delta, squares


probe.defvjp(_probe_fwd, _probe_bwd)


def serial(*layers: Layer) -> Layer:
    """Layers in sequence; the parameters (and the state) are a list with one entry per
    layer. No layers at all is the identity.

    Its apply also takes `probes=`: None, or one zero vector per layer (see `probe`), layer
    i's output then going through `probe(y, probes[i])`: the gradient with respect to
    `probes[i]` holds each example's squared norm of layer i's delta ∂L/∂y_i. The outputs
    and every other gradient are those without probes.
    """
    def init(rng, input_shape: Sequence[int], dtype=jnp.float32):
        shape, params = tuple(input_shape), []
        for each, key in zip(layers, jax.random.split(rng, max(len(layers), 1))):
            shape, p = each.init(key, shape, dtype)
            params.append(p)
        return shape, params

    def init_state(input_shape: Sequence[int], dtype=jnp.float32):
        shape, state = tuple(input_shape), []
        for each in layers:
            state.append(each.init_state(shape, dtype))
            shape = abstract_init(each, shape, dtype)[0]
        return state

    def apply(params, x, ops: Ops = HAND, *, train: bool = False, rng=None, state=None,
              probes=None):
        states = [None] * len(layers) if state is None else state
        new = []
        for i, (each, p, s) in enumerate(zip(layers, params, states)):
            out = each.apply(p, x, ops, train=train, rng=part_key(rng, i), state=s)
            x, s = out if state is not None else (out, s)
            if probes is not None:
                x = probe(x, probes[i])
            new.append(s)
        return _result(x, new, state)

    return Layer(init, apply, init_state, tuple((str(i), each) for i, each in enumerate(layers)))


def _fork_and_add(ops: Ops) -> Tuple[Callable, Callable]:
    """The fork and the sum of a residual block, hand rules or plain twins like the rest."""
    return (reference.fork, reference.add) if ops.use_reference else (hand_layers.fork,
                                                                       hand_layers.add)


def residual(main: Layer, shortcut: Optional[Layer] = None) -> Layer:
    """A residual block: y = main(x) + shortcut(x), the shortcut the identity by default.

    Parameters and state are `{"layers": main's, "shortcut": shortcut's}` (the config's
    keys). Backward: x feeds both paths, so its delta is the sum of both paths' deltas;
    that sum is `jaxbp.layers.fork`'s rule, and the shortcut hands δ down unchanged.

    Raises (from `init`):
      ValueError: the two paths give different shapes, which cannot be added.
    """
    shortcut = serial() if shortcut is None else shortcut
    paths = (("layers", main), ("shortcut", shortcut))

    def init(rng, input_shape: Sequence[int], dtype=jnp.float32):
        shapes, params = {}, {}
        for (name, path), key in zip(paths, jax.random.split(rng)):
            shapes[name], params[name] = path.init(key, tuple(input_shape), dtype)
        if shapes["layers"] != shapes["shortcut"]:
            raise fail("residual", f"its layers turn input shape {tuple(input_shape)} into "
                                   f"{shapes['layers']} but its shortcut into "
                                   f"{shapes['shortcut']}; the two must match to be added "
                                   f"(give the shortcut a conv with the same features and "
                                   f"stride)")
        return shapes["layers"], params

    def init_state(input_shape: Sequence[int], dtype=jnp.float32):
        return {name: path.init_state(input_shape, dtype) for name, path in paths}

    def apply(params, x, ops: Ops = HAND, *, train: bool = False, rng=None, state=None):
        fork, add = _fork_and_add(ops)
        branches = fork(x)  # backward: δx = δ(layers) + δ(shortcut)
        out, new = [], {}
        for i, ((name, path), branch) in enumerate(zip(paths, branches)):
            s = None if state is None else state[name]
            y = path.apply(params[name], branch, ops, train=train, rng=part_key(rng, i),
                           state=s)
            if state is not None:
                y, new[name] = y
            out.append(y)
        return _result(add(*out), new, state)

    return Layer(init, apply, init_state, paths)
