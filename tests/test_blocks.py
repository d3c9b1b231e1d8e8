"""Global average pooling, nearest upsampling and layer norm: hand rules against their twins
(`jaxbp.testing.check_rule`), the equations on small numbers, bad input, and the registry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import layers, nn, reference
from jaxbp.app.config import validate_model
from jaxbp.app.model import build_model
from jaxbp.registry import HAND, REFERENCE
from jaxbp.testing import CheckOptions, check_rule, relative_error

F64 = jnp.float64


@pytest.mark.parametrize("shape", [(2, 5, 3), (2, 4, 5, 3), (1, 3, 2, 4, 2)],
                         ids=["1d", "2d", "3d"])
def test_global_avg_pool_rule(shape):
    check_rule(layers.global_avg_pool, reference.global_avg_pool, shape)


@pytest.mark.parametrize("shape, factor", [((2, 5, 3), 3), ((2, 3, 4, 2), (2, 3)),
                                           ((1, 2, 3, 2, 2), (1, 2, 2)), ((2, 3, 3, 1), 1)],
                         ids=["1d", "2d", "3d", "factor 1"])
def test_upsample_rule(shape, factor):
    check_rule(layers.upsample, reference.upsample, shape, factor=factor)


@pytest.mark.parametrize("shape, eps", [((4, 6), 1e-5), ((2, 3, 5, 4), 1e-5), ((3, 7), 0.5)])
def test_layer_norm_rule(shape, eps):
    c = shape[-1]
    check_rule(layers.layer_norm, reference.layer_norm, shape, (c,), (c,), eps=eps)


def test_layer_norm_rule_in_float32():
    check_rule(layers.layer_norm, reference.layer_norm, (8, 16), (16,), (16,),
               options=CheckOptions(dtype="float32"))


def test_upsample_backward_is_a_sum_pool():
    dy = jnp.arange(24.0, dtype=F64).reshape(1, 4, 6, 1)
    x = jnp.zeros((1, 2, 3, 1), F64)
    dx = jax.vjp(lambda v: layers.upsample(v, 2), x)[1](dy)[0]
    np.testing.assert_array_equal(dx[0, :, :, 0], [[0 + 1 + 6 + 7, 2 + 3 + 8 + 9, 4 + 5 + 10 + 11],
                                                   [12 + 13 + 18 + 19, 14 + 15 + 20 + 21,
                                                    16 + 17 + 22 + 23]])


def test_global_avg_pool_gives_each_position_an_equal_share():
    x = jnp.ones((2, 2, 5, 3), F64)
    dy = jnp.asarray([[1.0, 2.0, -4.0], [0.5, 0.0, 10.0]], F64)
    dx = jax.vjp(layers.global_avg_pool, x)[1](dy)[0]
    np.testing.assert_array_equal(dx, np.broadcast_to(np.asarray(dy)[:, None, None, :] / 10,
                                                      (2, 2, 5, 3)))


def test_layer_norm_delta_has_three_terms():
    """(g - mean g - x̂ mean(g x̂)) / σ by hand, on one row."""
    x = jnp.asarray([[1.0, 2.0, 4.0, -3.0]], F64)
    scale, offset = jnp.asarray([1.0, 2.0, 0.5, -1.0], F64), jnp.zeros(4, F64)
    dy = jnp.asarray([[0.3, -1.0, 2.0, 0.7]], F64)
    mean, var = np.mean(x), np.var(x)
    sigma = np.sqrt(var + 1e-5)
    x_hat = (np.asarray(x) - mean) / sigma
    g = np.asarray(dy) * np.asarray(scale)
    expected = (g - g.mean() - x_hat * (g * x_hat).mean()) / sigma
    dx = jax.vjp(lambda v: layers.layer_norm(v, scale, offset), x)[1](dy)[0]
    assert relative_error(dx, expected) <= 1e-12


@pytest.mark.parametrize("call, message", [
    (lambda: layers.upsample(jnp.ones((1, 4, 1)), 0), "upsample: factor must be >= 1"),
    (lambda: layers.upsample(jnp.ones((4, 1)), 2), "upsample: expected input of shape"),
    (lambda: layers.global_avg_pool(jnp.ones((3, 4))), "global_avg_pool: expected input"),
    (lambda: layers.layer_norm(jnp.ones((2, 3)), jnp.ones(4), jnp.zeros(3)),
     r"layer_norm: expected scale of shape \(3,\)"),
    (lambda: layers.layer_norm(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros(3), eps=-1.0),
     "layer_norm: eps must be a number > 0"),
])
def test_bad_input_is_one_clear_line(call, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        call()


def test_blocks_work_from_a_config():
    model = build_model(validate_model({"layers": [
        {"type": "conv", "features": 4, "kernel": 3}, {"type": "upsample", "factor": 2},
        {"type": "global_avg_pool"}, {"type": "dense", "features": 6},
        {"type": "layer_norm"}, {"type": "dense", "features": 10}]},
        "softmax_cross_entropy"), "softmax_cross_entropy", (6, 6, 1), 10)
    assert [r.output_shape for r in model.summary[:3]] == [(4, 4, 4), (8, 8, 4), (4,)]
    params = model.init(jax.random.PRNGKey(0), dtype=F64)
    assert params[4]["scale"].tolist() == [1.0] * 6 and params[4]["offset"].tolist() == [0.0] * 6
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6, 6, 1)))
    labels = jnp.arange(3, dtype=jnp.int32)
    grads = [jax.grad(lambda p: model.loss(p, x, labels, ops)[0])(params)
             for ops in (HAND, REFERENCE)]
    for got, want in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        assert relative_error(got, want) <= 1e-10
    assert nn.layer("upsample", 3).init(jax.random.PRNGKey(0), (2, 2, 1))[0] == (6, 6, 1)
