"""The network of a config's `model` section, with its loss: a `Model`.

Each item of `model.layers` is a registered layer (`jaxbp.registry`) built by `jaxbp.nn.layer`
from its `type` and hyperparameters; the loss is a registered loss. Every shape is checked
here, before any data is seen: a layer that cannot take its input is a ConfigError naming it.
"""
from __future__ import annotations

import copy
import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxbp import nn, registry
from jaxbp._spatial import LayerArgumentError
from jaxbp.registry import HAND
from jaxbp.schema import REQUIRED, ConfigError

if TYPE_CHECKING:  # the app's config types; this module takes any object shaped like them
    from jaxbp.app.config import LayerConfig, ModelConfig

Shape = Tuple[int, ...]


class SummaryRow(NamedTuple):
    """One line of a model summary; shapes are per example.

    `path` locates the layer in `model.layers`: "3" for the fourth item, "3.layers.0" for
    the first layer inside a residual block there, "3.shortcut.0" for its shortcut's. The
    parameters are at the same path of the parameter tree ("3/layers/0/w").
    """
    path: str
    type: str
    layer: str            # type and the hyperparameters that differ from the defaults
    input_shape: Shape
    output_shape: Shape
    param_shapes: Mapping[str, Shape]

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for shape in self.param_shapes.values())

    @property
    def where(self) -> str:
        """The config key of this layer: `model.layers[3].shortcut[0]`."""
        parts = self.path.split(".")
        keys = ["layers"] + parts[1:-1:2]
        return "model." + ".".join(f"{k}[{i}]" for k, i in zip(keys, parts[::2]))

    @property
    def depth(self) -> int:
        return self.path.count(".") // 2


class Model(NamedTuple):
    """A network with its loss.

    init(rng, dtype=jnp.float32) -> params: a list with one entry per layer.
    init_state(dtype=jnp.float32) -> the non-trainable state (running statistics), a list
      with one entry per layer (`{}` for most).
    apply(params, x, ops=HAND, *, train=False, rng=None, state=None, probes=None)
      -> outputs `(batch, *output_shape)`, or `(outputs, new_state)` when `state` is given
      (see `jaxbp.nn`); x is `(batch, *anything)` holding prod(input_shape) values per
      example. `probes`: None, or one zero vector per item of `model.layers`, whose
      gradient holds squared norms of that layer's delta (`nn.probe`, `nn.serial`).
    loss(params, x, labels, ops=HAND, *, train=False, rng=None, state=None, probes=None)
      -> (scalar loss, (outputs, new_state)): the outputs come along (`has_aux`) so a train
      step that needs them runs the forward once; new_state is None without `state`. The
      loss compares the outputs with the labels, or with x itself (target "input").
    score(outputs, x, labels) -> the batch's sum of `metric` per example: correct answers
      ("accuracy"), or the mean squared error of each reconstruction
      ("reconstruction_error"); summed over a split and divided by its size, the metric.
    layers: the `jaxbp.nn.Layer` of each item of `model.layers`, in order (`apply` runs
      them in sequence, item i on `params[i]`, with key `nn.part_key(rng, i)`).
    output_loss(outputs, x, labels, ops=HAND) -> the scalar loss of given outputs: what
      `loss` computes after the network.
    """
    init: Callable
    init_state: Callable
    apply: Callable
    loss: Callable
    summary: Tuple[SummaryRow, ...]
    input_shape: Shape
    num_classes: int
    loss_name: str
    target: str
    score: Callable
    layers: Tuple[nn.Layer, ...]
    output_loss: Callable

    @property
    def top_rows(self) -> Tuple[SummaryRow, ...]:
        """The summary rows of the items of `model.layers`, in order (none inside blocks)."""
        return tuple(row for row in self.summary if row.depth == 0)

    @property
    def metric(self) -> str:
        return "accuracy" if self.target == "labels" else "reconstruction_error"


def _is_default(key: str, value: Any, spec) -> bool:
    """Whether a checked value is its key's default (checked the same way)."""
    if spec.default is REQUIRED:
        return False
    return value == spec.check.fn(key, copy.deepcopy(spec.default))


def _format_value(value: Any) -> str:
    if isinstance(value, dict) and "name" in value:
        args = ", ".join(f"{k}={v}" for k, v in value.items() if k != "name")
        return f"{value['name']}({args})" if args else value["name"]
    return str(value)


def _describe(item: LayerConfig) -> str:
    """'conv(features=6, kernel=5, padding=SAME)': the type and its non-default keys."""
    if item.type == RESIDUAL:
        shortcut = f"{len(item.shortcut)} layers" if item.shortcut else "identity"
        return f"residual(shortcut: {shortcut})"
    schema = registry.get(item.type).hyperparameters
    shown = [f"{k}={_format_value(v)}" for k, v in item.hyperparameters.items()
             if not _is_default(k, v, schema[k])]
    return f"{item.type}({', '.join(shown)})" if shown else item.type


RESIDUAL = "residual"
"""The config type of a residual block: `{type: residual, layers: [...], shortcut: [...]}`."""


def _build_layer(item: LayerConfig, path: str, where: str) -> nn.Layer:
    if item.type == RESIDUAL:
        return nn.residual(_build_list(item.layers, f"{path}.layers", f"{where}.layers"),
                           _build_list(item.shortcut, f"{path}.shortcut", f"{where}.shortcut"))
    try:
        return nn.layer(item.type, **item.hyperparameters)
    except (ConfigError, LayerArgumentError) as err:  # values the schema let through
        raise ConfigError(f"{where} ({item.type}): {err}") from None


def _build_list(items: Sequence[LayerConfig], path: str, where: str) -> nn.Layer:
    """`nn.serial` of the items; `path` is "" at the top, "3.layers" inside block 3."""
    prefix = f"{path}." if path else ""
    return nn.serial(*(_build_layer(item, f"{prefix}{i}", f"{where}[{i}]")
                       for i, item in enumerate(items)))


def _trace(items: Sequence[LayerConfig], input_shape: Shape, path: str = ""
           ) -> Tuple[Tuple[SummaryRow, ...], Shape]:
    """Summary rows (a block's own row, then its layers') and the output shape, from
    abstract inits; a layer that rejects its input becomes a ConfigError naming it."""
    rows, shape = [], input_shape
    prefix = f"{path}." if path else ""
    for i, item in enumerate(items):
        here = f"{prefix}{i}"
        row = SummaryRow(here, item.type, _describe(item), shape, (), {})
        layer = _build_layer(item, here, row.where)
        try:
            output_shape, params = nn.abstract_init(layer, shape)
        except LayerArgumentError as err:
            raise ConfigError(f"{row.where} ({item.type}): input of shape {shape}: "
                              f"{err}") from None
        if item.type == RESIDUAL:
            inner = [_trace(item.layers, shape, f"{here}.layers")[0],
                     _trace(item.shortcut, shape, f"{here}.shortcut")[0]]
            rows += [row._replace(output_shape=output_shape), *inner[0], *inner[1]]
        else:
            rows.append(row._replace(output_shape=output_shape, param_shapes={
                name: tuple(p.shape) for name, p in params.items()}))
        shape = output_shape
    return tuple(rows), shape


def _model_input_shape(wanted, data_shape: Sequence[int]) -> Shape:
    if wanted is None:
        return tuple(data_shape)
    if math.prod(wanted) != math.prod(data_shape):
        raise ConfigError(f"model.input_shape: {list(wanted)} holds {math.prod(wanted)} values "
                          f"but the data set's examples of shape {tuple(data_shape)} hold "
                          f"{math.prod(data_shape)}")
    return tuple(wanted)


def count_correct(outputs, x, labels):
    """How many outputs' largest entry is the label's."""
    del x
    return jnp.sum(jnp.argmax(outputs, axis=-1).astype(labels.dtype) == labels,
                   dtype=jnp.int32)


def _reconstruction_errors(outputs, x, labels):
    """Σ over the batch of each example's mean squared error against its input."""
    del labels
    error = outputs - jnp.reshape(x, outputs.shape).astype(outputs.dtype)
    return jnp.sum(jnp.mean(jnp.square(error), axis=tuple(range(1, error.ndim))))


def _check_target(target: str, loss_rule, output_shape: Shape, shape: Shape,
                  num_classes: int, last: SummaryRow) -> None:
    """The network's output fits what the loss compares it with."""
    if target == "input":
        if loss_rule.targets != "one_hot":
            raise ConfigError(f"loss: {loss_rule.name} compares the outputs with integer "
                              f"labels, but data.target is input; use a loss comparing arrays, "
                              f"such as quadratic")
        if output_shape != shape:
            raise ConfigError(f"{last.where} ({last.type}): the network outputs shape "
                              f"{output_shape} per example, but data.target: input needs the "
                              f"input's shape {shape} to compare with")
    elif output_shape != (num_classes,):
        raise ConfigError(f"{last.where} ({last.type}): the network outputs "
                          f"shape {output_shape} per example, but the data set has "
                          f"{num_classes} classes; the last layer must output ({num_classes},)")


def build_model(model_cfg: ModelConfig, loss_name: str, input_shape: Sequence[int],
                num_classes: int, target: str = "labels") -> Model:
    """Builds the network of a validated `model` section and checks every shape.

    Args:
      model_cfg: the `model` section of a validated config (`jaxbp.app.config`).
      loss_name: a registered loss ("softmax_cross_entropy", "quadratic", ...).
      input_shape: shape of one example of the data set (no batch axis).
      num_classes: the data set's number of classes; the net must output that many.
      target: "labels" (classify), or "input" (reconstruct x: an autoencoder, whose output
        must have the input's shape).

    Raises:
      ConfigError: naming the layer that cannot take its input's shape
        (`model.layers[3] (conv): ...`, `model.layers[4].layers[1] (conv): ...`), a residual
        block whose paths disagree, or an output size that is not `num_classes`.
    """
    loss_rule = registry.get(loss_name, "loss")
    shape = _model_input_shape(model_cfg.input_shape, input_shape)
    items = model_cfg.layers
    summary, output_shape = _trace(items, shape)
    _check_target(target, loss_rule, output_shape, shape, num_classes,
                  next(r for r in reversed(summary) if r.depth == 0))
    net = _build_list(items, "", "model.layers")

    # One compiled program instead of an eager dispatch (and compile) per initialiser op.
    @functools.partial(jax.jit, static_argnames="dtype")
    def init(rng, dtype=jnp.float32):
        return net.init(rng, shape, dtype)[1]

    def init_state(dtype=jnp.float32):
        return net.init_state(shape, dtype)

    def apply(params, x, ops=HAND, *, train=False, rng=None, state=None, probes=None):
        return net.apply(params, jnp.reshape(x, (x.shape[0], *shape)), ops, train=train,
                         rng=rng, state=state, probes=probes)

    def output_loss(out, x, labels, ops=HAND):
        if target == "input":
            targets = jnp.reshape(x, out.shape).astype(out.dtype)
        elif loss_rule.targets == "one_hot":
            targets = jax.nn.one_hot(labels, num_classes, dtype=out.dtype)
        else:
            targets = labels
        return ops.of(loss_rule)(out, targets)

    def loss(params, x, labels, ops=HAND, *, train=False, rng=None, state=None,
             probes=None):
        out = apply(params, x, ops, train=train, rng=rng, state=state, probes=probes)
        out, new_state = out if state is not None else (out, None)
        return output_loss(out, x, labels, ops), (out, new_state)

    score = count_correct if target == "labels" else _reconstruction_errors
    return Model(init, init_state, apply, loss, summary, shape, num_classes, loss_name, target,
                 score, tuple(layer for _, layer in net.parts), output_loss)


def format_summary(model: Model) -> str:
    """The summary as an aligned text table, with the input row and the parameter total."""
    rows = [("#", "layer", "output shape", "params"), ("", "input", str(model.input_shape), "")]
    rows += [(r.path, "  " * r.depth + r.layer, str(r.output_shape),
              "" if r.type == RESIDUAL else f"{r.params:,}") for r in model.summary]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d:>{widths[3]}}"
             for a, b, c, d in rows]
    total = sum(r.params for r in model.summary)
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"total parameters: {total:,} ({model.loss_name} loss)")
    return "\n".join(line.rstrip() for line in lines)
