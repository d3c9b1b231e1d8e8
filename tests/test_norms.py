"""The training view's norms (`jaxbp.app.norms`): what the train step logs for each layer
equals √B·‖∂L/∂Y‖ and ‖∂L/∂θ‖ worked out independently, by `jax.grad` through the plain
twins of a network cut at that layer; measuring them leaves training unchanged; and
`nn.probe` reports what it says."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbp import nn, reference
from jaxbp.app import norms
from jaxbp.app.config import validate_model
from jaxbp.app.experiment import initial_state
from jaxbp.app.model import build_model
from jaxbp.app.steps import TrainSteps, make_train_step, zero_totals
from jaxbp.registry import REFERENCE

F64 = jnp.float64
LOSS = "quadratic"
# Sigmoids, a residual block (its parameters nested), layers without parameters.
CONFIG = {"layers": [
    {"type": "conv", "features": 3, "kernel": 3},
    {"type": "sigmoid"},
    {"type": "residual", "layers": [{"type": "conv", "features": 3, "kernel": 3,
                                     "padding": "SAME"}, {"type": "relu"}]},
    {"type": "max_pool", "window": 2},
    {"type": "flatten"},
    {"type": "dense", "features": 10},
    {"type": "sigmoid"},
]}
# The same network built by hand, layer by layer, so it can be cut anywhere.
LAYERS = [nn.Conv(3, 3), nn.Sigmoid(), nn.residual(nn.serial(nn.Conv(3, 3, padding="SAME"),
                                                              nn.Relu())),
          nn.MaxPool(2), nn.Flatten(), nn.Dense(10), nn.Sigmoid()]
BATCH = 4


@pytest.fixture(scope="module")
def setup():
    model = build_model(validate_model(CONFIG, LOSS), LOSS, (8, 8, 1), 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, 8, 8, 1)))
    labels = jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)
    return model, x, labels


def expected_norms(params, x, labels) -> tuple[dict, dict]:
    """{path: √B·‖∂L/∂Y‖} and {path: ‖∂L/∂θ‖} by jax.grad through the twins."""
    targets = jax.nn.one_hot(labels, 10, dtype=F64)

    def head_loss(i, params):  # the loss as a function of layer i's output (-1: the input)
        return lambda y: reference.quadratic(
            nn.serial(*LAYERS[i + 1:]).apply(params[i + 1:], y, REFERENCE), targets)

    deltas = {}
    for i in range(len(LAYERS)):
        y = nn.serial(*LAYERS[:i + 1]).apply(params[:i + 1], x, REFERENCE)
        deltas[str(i)] = np.sqrt(BATCH) * np.linalg.norm(jax.grad(head_loss(i, params))(y))
    param_grads = jax.grad(lambda p: head_loss(-1, p)(x))(params)
    grad_norms = {str(i): np.sqrt(sum(np.sum(np.square(leaf))
                                      for leaf in jax.tree_util.tree_leaves(g)))
                  for i, g in enumerate(param_grads) if jax.tree_util.tree_leaves(g)}
    return deltas, grad_norms


def one_step(model, x, labels, with_norms: bool):
    """(state, totals) after one train step from the seed-0 parameters."""
    optimizer = optax.sgd(0.1)
    state = initial_state(model, optimizer, 0, F64)
    step = make_train_step(model, optimizer, F64, with_norms=with_norms)
    return step(state, zero_totals(F64, model if with_norms else None), x, labels)


def test_logged_norms_are_the_deltas_and_gradients_of_the_twins(setup):
    model, x, labels = setup
    params = initial_state(model, optax.sgd(0.1), 0, F64).params
    want_deltas, want_grads = expected_norms(params, x, labels)
    _, totals = one_step(model, x, labels, with_norms=True)
    got = norms.epoch_norms(model, totals.delta_norms, totals.grad_norms, steps=1)
    assert list(got) == ["delta_norms", "grad_norms"]
    assert list(got["delta_norms"]) == [str(i) for i in range(7)]
    assert list(got["grad_norms"]) == ["0", "2", "5"], "the layers holding parameters"
    for key, want in (("delta_norms", want_deltas), ("grad_norms", want_grads)):
        for path, value in got[key].items():
            assert value == pytest.approx(want[path], rel=1e-10), (key, path)
    assert got["delta_norms"]["0"] < got["delta_norms"]["1"], "a sigmoid shrinks its delta"


def test_the_norms_leave_training_unchanged(setup):
    model, x, labels = setup
    (with_, totals), (without, plain) = (one_step(model, x, labels, flag)
                                         for flag in (True, False))
    for a, b in zip(jax.tree_util.tree_leaves(with_), jax.tree_util.tree_leaves(without)):
        np.testing.assert_array_equal(a, b)
    assert float(totals.loss) == float(plain.loss) and plain.delta_norms == ()


def test_probe_reports_each_examples_squared_delta_norm():
    y = jnp.arange(24.0, dtype=F64).reshape(4, 3, 2)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3, 2)))

    def loss(y, s):
        return jnp.sum(weights * nn.probe(y, s))

    delta, squares = jax.grad(loss, argnums=(0, 1))(y, jnp.zeros((4,), F64))
    np.testing.assert_array_equal(delta, weights)
    np.testing.assert_allclose(squares, np.sum(np.square(weights), axis=(1, 2)), rtol=1e-14)
    np.testing.assert_array_equal(nn.probe(y, jnp.zeros((4,), F64)), y)
    with pytest.raises(ValueError, match=r"probe: s must have shape \(batch,\) = \(4,\)"):
        nn.probe(y, jnp.zeros((2,), F64))


def test_an_epoch_measures_on_every_EVERY_th_step():
    steps = TrainSteps(plain="plain", measuring="measuring")
    every = norms.EVERY
    assert [steps.at(i) for i in (0, 1, every - 1, every, 2 * every)] == [
        "measuring", "plain", "plain", "measuring", "measuring"]
    assert [norms.measured_steps(n) for n in (1, every, every + 1)] == [1, 1, 2]
