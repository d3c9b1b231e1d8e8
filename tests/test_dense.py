"""Hand-derived dense and flatten rules against jax.grad of their plain twins."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gradcheck import assert_matches_reference, random_inputs
from jaxbp.testing import check_rule
from jaxbp.reference.dense import dense as reference_dense
from jaxbp.reference.dense import flatten as reference_flatten

# The package attribute `jaxbp.layers.dense` is the function; the rules live in the module.
hand = importlib.import_module("jaxbp.layers.dense")

F64, F32 = jnp.float64, jnp.float32

# Half of the product of batch x sizes x bias x dtype, the dtype set by parity: any two
# factors still meet in all four combinations of their levels.
DENSE_GRID = [(batch, n_in, n_out, bias, F64 if (batch == 1) ^ (n_in == 1) ^ bias else F32)
              for batch in (1, 3)
              for n_in, n_out in ((1, 1), (4, 3))
              for bias in (True, False)]
FLATTEN_GRID = [((1, 1), F64), ((2, 3, 4), F64), ((2, 2, 3, 2, 1), F64), ((2, 5), F32),
                ((1, 4, 4, 3), F32)]


def _dense_args(seed, batch, n_in, n_out, bias, dtype):
    shapes = [(batch, n_in), (n_in, n_out)] + ([(n_out,)] if bias else [])
    return random_inputs(seed, shapes, dtype)


@pytest.mark.parametrize("batch,n_in,n_out,bias,dtype", DENSE_GRID)
def test_dense_matches_reference(batch, n_in, n_out, bias, dtype):
    args = _dense_args(batch + n_in, batch, n_in, n_out, bias, dtype)
    assert_matches_reference(hand.dense, reference_dense, args, range(len(args)))


@pytest.mark.parametrize("shape,dtype", FLATTEN_GRID)
def test_flatten_matches_reference(shape, dtype):
    (x,) = random_inputs(len(shape), [shape], dtype)
    assert_matches_reference(hand.flatten, reference_flatten, [x], [0])


def test_dense_explicit_numbers():
    """delta_x = delta W^T, dW = x^T delta, db = sum over the batch of delta."""
    x = jnp.array([[1.0, 2.0], [0.0, -1.0]], F64)
    w = jnp.array([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]], F64)
    b = jnp.array([0.5, 0.0, -0.5], F64)
    delta = jnp.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]], F64)
    y, vjp = jax.vjp(hand.dense, x, w, b)
    np.testing.assert_array_equal(y, [[5.5, 2.0, -1.5], [-1.5, -1.0, -0.5]])
    dx, dw, db = vjp(delta)
    np.testing.assert_array_equal(dx, [[-2.0, 4.0], [-2.0, -2.0]])
    np.testing.assert_array_equal(dw, [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    np.testing.assert_array_equal(db, [0.0, 2.0, 4.0])


def test_flatten_seed_002_shape():
    """The 432-long delta of seed 002 (the Q&A tracing a small CNN's deltas) goes back to
    its 12x12x3 (channels-last) map (DERIVATIONS.md §7)."""
    x = jnp.zeros((1, 12, 12, 3), F32)
    y, vjp = jax.vjp(hand.flatten, x)
    assert y.shape == (1, 432)
    delta = jnp.arange(432, dtype=F32).reshape(1, 432)
    expected = np.arange(432, dtype=np.float32).reshape(1, 12, 12, 3)
    np.testing.assert_array_equal(vjp(delta)[0], expected)


@pytest.mark.parametrize("bias", [True, False])
def test_backward_is_two_plain_dot_generals(bias):
    """x^T delta and delta W^T contract in place: no transpose is materialised."""
    args = _dense_args(0, 3, 4, 2, bias, F64)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(jnp.sin(hand.dense(*a))),
                                    argnums=tuple(range(len(args)))))(*args)
    primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert "transpose" not in primitives
    assert primitives.count("dot_general") == 3


@pytest.mark.parametrize("bias", [True, False])
def test_dense_finite_differences(bias):
    args = _dense_args(1, 2, 3, 2, bias, F64)
    check_grads(hand.dense, tuple(args), order=2, modes=["rev"])


def test_flatten_finite_differences():
    (x,) = random_inputs(2, [(2, 2, 3)], F64)
    check_grads(hand.flatten, (x,), order=2, modes=["rev"])


RULES = [
    ("dense", hand._affine, lambda: _dense_args(3, 2, 3, 2, True, F64)),
    ("dense", hand._linear, lambda: _dense_args(3, 2, 3, 2, False, F64)),
    ("flatten", hand._flatten, lambda: random_inputs(3, [(2, 3, 2)], F64)),
]


@pytest.mark.parametrize("name,rule,make_args", RULES)
def test_hand_rule_runs(name, rule, make_args, monkeypatch):
    layer, ref = {"dense": (hand.dense, reference_dense),
                  "flatten": (hand.flatten, reference_flatten)}[name]
    args = make_args()
    assert "custom_vjp_call" in str(jax.make_jaxpr(layer)(*args))
    original = rule.bwd
    monkeypatch.setattr(rule, "bwd", lambda *a: tuple(1.5 * t for t in original(*a)))
    with pytest.raises(AssertionError, match="gradient"):
        assert_matches_reference(layer, ref, args, range(len(args)))


def test_saved_residuals():
    x, w, b = _dense_args(4, 2, 3, 2, True, F32)
    _, saved = hand._affine.fwd(x, w, b)
    assert saved[0] is x and saved[1] is w and len(saved) == 2
    _, saved = hand._flatten.fwd(x, x.shape)
    assert saved is None


@pytest.mark.parametrize("bias", [True, False])
def test_dense_full_check_rule_jit_vmap_grad_of_grad(bias):
    """`check_rule` in full: finite differences, grad of grad (w.r.t. every argument), jit
    and vmap."""
    report = check_rule(hand.dense, reference_dense, *_dense_args(5, 2, 3, 2, bias, F64))
    assert len(report.second_order_errors) == (3 if bias else 2)


def test_flatten_full_check_rule_jit_vmap_grad_of_grad():
    check_rule(hand.flatten, reference_flatten, *random_inputs(6, [(3, 2, 2, 3)], F64))


BAD_DENSE = [
    ((3,), (3, 2), None, F64, r"expected x of shape \(batch, in\) and w of shape \(in, out\), "
                              r"got x \(3,\) and w \(3, 2\)"),
    ((2, 3), (3, 2, 1), None, F64, r"expected .* got x \(2, 3\) and w \(3, 2, 1\)"),
    ((2, 3), (4, 2), None, F64, r"x has 3 features but w expects 4 \(x \(2, 3\), w \(4, 2\)\)"),
    ((2, 3), (3, 2), (3,), F64, r"expected b of shape \(2,\) for w \(3, 2\), got \(3,\)"),
    ((2, 3), (3, 2), (1, 2), F64, r"expected b of shape \(2,\) for w \(3, 2\), got \(1, 2\)"),
    ((2, 3), (3, 2), None, jnp.int32, r"x must have a floating-point dtype, got int32"),
]


@pytest.mark.parametrize("x_shape,w_shape,b_shape,dtype,message", BAD_DENSE)
def test_dense_rejects_bad_shapes(x_shape, w_shape, b_shape, dtype, message):
    x, w = jnp.ones(x_shape, dtype), jnp.ones(w_shape, dtype)
    b = None if b_shape is None else jnp.ones(b_shape, dtype)
    for fn in (hand.dense, reference_dense):
        with pytest.raises(ValueError, match="^dense: " + message):
            fn(x, w, b)


def test_dense_rejects_mixed_dtypes():
    x, w, b = jnp.ones((2, 3), F32), jnp.ones((3, 2), F64), jnp.ones((2,), F32)
    with pytest.raises(ValueError, match="^dense: x, w and b must share one dtype, got float32, "
                                         "float64"):
        hand.dense(x, w, b)


@pytest.mark.parametrize("bad", [jnp.array(1.0, F64), jnp.ones((2, 3), jnp.int32), [[1.0]]])
def test_flatten_rejects(bad):
    for fn in (hand.flatten, reference_flatten):
        with pytest.raises(ValueError, match="^flatten: x must"):
            fn(bad)
