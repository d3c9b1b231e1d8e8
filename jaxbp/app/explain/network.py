"""`jaxbp explain CONFIG`: one test example through a config's network, its deltas recorded
through the hand rules and through the plain twins, written as `deltas.npz` and a page.

The parameters are drawn from the config's `train.seed` as training draws them, or read from
a run's newest intact checkpoint. Everything runs in training mode with the key of a run's
first step (`jaxbp.app.explain.record` says why), on test example `index`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import nn
from jaxbp.app import rundir
from jaxbp.app.check import compare
from jaxbp.app.experiment import RunError, init_params, setup
from jaxbp.app.explain.record import Arrays, param_paths, record
from jaxbp.app.model import Model
from jaxbp.app.steps import step_key
from jaxbp.registry import HAND, REFERENCE
from jaxbp.testing import TOLERANCE

NPZ_FILE = "deltas.npz"


@dataclasses.dataclass(frozen=True)
class Explained:
    """One example recorded through a config's network.

    Attributes:
      cfg: the config; model: its model.
      index: the test example; examples: how many the test split holds.
      origin: where the parameters come from, in words.
      hand, reference: the recordings through the hand rules and through the twins.
      errors: per recorded array (not the parameters, which both share), the hand rule's
        against the twins' (`compare_recordings`): "max_rel_error", "scale", "ok", ....
      slopes: f′ at the input of each elementwise top-level layer, by index.
      params: the parameters, one entry per top-level layer.
      model_state: the layers' non-trainable state (running statistics), one per layer.
    """
    cfg: Mapping
    model: Model
    index: int
    examples: int
    origin: str
    hand: Arrays
    reference: Arrays
    errors: Dict[str, dict]
    slopes: Dict[int, np.ndarray]
    params: list
    model_state: list


def elementwise_slopes(model: Model, params, arrays: Arrays, rng, tolerance: float
                       ) -> Dict[int, np.ndarray]:
    """f′ at the recorded input of each top-level layer that acts elementwise: no
    parameters, its output shaped like its input, and its recorded delta sent down equal to
    the arriving one times the rule's delta for a cotangent of ones (which is f′ exactly
    when the Jacobian is diagonal)."""
    slopes = {}
    for j, (layer, p, row) in enumerate(zip(model.layers, params, model.top_rows)):
        if p or layer.parts or row.input_shape != row.output_shape:
            continue
        x = jnp.asarray(arrays[f"{j}/input"])[None]
        y, pullback = jax.vjp(lambda a: layer.apply(p, a, HAND, train=True,
                                                    rng=nn.part_key(rng, j)), x)
        slope = np.asarray(pullback(jnp.ones_like(y))[0][0], np.float64)
        sent = np.asarray(arrays[f"{j}/delta_input"], np.float64)
        product = slope * np.asarray(arrays[f"{j}/delta_output"], np.float64)
        if np.max(np.abs(product - sent), initial=0.0) <= tolerance * max(
                np.max(np.abs(sent), initial=0.0), np.finfo(np.float64).tiny):
            slopes[j] = slope
    return slopes


def compare_recordings(hand: Arrays, reference: Arrays, params, tolerance: float
                       ) -> Dict[str, dict]:
    """`jaxbp.app.check.compare`'s row for each recorded array but the parameters (both
    recordings share them): the max relative error of the hand rules' array against the
    twins'. As in `jaxbp check`, a gradient that is zero in exact arithmetic (a conv bias
    before batch norm) holds only rounding noise, so a gradient below the tolerance times
    the network's largest gradient entry is measured against that entry."""
    parameters = {f"{i}/{path}" for i, p in enumerate(params) for path, _ in param_paths(p)}
    gradients = [k for k in hand if "/grad_" in k]
    network = max((float(np.max(np.abs(reference[k]), initial=0.0)) for k in gradients),
                  default=0.0)
    return {key: compare(key, hand[key], reference[key], tolerance,
                         network if key in gradients else 0.0)
            for key in hand if key != "label" and key not in parameters}


def _parameters(exp, run_dir: Optional[str], echo: Callable):
    """(params, model state, origin in words)."""
    cfg = exp.cfg
    if run_dir is None:
        return (init_params(exp.model, cfg.train.seed, exp.dtype), exp.model.init_state(exp.dtype),
                f"freshly drawn from train.seed {cfg.train.seed}, as training starts")
    epoch, params, state = rundir.restore_newest(run_dir, exp.model, exp.dtype, echo)
    return params, state, f"the checkpoint of epoch {epoch} in {run_dir}"


def explain(cfg: Mapping, index: int = 0, run_dir: Optional[str] = None,
            echo: Callable = print) -> Explained:
    """Records test example `index` through the config's network, hand rules and twins.

    Raises:
      RunError: `index` outside the test split, or a checkpoint that is missing, damaged or
        does not fit the config's model (also ConfigError/DataError for the config and data).
    """
    exp = setup(cfg, splits=("test",))
    examples = len(exp.test.labels)
    if not 0 <= index < examples:
        raise RunError(f"--index {index} is out of range: the test split of {cfg.data.name} "
                       f"has {examples} examples, so 0 to {examples - 1}")
    params, model_state, origin = _parameters(exp, run_dir, echo)
    x = jnp.asarray(exp.test.images[index:index + 1], exp.dtype)
    label = int(exp.test.labels[index])
    rng = step_key(cfg.train.seed, 0)
    hand = record(exp.model, params, x, label, HAND, rng)
    reference = record(exp.model, params, x, label, REFERENCE, rng)
    tolerance = TOLERANCE[cfg.train.precision]
    errors = compare_recordings(hand, reference, params, tolerance)
    slopes = elementwise_slopes(exp.model, params, hand, rng, tolerance)
    return Explained(cfg, exp.model, index, examples, origin, hand, reference, errors, slopes,
                     list(params), list(model_state))


def write_npz(explained: Explained, out_dir: str) -> str:
    """`out_dir/deltas.npz`: the hand rules' recording; returns its path."""
    path = os.path.join(out_dir, NPZ_FILE)
    np.savez(path, **explained.hand)
    return path
