"""Networks built from (init, apply) layer pairs, run through hand-derived or reference rules.

The layer protocol follows `jax.example_libraries.stax`: a layer is a pair of
functions, `init` that infers the output shape from the input shape and draws
the parameters, and `apply` that runs the layer. Two changes:

  * `apply(params, x, ops)` takes the namespace of primitives to run through:
    `HAND` (`jaxbp.layers` + `jaxbp.losses`, the hand-derived backward rules) or
    `REFERENCE` (`jaxbp.reference`, differentiated by JAX). One set of
    parameters thus runs through either, which is how the CLI checks one
    against the other on a whole network.
  * `init(rng, input_shape, dtype=float32)` takes the parameter dtype, and finds
    the output shape by evaluating the layer abstractly (`jax.eval_shape`), so
    the layer's own argument checks reject shapes that cannot fit before any
    data is seen. Parameters are dicts (`{"w": ..., "b": ...}`, `{}` when none);
    `input_shape` excludes the batch axis.

`build_model` turns the validated `model` section of a config (see
`jaxbp.config`) into a `Model`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.nn.initializers import (constant, glorot_normal, glorot_uniform, he_normal, he_uniform,
                                 lecun_normal, lecun_uniform, normal, ones, truncated_normal,
                                 uniform, variance_scaling, zeros)

from jaxbp import layers as hand_layers
from jaxbp import losses as hand_losses
from jaxbp import reference
from jaxbp._spatial import LayerArgumentError, fail, spatial_tuple
from jaxbp.config import LAYERS, ConfigError, validate_model

Shape = Tuple[int, ...]

__all__ = [
    "Ops", "OP_NAMES", "HAND", "REFERENCE", "Layer", "Conv", "MaxPool", "AvgPool", "ChannelMax",
    "Dense", "Flatten", "Sigmoid", "Tanh", "Relu", "LeakyRelu", "Softmax", "serial", "Model",
    "SummaryRow", "build_model", "format_summary", "initializer", "constant", "glorot_normal",
    "glorot_uniform", "he_normal", "he_uniform", "lecun_normal", "lecun_uniform", "normal", "ones",
    "truncated_normal", "uniform", "variance_scaling", "zeros",
]


# ---------------------------------------------------------------- primitives

OP_NAMES = ("conv", "max_pool", "avg_pool", "channel_max", "dense", "flatten", "sigmoid", "tanh",
            "relu", "leaky_relu", "softmax", "quadratic", "softmax_cross_entropy")
_LOSS_NAMES = ("quadratic", "softmax_cross_entropy")

# A frozen dataclass, not a NamedTuple: hashable (a static jit argument) but not a pytree, and
# its repr shows only the name.
Ops = dataclasses.make_dataclass(
    "Ops", [("name", str)] + [(op, Callable, dataclasses.field(repr=False)) for op in OP_NAMES],
    frozen=True)
Ops.__module__ = __name__
Ops.__doc__ = "The primitives a network runs through: `name` and one function per `OP_NAMES`."


def _ops(name: str, layer_module: Any, loss_module: Any) -> Ops:
    return Ops(name, **{op: getattr(loss_module if op in _LOSS_NAMES else layer_module, op)
                        for op in OP_NAMES})


HAND = _ops("hand", hand_layers, hand_losses)
REFERENCE = _ops("reference", reference, reference)


# ---------------------------------------------------------------- layers

class Layer(NamedTuple):
    """`init(rng, input_shape, dtype=float32) -> (output_shape, params)`;
    `apply(params, x, ops) -> y`, x of shape `(batch, *input_shape)`."""
    init: Callable
    apply: Callable


def _static(value: Any) -> Any:
    """Lists (from YAML) as tuples: hyperparameters must be hashable static values."""
    return tuple(_static(v) for v in value) if isinstance(value, (list, tuple)) else value


def _padding(padding: Any, rank: int) -> Any:
    """An int p means p zeros on both sides of every spatial axis (PyTorch's `padding=p`)."""
    if isinstance(padding, int) and not isinstance(padding, bool):
        return ((padding, padding),) * rank
    return _static(padding)


def _output_shape(apply: Callable, params: Any, input_shape: Shape, dtype) -> Shape:
    """Output shape of one example, by abstract evaluation: the layer's own checks run, no FLOPs."""
    example = jax.ShapeDtypeStruct((1, *input_shape), dtype)
    return tuple(jax.eval_shape(lambda p, x: apply(p, x, HAND), params, example).shape[1:])


def _layer(make_params: Callable, apply: Callable) -> Layer:
    """A layer from `make_params(rng, input_shape, dtype) -> params` and `apply`."""
    def init(rng, input_shape: Sequence[int], dtype=jnp.float32):
        input_shape = tuple(input_shape)
        params = make_params(rng, input_shape, dtype)
        return _output_shape(apply, params, input_shape, dtype), params
    return Layer(init, apply)


def _no_params(rng, input_shape, dtype) -> dict:
    del rng, input_shape, dtype
    return {}


def _stateless(forward: Callable) -> Layer:
    """A layer without parameters from `forward(x, ops)`."""
    return _layer(_no_params, lambda params, x, ops: forward(x, ops))


def _weights(rng, shape: Shape, features: int, use_bias: bool, kernel_init, bias_init,
             dtype) -> dict:
    w_key, b_key = jax.random.split(rng)
    params = {"w": kernel_init(w_key, shape, dtype)}
    if use_bias:
        params["b"] = bias_init(b_key, (features,), dtype)
    return params


def Conv(features: int, kernel, stride=1, padding="VALID", dilation=1, groups: int = 1,
         use_bias: bool = True, kernel_init=lecun_normal(), bias_init=zeros) -> Layer:
    """Convolution over the spatial axes of `(*spatial, channels)` examples (rank 1-3).

    `kernel` is an int (the same on every axis) or one int per axis; the kernel
    array is `(*kernel, channels // groups, features)`. `padding` is "VALID",
    "SAME", an int (both sides of every axis) or `(low, high)` pairs.
    """
    kernel, stride, dilation = _static(kernel), _static(stride), _static(dilation)

    def make_params(rng, input_shape, dtype):
        if len(input_shape) < 2:
            raise fail("conv", f"expected examples of shape (*spatial, channels), got shape "
                               f"{input_shape}; set model.input_shape to add a channel axis")
        sizes = spatial_tuple("conv", "kernel", kernel, len(input_shape) - 1)
        # Checked before the kernel is drawn: channels // groups of 0 breaks fan-in initialisers.
        if not (isinstance(groups, int) and groups >= 1 and input_shape[-1] % groups == 0):
            raise fail("conv", f"groups must be an int >= 1 dividing the input channels "
                               f"({input_shape[-1]}), got {groups!r}")
        return _weights(rng, (*sizes, input_shape[-1] // groups, features), features, use_bias,
                        kernel_init, bias_init, dtype)

    def apply(params, x, ops):
        return ops.conv(x, params["w"], params.get("b"), stride=stride,
                        padding=_padding(padding, x.ndim - 2), dilation=dilation, groups=groups)

    return _layer(make_params, apply)


def Dense(features: int, use_bias: bool = True, kernel_init=lecun_normal(),
          bias_init=zeros) -> Layer:
    """Fully connected layer on flat `(in,)` examples; weights `(in, features)`."""
    def make_params(rng, input_shape, dtype):
        if len(input_shape) != 1:
            raise fail("dense", f"expected flat examples of shape (features,), got shape "
                                f"{input_shape}; put a flatten layer before it")
        return _weights(rng, (input_shape[0], features), features, use_bias, kernel_init,
                        bias_init, dtype)

    def apply(params, x, ops):
        return ops.dense(x, params["w"], params.get("b"))

    return _layer(make_params, apply)


def _pool(op_name: str, window, stride=None, padding="VALID") -> Layer:
    window, stride = _static(window), _static(stride)
    return _stateless(lambda x, ops: getattr(ops, op_name)(
        x, window, stride=stride, padding=_padding(padding, x.ndim - 2)))


def MaxPool(window, stride=None, padding="VALID") -> Layer:
    """Max over windows of the spatial axes; `stride` defaults to the window."""
    return _pool("max_pool", window, stride, padding)


def AvgPool(window, stride=None, padding="VALID") -> Layer:
    """Mean over windows of the spatial axes; `stride` defaults to the window."""
    return _pool("avg_pool", window, stride, padding)


def ChannelMax(group_size: int) -> Layer:
    """Max over runs of `group_size` consecutive channels (seed 001's winner kernel)."""
    return _stateless(lambda x, ops: ops.channel_max(x, group_size))


def Flatten() -> Layer:
    """All axes of an example into one."""
    return _stateless(lambda x, ops: ops.flatten(x))


def _elementwise(op_name: str) -> Callable[[], Layer]:
    def constructor() -> Layer:
        return _stateless(lambda x, ops: getattr(ops, op_name)(x))
    constructor.__name__ = constructor.__qualname__ = op_name.title()
    constructor.__doc__ = f"The `{op_name}` activation as a layer."
    return constructor


Sigmoid = _elementwise("sigmoid")
Tanh = _elementwise("tanh")
Relu = _elementwise("relu")
Softmax = _elementwise("softmax")


def LeakyRelu(negative_slope: float = 0.01) -> Layer:
    """max(x, negative_slope * x) as a layer."""
    return _stateless(lambda x, ops: ops.leaky_relu(x, negative_slope))


def serial(*layers: Layer) -> Layer:
    """Layers in sequence; the parameters are a list with one entry per layer."""
    def init(rng, input_shape: Sequence[int], dtype=jnp.float32):
        shape, params = tuple(input_shape), []
        for layer, key in zip(layers, jax.random.split(rng, len(layers))):
            shape, p = layer.init(key, shape, dtype)
            params.append(p)
        return shape, params

    def apply(params, x, ops):
        for layer, p in zip(layers, params):
            x = layer.apply(p, x, ops)
        return x

    return Layer(init, apply)


# ---------------------------------------------------------------- from config

_INITIALIZER_FACTORIES = {
    "zeros": lambda: zeros,
    "ones": lambda: ones,
    "constant": constant,
    "normal": normal,
    "uniform": uniform,
    "truncated_normal": truncated_normal,
    "lecun_normal": lecun_normal,
    "lecun_uniform": lecun_uniform,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
    "he_normal": he_normal,
    "he_uniform": he_uniform,
    "variance_scaling": variance_scaling,
}


def initializer(spec: dict) -> Callable:
    """`{"name": "normal", "stddev": 0.1}` -> `jax.nn.initializers.normal(stddev=0.1)`."""
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    return _INITIALIZER_FACTORIES[spec["name"]](**kwargs)


def _weight_kwargs(cfg: dict) -> dict:
    return {"use_bias": cfg["use_bias"], "kernel_init": initializer(cfg["kernel_init"]),
            "bias_init": initializer(cfg["bias_init"])}


_FROM_CONFIG = {
    "conv": lambda c: Conv(c["features"], c["kernel"], c["stride"], c["padding"], c["dilation"],
                           c["groups"], **_weight_kwargs(c)),
    "dense": lambda c: Dense(c["features"], **_weight_kwargs(c)),
    "max_pool": lambda c: MaxPool(c["window"], c["stride"], c["padding"]),
    "avg_pool": lambda c: AvgPool(c["window"], c["stride"], c["padding"]),
    "channel_max": lambda c: ChannelMax(c["group_size"]),
    "flatten": lambda c: Flatten(),
    "sigmoid": lambda c: Sigmoid(),
    "tanh": lambda c: Tanh(),
    "relu": lambda c: Relu(),
    "leaky_relu": lambda c: LeakyRelu(c["negative_slope"]),
    "softmax": lambda c: Softmax(),
}


class SummaryRow(NamedTuple):
    """One line of a model summary."""
    index: int
    layer: str          # type and the hyperparameters that differ from the defaults
    output_shape: Shape  # per example
    params: int


class Model(NamedTuple):
    """A network with its loss.

    init(rng, dtype=jnp.float32) -> params: a list with one dict per layer.
    apply(params, x, ops=HAND) -> outputs `(batch, num_classes)`; x is
      `(batch, *anything)` holding prod(input_shape) values per example.
    loss(params, x, labels, ops=HAND) -> scalar; labels are integer classes
      (one-hot encoded here for the quadratic loss).
    """
    init: Callable
    apply: Callable
    loss: Callable
    summary: Tuple[SummaryRow, ...]
    input_shape: Shape
    num_classes: int
    loss_name: str


def _describe(cfg: dict) -> str:
    """'conv(features=6, kernel=5, padding=SAME)': the type and its non-default keys."""
    schema = LAYERS[cfg["type"]]
    shown = [f"{k}={_format_value(v)}" for k, v in cfg.items()
             if k != "type" and v != schema[k].default]
    return f"{cfg['type']}({', '.join(shown)})" if shown else cfg["type"]


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        args = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value['name']}({args})" if args else value["name"]
    return str(value)


def _trace(layers: Sequence[Layer], cfgs: Sequence[dict], input_shape: Shape,
           ) -> Tuple[SummaryRow, ...]:
    """Summary rows from abstract inits; a layer that rejects its input becomes a ConfigError."""
    rows, shape = [], input_shape
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    for index, (layer, cfg) in enumerate(zip(layers, cfgs)):
        out = {}

        def abstract_init(rng, layer=layer, shape=shape, out=out):
            out["shape"], params = layer.init(rng, shape)
            return params

        try:
            params = jax.eval_shape(abstract_init, key)
        except LayerArgumentError as err:
            raise ConfigError(f"model.layers[{index}] ({cfg['type']}): input of shape {shape}: "
                              f"{err}") from None
        shape = out["shape"]
        count = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
        rows.append(SummaryRow(index, _describe(cfg), shape, count))
    return tuple(rows)


def _model_input_shape(model_cfg: dict, data_shape: Sequence[int]) -> Shape:
    wanted = model_cfg["input_shape"]
    if wanted is None:
        return tuple(data_shape)
    if math.prod(wanted) != math.prod(data_shape):
        raise ConfigError(f"model.input_shape: {wanted} holds {math.prod(wanted)} values but the "
                          f"data set's examples of shape {tuple(data_shape)} hold "
                          f"{math.prod(data_shape)}")
    return tuple(wanted)


def build_model(model_cfg: dict, loss_name: str, input_shape: Sequence[int],
                num_classes: int) -> Model:
    """Builds the network of a config's `model` section and checks every shape.

    Args:
      model_cfg: the `model` section (validated here too, defaults filled).
      loss_name: "softmax_cross_entropy" or "quadratic".
      input_shape: shape of one example of the data set (no batch axis).
      num_classes: the data set's number of classes; the net must output that many.

    Raises:
      ConfigError: naming the layer that cannot take its input's shape
        (`model.layers[3] (conv): ...`), or an output size that is not `num_classes`.
    """
    model_cfg = validate_model(model_cfg, loss_name)
    shape = _model_input_shape(model_cfg, input_shape)
    cfgs = model_cfg["layers"]
    layers = [_FROM_CONFIG[cfg["type"]](cfg) for cfg in cfgs]
    summary = _trace(layers, cfgs, shape)
    last = summary[-1]
    if last.output_shape != (num_classes,):
        raise ConfigError(f"model.layers[{last.index}] ({cfgs[-1]['type']}): the network outputs "
                          f"shape {last.output_shape} per example, but the data set has "
                          f"{num_classes} classes; the last layer must output ({num_classes},)")
    net = serial(*layers)

    # One compiled program instead of an eager dispatch (and compile) per initialiser op.
    @functools.partial(jax.jit, static_argnames="dtype")
    def init(rng, dtype=jnp.float32):
        return net.init(rng, shape, dtype)[1]

    def apply(params, x, ops=HAND):
        return net.apply(params, jnp.reshape(x, (x.shape[0], *shape)), ops)

    def loss(params, x, labels, ops=HAND):
        out = apply(params, x, ops)
        if loss_name == "quadratic":
            return ops.quadratic(out, jax.nn.one_hot(labels, num_classes, dtype=out.dtype))
        return ops.softmax_cross_entropy(out, labels)

    return Model(init, apply, loss, summary, shape, num_classes, loss_name)


def format_summary(model: Model) -> str:
    """The summary as an aligned text table, with the input row and the parameter total."""
    rows = [("#", "layer", "output shape", "params"), ("", "input", str(model.input_shape), "")]
    rows += [(str(r.index), r.layer, str(r.output_shape), f"{r.params:,}") for r in model.summary]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{a:>{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:>{widths[3]}}"
             for a, b, c, d in rows]
    total = sum(r.params for r in model.summary)
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"total parameters: {total:,} ({model.loss_name} loss)")
    return "\n".join(line.rstrip() for line in lines)
