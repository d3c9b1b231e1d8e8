"""What `test_parallel.py` runs in a child Python whose XLA_FLAGS split the CPU into 8 fake
devices (they must be set before JAX starts). Prints one JSON line.

    python parallel_child.py train CONFIG ROOT   the runs' metrics and summaries, by name
    python parallel_child.py rules               gradient errors of the hand rules, sharded
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxbp import fast
from jaxbp.app import parallel, report
from jaxbp.app.cli import main
from jaxbp.app.config import validate_model
from jaxbp.app.experiment import init_params
from jaxbp.app.model import build_model
from jaxbp.app.steps import training_loss
from jaxbp.registry import HAND, REFERENCE
from jaxbp.testing import relative_error


def train_runs(config: str, root: str) -> dict:
    """On all 8 devices, on one, on 8 for one epoch then resumed on one; and a batch size
    that 8 does not divide (its exit code and stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["train", config, "--out", os.path.join(root, "odd"),
                     "--set", "data.batch_size=12"])
    results = {"odd_batch": [code, err.getvalue()]}
    resumed = os.path.join(root, "resumed")
    runs = {
        "eight": [os.path.join(root, "eight")],
        "one": [os.path.join(root, "one"), "--set", "train.devices=1"],
        "first_on_eight": [resumed, "--set", "train.epochs=1"],
        "resumed_on_one": [resumed, "--resume", "--set", "train.devices=1"],
    }
    for name, (out, *args) in runs.items():
        assert main(["train", config, "--out", out, *args]) == 0, name
        with open(os.path.join(out, report.SUMMARY_FILE), encoding="utf-8") as f:
            results[name] = (report.read_metrics(out), json.load(f))
    return results


# conv (without bias: batch norm would leave its gradient rounding noise), batch norm, relu,
# max_pool (2x2 windows tile 10x10: the tiled spread applies), conv (stride 1: the band
# applies), dense.
RULES_MODEL = {"layers": [
    {"type": "conv", "features": 4, "kernel": 3, "use_bias": False},
    {"type": "batch_norm"}, {"type": "relu"}, {"type": "max_pool", "window": 2},
    {"type": "conv", "features": 6, "kernel": 2}, {"type": "relu"},
    {"type": "flatten"}, {"type": "dense", "features": 10},
]}
LOSS = "softmax_cross_entropy"
PER_DEVICE = 2


def _worst(grads, expected) -> float:
    return max(float(relative_error(g, e)) for g, e in
               zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)))


def _mean(trees):
    return jax.tree_util.tree_map(lambda *leaves: sum(leaves) / len(leaves), *trees)


def rule_errors() -> dict:
    """The worst relative error over the parameters of (hand rules: for each formulation of
    each slot of `jaxbp.fast`, forced):

      jit: the hand rules' gradient, the batch split over the devices under `jax.jit`
        (XLA reduces), against the twins' on one device;
      shard_map_hand, shard_map_reference: each device's gradient of its own slice's loss
        (batch norm over the slice) inside `jax.shard_map`, through the hand rules and the
        twins, against the mean of the twins' per-slice gradients computed one slice at a
        time. A psum of one's own would make it the device count times too large.
    """
    jax.config.update("jax_enable_x64", True)
    model = build_model(validate_model(RULES_MODEL, LOSS), LOSS, (12, 12, 1), 10)
    mesh = parallel.make_mesh(parallel.mesh_devices())
    n = parallel.device_count(mesh)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(PER_DEVICE * n, 12, 12, 1)))
    labels = jnp.asarray(rng.integers(0, 10, size=PER_DEVICE * n))
    params = init_params(model, 0, jnp.float64)

    def grad(ops):
        return jax.grad(training_loss(model, ops, dtype=jnp.float64))

    def jit_sharded(ops):
        batch = parallel.batch_sharded(mesh)
        return jax.jit(grad(ops), in_shardings=(parallel.replicated(mesh), batch, batch))(
            params, images, labels)

    def shard_mapped(ops):
        loss = training_loss(model, ops, dtype=jnp.float64)

        def local(p, x, y):  # the global loss is the mean of the n slices' mean losses
            return jax.grad(lambda p: loss(p, x, y) / n)(p)

        data = PartitionSpec(parallel.AXIS)
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), data, data),
                                     out_specs=PartitionSpec()))(params, images, labels)

    reference = jax.jit(grad(REFERENCE))
    whole = reference(params, images, labels)
    per_slice = _mean([reference(params, images[i:i + PER_DEVICE], labels[i:i + PER_DEVICE])
                       for i in range(0, PER_DEVICE * n, PER_DEVICE)])
    errors = {}
    for slot in fast.SLOTS:
        for name in fast.names(slot):
            with fast.use({slot: name}):
                errors[f"{slot}={name}"] = {
                    "jit": _worst(jit_sharded(HAND), whole),
                    "shard_map_hand": _worst(shard_mapped(HAND), per_slice)}
    return {"devices": n, "errors": errors,
            # the twins do not go through jaxbp.fast: once is enough
            "shard_map_reference": _worst(shard_mapped(REFERENCE), per_slice),
            "slices_differ_from_whole": _worst(per_slice, whole)}


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    print(json.dumps({"train": train_runs, "rules": rule_errors}[command](*args)))
