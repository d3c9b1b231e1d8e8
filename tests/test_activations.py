"""Hand-derived activation rules against jax.grad of their plain twins."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gradcheck import assert_matches_reference, random_inputs, relative_error
from jaxbp.testing import check_rule
from jaxbp.layers import activations
from jaxbp.reference import activations as reference

F64, F32 = jnp.float64, jnp.float32

# name -> (hand layer, reference twin, the custom_vjp object carrying the hand rule)
CASES = {
    "sigmoid": (activations.sigmoid, reference.sigmoid, activations._sigmoid),
    "tanh": (activations.tanh, reference.tanh, activations._tanh),
    "relu": (activations.relu, reference.relu, activations._relu),
    "leaky_relu": (activations.leaky_relu, reference.leaky_relu, activations._leaky_relu(0.01)),
    "softmax": (activations.softmax, reference.softmax, activations._softmax),
}
SMOOTH = ["sigmoid", "tanh", "softmax"]
# Every activation sees ranks 1 to 4 and a size-1 array across the two dtypes. The
# other tests reuse these shapes: each new output shape costs the comparison a compile.
SHAPES = {F64: [(5,), (2, 3, 4)], F32: [(1, 1), (1, 2, 3, 2)]}
GRID = [(name, shape, dtype) for name in CASES for dtype in SHAPES for shape in SHAPES[dtype]]


def _normal(seed, shape, dtype):
    return 3 * random_inputs(seed, [shape], dtype)[0]


def _away_from_zero(x):
    """Keeps finite differences of the kinked activations off the kink."""
    return jnp.sign(x) * (jnp.abs(x) + 0.1)


@pytest.mark.parametrize("name,shape,dtype", GRID)
def test_matches_reference(name, shape, dtype):
    layer, ref, _ = CASES[name]
    assert_matches_reference(layer, ref, [_normal(len(shape), shape, dtype)], [0])


@pytest.mark.parametrize("slope,dtype", [(0.0, F64), (-0.5, F64), (2, F32)])
def test_leaky_relu_slopes(slope, dtype):
    x = _normal(7, SHAPES[dtype][1], dtype)
    layer = functools.partial(activations.leaky_relu, negative_slope=slope)
    assert_matches_reference(layer, functools.partial(reference.leaky_relu, negative_slope=slope),
                             [x], [0])


@pytest.mark.parametrize("dtype", [F64, F32])
def test_sigmoid_large_magnitude(dtype):
    x = jnp.array([-1e4, -100.0, 0.0, 30.0, 1000.0], dtype)
    s = np.asarray(activations.sigmoid(x))
    assert np.all(np.isfinite(s)) and s[0] == 0 and s[-1] == 1 and s[2] == 0.5
    # The comparison also fails on NaN gradients, as NaN <= tolerance is false.
    assert_matches_reference(activations.sigmoid, reference.sigmoid, [x], [0])


@pytest.mark.parametrize("dtype", [F64, F32])
def test_softmax_large_magnitude(dtype):
    x = jnp.array([[1000.0, 999.0, -1000.0], [-1000.0, -1001.0, -1002.0], [1e4, 1e4, 0.0]], dtype)
    s = np.asarray(activations.softmax(x))
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(np.sum(s, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(s[2], [0.5, 0.5, 0.0], rtol=1e-6)
    assert_matches_reference(activations.softmax, reference.softmax, [x], [0])


def test_kink_derivatives_at_zero():
    """At x == 0 relu's derivative is 0 (as jax.nn.relu) and leaky relu's is the slope."""
    x = jnp.array([-1.0, 0.0, 2.0, -0.0], F32)

    def grad_of(fn):
        return np.asarray(jax.grad(lambda v: jnp.sum(fn(v)))(x))

    np.testing.assert_array_equal(grad_of(activations.relu), [0, 0, 1, 0])
    np.testing.assert_array_equal(grad_of(activations.relu), grad_of(reference.relu))
    np.testing.assert_array_equal(grad_of(activations.relu), grad_of(jax.nn.relu))
    leaky = functools.partial(activations.leaky_relu, negative_slope=0.25)
    np.testing.assert_array_equal(grad_of(leaky), [0.25, 0.25, 1, 0.25])
    np.testing.assert_array_equal(
        grad_of(leaky), grad_of(functools.partial(reference.leaky_relu, negative_slope=0.25)))


@pytest.mark.parametrize("name", SMOOTH)
def test_finite_differences_smooth(name):
    layer, _, _ = CASES[name]
    x = _normal(3, (2, 3, 4), F64)
    check_grads(layer, (x,), order=2, modes=["rev"])  # checks order 1 on the way


@pytest.mark.parametrize("name", ["relu", "leaky_relu"])
def test_finite_differences_kinked(name):
    layer, _, _ = CASES[name]
    x = _normal(4, (2, 3, 4), F64)
    check_grads(layer, (_away_from_zero(x),), order=1, modes=["rev"])


def test_softmax_diagonal_jacobian_of_seed_001_is_wrong():
    """D_sigma' = diag(s(1 - s)) of seed 001 (the blog post on a conv net with a softmax
    output) is not softmax's derivative (DERIVATIONS.md §5)."""
    diagonal = activations._saving_output(reference.softmax, lambda s, g: g * s * (1 - s))
    x = _normal(5, (2, 3, 4), F64)
    with pytest.raises(AssertionError, match="gradient"):
        assert_matches_reference(diagonal, reference.softmax, [x], [0])
    with pytest.raises(AssertionError):
        check_grads(diagonal, (x,), order=1, modes=["rev"])
    cotangent = jnp.zeros((2, 3, 4), F64).at[..., 0].set(1.0)
    wrong = jax.vjp(diagonal, x)[1](cotangent)[0]
    right = jax.vjp(reference.softmax, x)[1](cotangent)[0]
    assert relative_error(wrong, right) > 0.1
    assert_matches_reference(activations.softmax, reference.softmax, [x], [0])
    check_grads(activations.softmax, (x,), order=1, modes=["rev"])


def test_softmax_gradient_explicit():
    """s = (1/4, 1/4, 1/2), g = e_3: dx = s * (g - <g, s>) = (-1/8, -1/8, 1/4)."""
    x = jnp.log(jnp.array([1.0, 1.0, 2.0], F64))
    g = jnp.array([0.0, 0.0, 1.0], F64)
    dx = jax.vjp(activations.softmax, x)[1](g)[0]
    np.testing.assert_allclose(dx, [-0.125, -0.125, 0.25], rtol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_hand_rule_runs(name, monkeypatch):
    layer, ref, rule = CASES[name]
    x = _normal(6, (5,), F64)
    assert "custom_vjp_call" in str(jax.make_jaxpr(layer)(x))
    original = rule.bwd
    monkeypatch.setattr(rule, "bwd", lambda *a: tuple(1.5 * t for t in original(*a)))
    with pytest.raises(AssertionError, match="gradient"):
        assert_matches_reference(layer, ref, [x], [0])


@pytest.mark.parametrize("name", list(CASES))
def test_saved_residuals(name):
    layer, _, rule = CASES[name]
    x = _normal(8, (1, 2, 3, 2), F32)
    _, saved = rule.fwd(x)
    if name in ("relu", "leaky_relu"):
        assert saved.dtype == jnp.bool_ and saved.shape == x.shape
    else:
        np.testing.assert_array_equal(saved, layer(x))


@pytest.mark.parametrize("name", list(CASES))
def test_full_check_rule_jit_vmap_grad_of_grad(name):
    """`check_rule` in full: finite differences, grad of grad, jit and vmap."""
    layer, ref, _ = CASES[name]
    report = check_rule(layer, ref, _normal(9, (2, 3, 4), F64))
    assert report.jit_error is not None and report.vmap_error is not None


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bad", [jnp.arange(6).reshape(2, 3), [[0.5, 1.0]], 0.5])
def test_rejects_non_float_arrays(name, bad):
    layer, ref, _ = CASES[name]
    for fn in (layer, ref):
        with pytest.raises(ValueError, match=f"^{name}: x must"):
            fn(bad)


def test_softmax_rejects_scalar():
    with pytest.raises(ValueError, match=r"softmax: x must have at least 1 axes, got shape \(\)"):
        activations.softmax(jnp.array(1.0, F64))


@pytest.mark.parametrize("slope", ["0.1", True, jnp.array(0.1, F64), None])
def test_leaky_relu_rejects_non_static_slope(slope):
    x = _normal(1, (5,), F64)
    with pytest.raises(ValueError, match="leaky_relu: negative_slope must be a Python number"):
        activations.leaky_relu(x, slope)
