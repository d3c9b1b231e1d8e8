"""What train, eval, check and the benchmark share: a config's model and data, ready to run.

Reproducibility starts here: initial parameters depend only on `train.seed`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.app import data
from jaxbp.app.model import Model, build_model
from jaxbp.app.steps import TrainState
from jaxbp.schema import ConfigError


class RunError(Exception):
    """A run that cannot go ahead as asked (bad model shapes, a run folder in use); one line."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A config's model and data, ready to train or evaluate."""
    cfg: Mapping
    model: Model
    dtype: np.dtype
    train: Any
    test: Any


def use_precision(precision: str) -> np.dtype:
    """The parameter dtype for "float32"/"float64", switching on jax x64 for the latter."""
    if precision == "float64":
        jax.config.update("jax_enable_x64", True)
    return jnp.dtype(precision)


def build(cfg: Mapping) -> Model:
    """The config's model; a shape or hyperparameter error becomes a one-line RunError."""
    name = cfg.data.name
    try:
        return build_model(cfg.model, cfg.loss, data.input_shape(name), data.num_classes(name),
                           cfg.data.target)
    except ConfigError:
        raise
    except ValueError as exc:  # a layer's own check that build_model did not translate
        raise RunError(f"model: {exc}") from None


def setup(cfg: Mapping, splits=("train", "test")) -> Experiment:
    """Builds the model and loads (preparing on demand) the requested splits."""
    dtype = use_precision(cfg.train.precision)
    model = build(cfg)
    loaded = {split: data.load(cfg.data, split) for split in splits}
    return Experiment(cfg, model, dtype, loaded.get("train"), loaded.get("test"))


def run_once(fn: Callable, *args):
    """`fn(*args)` compiled without XLA's backend optimisations, for code that runs once.

    The optimising CPU backend spends seconds on each truncated-normal
    initialiser (lecun_normal, ...); unoptimised, the whole init compiles in about one.
    """
    compiled = jax.jit(fn).lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return compiled(*args)


def init_params(model: Model, seed: int, dtype):
    """The model's parameters drawn from `seed`."""
    return run_once(lambda key: model.init(key, dtype=dtype), jax.random.PRNGKey(seed))


def initial_state(model: Model, optimizer, seed: int, dtype) -> TrainState:
    """Parameters drawn from `seed`, the optimizer's and the layers' initial state, step 0."""
    def init(key):
        params = model.init(key, dtype=dtype)
        return TrainState(params, optimizer.init(params), model.init_state(dtype),
                          jnp.zeros((), jnp.int32))

    return run_once(init, jax.random.PRNGKey(seed))


def steps_per_epoch(exp: Experiment) -> int:
    batch_size, n = exp.cfg.data.batch_size, len(exp.train.labels)
    steps = data.num_batches(n, batch_size, True)
    if steps == 0:
        raise RunError(f"data.batch_size={batch_size} is larger than the {n} training images")
    return steps


def parameter_count(params) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
