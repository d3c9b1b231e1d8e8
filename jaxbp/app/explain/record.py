"""One example through a config's network, layer by layer, with every delta recorded.

The top-level layers (`Model.layers`, the items of `model.layers`) run one at a time: the
loss's gradient is the last layer's delta, and each layer's `jax.vjp` turns the delta it got
into the one it sends down to the layer below. Run through the hand rules (`HAND`) this is
the backward pass of a training step written out; run through the plain twins
(`REFERENCE`), the same chain is JAX's own differentiation of them, for comparison.

Training mode throughout (`train=True`, the key of a run's first step): backpropagation only
ever runs in training, and only training has hand rules everywhere. Evaluation's batch norm
(running statistics) and dropout (keep everything) have no backward of their own
(`jaxbp.registry`), and batch norm's three-term delta exists only with the batch's own
statistics. The batch here is the one example, so batch norm normalises each channel over
that example's positions.

Keys (the arrays of one example, its batch axis dropped; parameters and gradients as they
are), for layer i in config order, 0-based:
    "{i}/input", "{i}/output", "{i}/delta_output" (∂L/∂output), "{i}/delta_input"
    (∂L/∂input), "{i}/{param}" and "{i}/grad_{param}" (param a path in the layer's
    parameters: "w", "b", or "layers/0/w" inside a residual block);
    for a residual block also "{i}/{path}/output" and "{i}/{path}/delta_input" for its
    paths "layers" and "shortcut" (the block's delta_input is their sum);
    "label" and "loss".
"""
from __future__ import annotations

from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import nn
from jaxbp.registry import Ops

Arrays = Dict[str, np.ndarray]


def param_paths(params) -> List[tuple]:
    """`(path, array)` for each array of a layer's parameters: "w", "layers/0/w"."""
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def _programs(model, ops: Ops):
    """Jitted `forward(where, params, x, key) -> y` and `backward(where, params, x, key, dy)
    -> (grads, dx)` of one part of the network: `where` is `(i,)` for top-level layer i,
    `(i, j)` for part j of it (a residual block's path)."""
    def part(where):
        layer = model.layers[where[0]]
        return layer if len(where) == 1 else layer.parts[where[1]][1]

    def forward(where, params, x, key):
        return part(where).apply(params, x, ops, train=True, rng=key)

    def backward(where, params, x, key, dy):
        return jax.vjp(lambda p, a: forward(where, p, a, key), params, x)[1](dy)

    return (jax.jit(forward, static_argnums=0), jax.jit(backward, static_argnums=0))


def record(model, params, x, label, ops: Ops, rng) -> Arrays:
    """Every layer's input, output, deltas, parameters and gradients for one example.

    Each layer (and each path of a residual block) is a compiled program of its own, its
    input an array the layer below has finished, as in eager execution. One program for the
    whole network would let XLA recompute a layer's output inside the next layer's fusions,
    rounded differently there; a twin's max (`jnp.max` in channel_max) then no longer finds
    its maximum among its inputs, and JAX's rule, which sends the delta to the inputs equal
    to the maximum, drops it (or gives NaN, compiled without optimisations).

    Args:
      model: a `jaxbp.app.model.Model`.
      params: its parameters, one entry per top-level layer.
      x: the example with a batch axis of one, `(1, *anything)` holding the model's input.
      label: the example's integer label.
      ops: `HAND` or `REFERENCE`.
      rng: the training-mode key (dropout); layer i gets `nn.part_key(rng, i)`, path j of it
        `nn.part_key` of that and j, as the network hands them down.

    Returns:
      The arrays by key (see the module docstring), as NumPy arrays.
    """
    forward, backward = _programs(model, ops)
    x = jnp.reshape(x, (1, *model.input_shape))
    labels = jnp.asarray([label], jnp.int32)
    arrays = {"label": jnp.asarray(label, jnp.int32)}
    inputs, keys = [], []
    h = x
    for i, p in enumerate(params):
        keys.append(nn.part_key(rng, i))
        inputs.append(h)
        arrays[f"{i}/input"] = h[0]
        for path, leaf in param_paths(p):
            arrays[f"{i}/{path}"] = leaf
        for j, (name, _) in enumerate(model.layers[i].parts):  # a residual block's paths
            arrays[f"{i}/{name}/output"] = forward((i, j), p[name], h,
                                                   nn.part_key(keys[i], j))[0]
        h = forward((i,), p, h, keys[i])
        arrays[f"{i}/output"] = h[0]
    loss, delta = jax.jit(jax.value_and_grad(
        lambda out: model.output_loss(out, x, labels, ops)))(h)
    arrays["loss"] = loss
    for i in reversed(range(len(params))):
        arrays[f"{i}/delta_output"] = delta[0]
        for j, (name, _) in enumerate(model.layers[i].parts):
            arrays[f"{i}/{name}/delta_input"] = backward(
                (i, j), params[i][name], inputs[i], nn.part_key(keys[i], j), delta)[1][0]
        grads, delta = backward((i,), params[i], inputs[i], keys[i], delta)
        for path, leaf in param_paths(grads):
            arrays[f"{i}/grad_{path}"] = leaf
        arrays[f"{i}/delta_input"] = delta[0]
    return {k: np.asarray(v) for k, v in jax.device_get(arrays).items()}
