"""The training view: how large each layer's delta and parameter gradient are, epoch by epoch.

A train step measures, for each item of `model.layers` (a residual block counts as one, its
summary path "0", "1", ...), with L the step's loss, the mean over the batch's B examples of
their losses ℓ_n, and y_n example n's output of that layer:

  delta norm: √B·‖∂L/∂Y‖, Y the layer's output for the whole batch, `(B, *output_shape)`,
    and ‖·‖ the L2 norm over all its entries. As ∂L/∂y_n = (1/B)·∂ℓ_n/∂y_n, this is
    √(mean_n ‖∂ℓ_n/∂y_n‖²): the root mean square over the batch of the norm of one example's
    own delta (the sources' δ at that layer's output), whatever the batch size. Batch norm
    ties the examples together; the quantity measured is still √B·‖∂L/∂Y‖.
  gradient norm: ‖∂L/∂θ‖, the L2 norm of all the layer's parameter gradients together (a
    block's: all its layers'), as handed to the optimizer; only for layers with parameters.

The deltas' norms come out of the backward pass the step runs anyway: each layer's output
goes through `jaxbp.nn.probe`, whose backward reports every example's squared delta norm for
a zero vector. Reading every delta once more is not free: it slows a LeNet-5 step on the CPU
by about 15% (experiments/results/trainview-overhead.md). So an epoch measures on its steps
0, EVERY, 2·EVERY, ... and runs the plain step on the others (`steps.TrainSteps`); the
parameters come out the same either way. The measured steps' norms are summed on the device
(`steps.Totals`) and, divided by their number at the epoch's end, are metrics.jsonl's
`delta_norms` and `grad_norms`: means over the epoch's measuring steps.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.app.model import Model

DELTA_NORMS = "delta_norms"
GRAD_NORMS = "grad_norms"
EVERY = 16
"""An epoch measures the norms on its steps 0, EVERY, 2·EVERY, ... (`steps.TrainSteps`)."""


def _has_parameters(model: Model, path: str) -> bool:
    return any(row.param_shapes for row in model.summary
               if row.path == path or row.path.startswith(f"{path}."))


def trained_layers(model: Model) -> tuple[int, ...]:
    """Indices into `model.layers` of the items holding parameters (inside a block too)."""
    return tuple(i for i, row in enumerate(model.top_rows)
                 if _has_parameters(model, row.path))


def zero_probes(model: Model, dtype, batch: int) -> list:
    """The `probes=` of `Model.loss` for a batch of `batch`: one zero vector `(batch,)` per
    item of `model.layers`."""
    return [jnp.zeros((batch,), dtype) for _ in model.top_rows]


def measured_steps(steps: int) -> int:
    """How many of an epoch's `steps` measure the norms: 0, EVERY, 2·EVERY, ..."""
    return -(-steps // EVERY)


def zero_sums(model: Model, dtype) -> tuple[jax.Array, jax.Array]:
    """Zero running sums: `(len(model.top_rows),)` delta norms, `(len(trained_layers),)`
    gradient norms."""
    return (jnp.zeros((len(model.top_rows),), dtype),
            jnp.zeros((len(trained_layers(model)),), dtype))


def _norm(tree) -> jax.Array:
    # |g|·|g|, not g·g: XLA would share g·g with Adam's second moment and store it for both.
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) * jnp.abs(leaf))
                        for leaf in jax.tree_util.tree_leaves(tree)))


def step_norms(model: Model, grads: Sequence, squares: Sequence, batch: int
               ) -> tuple[jax.Array, jax.Array]:
    """One step's delta norms and gradient norms, as `zero_sums` shapes them (traced).

    Args:
      grads: the parameter gradients, one entry per item of `model.layers`.
      squares: the gradients of `zero_probes`: for each layer, every example's ‖∂L/∂y_n‖².
      batch: B, the global batch's size.
    """
    deltas = batch * jnp.sqrt(jnp.stack([jnp.mean(s) for s in squares]))
    norms = [_norm(grads[i]) for i in trained_layers(model)]
    return deltas, jnp.stack(norms) if norms else jnp.zeros((0,), deltas.dtype)


def epoch_norms(model: Model, delta_sums, grad_sums, steps: int) -> dict:
    """metrics.jsonl's `delta_norms` and `grad_norms` ({path: mean over the measured
    steps}) from their sums (host or device arrays) over `steps` measured steps."""
    rows = model.top_rows
    delta_sums, grad_sums = np.asarray(delta_sums), np.asarray(grad_sums)
    return {DELTA_NORMS: {row.path: float(v) / steps for row, v in zip(rows, delta_sums)},
            GRAD_NORMS: {rows[i].path: float(v) / steps
                         for i, v in zip(trained_layers(model), grad_sums)}}


def layer_names(model: Model) -> dict:
    """{path: type} of the items of `model.layers`, for the curves' labels."""
    return {row.path: row.type for row in model.top_rows}
