"""Hand-derived loss rules against jax.grad of their plain twins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gradcheck import assert_matches_reference, random_inputs
from jaxbp.testing import CheckOptions, check_rule
from jaxbp import losses
from jaxbp.layers.activations import sigmoid
from jaxbp.layers.dense import dense
from jaxbp.reference import losses as reference

F64, F32 = jnp.float64, jnp.float32


def _arrays(seed, shape, dtype, count=2):
    return random_inputs(seed, [shape] * count, dtype)


def _labels(seed, batch, classes):
    return jnp.asarray(np.random.default_rng(seed).integers(0, classes, batch), jnp.int32)


def _cross_entropy_of(loss, labels):
    """Binds the integer labels, so the comparison differentiates the logits only."""
    return lambda logits: loss(logits, labels)


@pytest.mark.parametrize("shape,dtype",
                         [((1,), F64), ((2, 3, 2), F64), ((1, 1), F32), ((3, 4), F32)])
def test_quadratic_matches_reference(shape, dtype):
    args = _arrays(len(shape), shape, dtype)
    assert_matches_reference(losses.quadratic, reference.quadratic, args, [0, 1])


@pytest.mark.parametrize("batch,classes,dtype",
                         [(1, 1, F64), (4, 5, F64), (1, 3, F32), (3, 2, F32)])
def test_cross_entropy_matches_reference(batch, classes, dtype):
    (logits,) = _arrays(batch * classes, (batch, classes), dtype, count=1)
    labels = _labels(batch, batch, classes)
    assert_matches_reference(_cross_entropy_of(losses.softmax_cross_entropy, labels),
                             _cross_entropy_of(reference.softmax_cross_entropy, labels),
                             [3 * logits], [0])


@pytest.mark.parametrize("dtype", [F64, F32])
def test_cross_entropy_large_logits(dtype):
    logits = jnp.array([[1000.0, -1000.0, 0.0], [-1e4, -1e4 - 1.0, -1e4 - 2.0]], dtype)
    labels = jnp.array([1, 0], jnp.int32)
    loss = float(losses.softmax_cross_entropy(logits, labels))
    # Row 1 puts label 1 at 2000 below the max; row 2 is log-sum-exp of (0, -1, -2).
    np.testing.assert_allclose(loss, (2000.0 + np.log1p(np.exp(-1.0) + np.exp(-2.0))) / 2,
                               rtol=1e-6)
    assert_matches_reference(_cross_entropy_of(losses.softmax_cross_entropy, labels),
                             _cross_entropy_of(reference.softmax_cross_entropy, labels),
                             [logits], [0])


def test_cross_entropy_fused_delta_explicit():
    """softmax rows (1/4, 1/4, 1/2) and (3/5, 1/5, 1/5), labels (2, 1): delta = (s - onehot) / 2."""
    logits = jnp.log(jnp.array([[1.0, 1.0, 2.0], [3.0, 1.0, 1.0]], F64))
    labels = jnp.array([2, 1], jnp.int32)
    loss, vjp = jax.vjp(losses.softmax_cross_entropy, logits, labels)
    np.testing.assert_allclose(loss, -(np.log(0.5) + np.log(0.2)) / 2, rtol=1e-14)
    d_logits, d_labels = vjp(jnp.array(1.0, F64))
    np.testing.assert_allclose(d_logits, [[0.125, 0.125, -0.25], [0.3, -0.4, 0.1]], rtol=1e-14)
    assert d_labels.dtype == jax.dtypes.float0 and d_labels.shape == (2,)
    ref_labels = jax.vjp(reference.softmax_cross_entropy, logits, labels)[1](jnp.array(1.0, F64))[1]
    assert ref_labels.dtype == jax.dtypes.float0


def test_quadratic_delta_explicit():
    """diff (a - y) = [[1, 0], [2, 4]], batch 2: loss = (1 + 4 + 16) / 4, d pred = diff / 2."""
    pred = jnp.array([[1.0, 2.0], [3.0, 5.0]], F64)
    target = jnp.array([[0.0, 2.0], [1.0, 1.0]], F64)
    loss, vjp = jax.vjp(losses.quadratic, pred, target)
    assert float(loss) == 5.25
    d_pred, d_target = vjp(jnp.array(2.0, F64))
    np.testing.assert_array_equal(d_pred, [[1.0, 0.0], [2.0, 4.0]])
    np.testing.assert_array_equal(d_target, [[-1.0, 0.0], [-2.0, -4.0]])


def test_seed_002_output_delta():
    """quadratic(sigmoid(dense)) gives seed 002's delta^L = (a - y) * sigma'(z), over the batch
    (DERIVATIONS.md §6; seed 002, the Q&A tracing a small CNN's deltas, eq. 1).

    z = (0, ln 3), so a = (1/2, 3/4) and sigma'(z) = (1/4, 3/16); with y = (1, 0) the
    per-example deltas are -1/8 and 9/64, each divided by the batch of 2.
    """
    x = jnp.array([[1.0, -1.0], [np.log(3.0), 0.0]], F64)
    w = jnp.array([[1.0], [1.0]], F64)
    b = jnp.array([0.0], F64)
    y = jnp.array([[1.0], [0.0]], F64)

    def cost(w, b):
        return losses.quadratic(sigmoid(dense(x, w, b)), y)

    np.testing.assert_allclose(cost(w, b), (0.25 + 0.5625) / 4, rtol=1e-14)
    delta = np.array([-1 / 8, 9 / 64]) / 2
    d_w, d_b = jax.grad(cost, argnums=(0, 1))(w, b)
    np.testing.assert_allclose(d_b, [delta.sum()], rtol=1e-14)
    np.testing.assert_allclose(d_w, [[delta[0] + np.log(3.0) * delta[1]], [-delta[0]]], rtol=1e-14)


def test_out_of_range_label_gives_nan():
    logits = jnp.zeros((2, 3), F64)
    assert np.isnan(float(losses.softmax_cross_entropy(logits, jnp.array([0, 3], jnp.int32))))


def test_finite_differences():
    pred, target = _arrays(0, (3, 4), F64)
    check_grads(losses.quadratic, (pred, target), order=2, modes=["rev"])
    check_grads(_cross_entropy_of(losses.softmax_cross_entropy, _labels(1, 3, 4)), (pred,),
                order=2, modes=["rev"])


RULES = {
    "quadratic": (losses.quadratic, reference.quadratic, losses._quadratic, [0, 1]),
    "softmax_cross_entropy": (
        _cross_entropy_of(losses.softmax_cross_entropy, _labels(2, 3, 4)),
        _cross_entropy_of(reference.softmax_cross_entropy, _labels(2, 3, 4)),
        losses._softmax_cross_entropy, [0]),
}


@pytest.mark.parametrize("name", list(RULES))
def test_hand_rule_runs(name, monkeypatch):
    loss, ref, rule, argnums = RULES[name]
    args = _arrays(3, (3, 4), F64, count=len(argnums))
    assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(*args))
    original = rule.bwd

    def broken(*a):
        return tuple(None if t is None else 1.5 * t for t in original(*a))

    monkeypatch.setattr(rule, "bwd", broken)
    with pytest.raises(AssertionError, match="gradient"):
        assert_matches_reference(loss, ref, args, argnums)


def test_saved_residuals():
    pred, target = _arrays(4, (3, 4), F32)
    _, saved = losses._quadratic.fwd(pred, target)
    np.testing.assert_array_equal(saved, pred - target)
    labels = _labels(4, 3, 4)
    _, (probs, saved_labels) = losses._softmax_cross_entropy.fwd(pred, labels)
    assert saved_labels is labels
    np.testing.assert_allclose(probs, jax.nn.softmax(pred), rtol=1e-6)


@pytest.mark.parametrize("name", list(RULES))
def test_full_check_rule_jit_vmap_grad_of_grad(name):
    """`check_rule` in full: finite differences, grad of grad, jit and vmap."""
    loss, ref, _, argnums = RULES[name]
    check_rule(loss, ref, *_arrays(5, (3, 4), F64, count=len(argnums)),
               options=CheckOptions(argnums=tuple(argnums)))


def test_cross_entropy_vmap_over_labels():
    logits = jnp.stack(_arrays(6, (3, 4), F64))
    labels = jnp.stack([_labels(6, 3, 4), _labels(7, 3, 4)])

    def batched(fn):
        return lambda z: jax.vmap(fn)(z, labels)

    assert_matches_reference(batched(losses.softmax_cross_entropy),
                             batched(reference.softmax_cross_entropy), [logits], [0])


BAD_QUADRATIC = [
    ((2, 3), F64, (2, 4), F64, r"pred and target must have the same shape, got pred \(2, 3\) "
                               r"and target \(2, 4\)"),
    ((2, 3), F64, (3,), F64, r"pred and target must have the same shape, got pred \(2, 3\) "
                             r"and target \(3,\)"),
    ((2, 3), F32, (2, 3), F64, "pred and target must share one dtype, got float32 and float64"),
    ((), F64, (), F64, r"pred must have at least 1 axes, got shape \(\)"),
    ((0, 3), F64, (0, 3), F64, r"the batch is empty \(shape \(0, 3\)\)"),
    ((2, 3), jnp.int32, (2, 3), jnp.int32, "pred must have a floating-point dtype, got int32"),
]


@pytest.mark.parametrize("pred_shape,pred_dtype,target_shape,target_dtype,message", BAD_QUADRATIC)
def test_quadratic_rejects(pred_shape, pred_dtype, target_shape, target_dtype, message):
    pred, target = jnp.zeros(pred_shape, pred_dtype), jnp.zeros(target_shape, target_dtype)
    for fn in (losses.quadratic, reference.quadratic):
        with pytest.raises(ValueError, match="^quadratic: " + message):
            fn(pred, target)


BAD_CROSS_ENTROPY = [
    ((3,), F64, (3,), jnp.int32,
     r"expected non-empty logits of shape \(batch, classes\), got \(3,\)"),
    ((2, 3, 4), F64, (2,), jnp.int32, r"expected non-empty logits .* got \(2, 3, 4\)"),
    ((2, 0), F64, (2,), jnp.int32, r"expected non-empty logits .* got \(2, 0\)"),
    ((2, 3), F64, (2,), F64, "labels must be an integer array of class indices, got float64"),
    ((2, 3), F64, (2, 1), jnp.int32,
     r"expected labels of shape \(2,\) for logits \(2, 3\), got \(2, 1\)"),
    ((2, 3), F64, (3,), jnp.int32,
     r"expected labels of shape \(2,\) for logits \(2, 3\), got \(3,\)"),
    ((2, 3), jnp.int32, (2,), jnp.int32, "logits must have a floating-point dtype, got int32"),
]


@pytest.mark.parametrize("logits_shape,logits_dtype,labels_shape,labels_dtype,message",
                         BAD_CROSS_ENTROPY)
def test_cross_entropy_rejects(logits_shape, logits_dtype, labels_shape, labels_dtype, message):
    logits, labels = jnp.zeros(logits_shape, logits_dtype), jnp.zeros(labels_shape, labels_dtype)
    for fn in (losses.softmax_cross_entropy, reference.softmax_cross_entropy):
        with pytest.raises(ValueError, match="^softmax_cross_entropy: " + message):
            fn(logits, labels)


def test_cross_entropy_rejects_label_list():
    with pytest.raises(ValueError, match="softmax_cross_entropy: labels must be an integer array"):
        losses.softmax_cross_entropy(jnp.zeros((2, 3), F64), [0, 1])
