"""Batch norm and dropout: hand rules against their twins (`jaxbp.testing.check_rule`), the
equations on small numbers, the running statistics, the dropout mask, bad input, and the
PyTorch twins."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import layers, reference, torch_twins
from jaxbp.reference.dropout import keep_mask
from jaxbp.reference.norm import affine, batch_axes, normalized, per_feature
from jaxbp.testing import CheckOptions, RuleMismatch, check_rule, relative_error

F64 = jnp.float64


def _values(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F64)


# ------------------------------------------------------------------ batch norm

# check_rule's vmap stacks two whole batches on a new leading axis, so each member is
# normalised with its own statistics and compared with the reference on that member alone:
# the check is meaningful, and fails if the rule's statistics leak across the mapped axis.
@pytest.mark.parametrize("shape, eps", [((6, 4), 1e-5), ((3, 5, 2), 1e-5), ((2, 3, 4, 3), 0.1),
                                        ((2, 2, 3, 2, 2), 1e-3)],
                         ids=["flat", "1d", "2d", "3d"])
def test_batch_norm_rule(shape, eps):
    c = shape[-1]
    report = check_rule(layers.batch_norm, reference.batch_norm, shape, (c,), (c,), eps=eps)
    assert report.residual_bytes == (np.prod(shape) + c) * 8   # x̂ and 1/σ per channel


def test_batch_norm_rule_in_float32():
    check_rule(layers.batch_norm, reference.batch_norm, (4, 3, 3, 8), (8,), (8,),
               options=CheckOptions(dtype="float32"))


def test_batch_norm_statistics_stay_within_a_vmapped_member():
    x, scale, offset = _values((2, 4, 3, 2)), _values(2, 1), _values(2, 2)
    mapped = jax.vmap(layers.batch_norm, in_axes=(0, None, None))(x, scale, offset)
    for m in range(2):
        assert relative_error(mapped[m], layers.batch_norm(x[m], scale, offset)) <= 1e-14
    pooled = layers.batch_norm(x.reshape(8, 3, 2), scale, offset).reshape(x.shape)
    assert relative_error(mapped, pooled) > 1e-3


def test_batch_norm_delta_has_three_terms():
    """(g - mean g - x̂ mean(g x̂)) / σ by hand, the means per channel over batch and positions."""
    x = np.asarray([[[1.0, -2.0], [2.0, 0.5]], [[4.0, 3.0], [-3.0, 1.0]],
                    [[0.0, 2.0], [1.5, -1.0]]])                       # (batch 3, positions 2, C 2)
    scale, offset = np.asarray([2.0, -0.5]), np.asarray([0.3, 1.0])
    dy = np.asarray([[[0.3, -1.0], [2.0, 0.7]], [[-0.4, 1.2], [0.1, 0.0]],
                     [[1.0, 0.5], [-2.0, 0.9]]])
    dx, dscale, doffset = jax.vjp(lambda *a: layers.batch_norm(*a, eps=1e-5),
                                  *map(jnp.asarray, (x, scale, offset)))[1](jnp.asarray(dy))
    for c in range(2):
        xc, dyc = x[..., c].ravel(), dy[..., c].ravel()               # m = 6 values
        sigma = np.sqrt(np.mean((xc - xc.mean()) ** 2) + 1e-5)        # biased variance
        x_hat = (xc - xc.mean()) / sigma
        g = dyc * scale[c]
        expected = (g - g.mean() - x_hat * (g * x_hat).mean()) / sigma
        assert relative_error(np.asarray(dx)[..., c].ravel(), expected) <= 1e-12
        assert relative_error(dscale[c], np.sum(dyc * x_hat)) <= 1e-12
        assert relative_error(doffset[c], np.sum(dyc)) <= 1e-12


def _batch_norm_without_projection(eps):
    """batch_norm with a rule that lost the x̂ mean(g x̂) term."""
    def fwd(x, scale, offset):
        x_hat, inverse_std = normalized(x, eps, batch_axes(x))
        return affine(x_hat, scale, offset), (x_hat, inverse_std, scale)

    def bwd(residuals, dy):
        x_hat, inverse_std, scale = residuals
        g, axes = dy * per_feature(scale, dy), batch_axes(dy)
        return ((g - jnp.mean(g, axis=axes, keepdims=True)) * inverse_std,
                jnp.sum(dy * x_hat, axis=axes), jnp.sum(dy, axis=axes))

    rule = jax.custom_vjp(lambda x, scale, offset: fwd(x, scale, offset)[0])
    rule.defvjp(fwd, bwd)
    return rule


def test_all_ones_cotangent_hides_the_last_two_terms():
    # δ = 1 makes g = scale constant along the batch axes: mean(g) cancels g, and
    # mean(g x̂) = scale mean(x̂) = 0. The true dx is 0, and so is a rule without the third term.
    x, scale, offset = _values((4, 3, 2)), _values(2, 1), _values(2, 2)
    broken = _batch_norm_without_projection(1e-5)
    ones = jnp.ones_like(x)
    right = jax.vjp(layers.batch_norm, x, scale, offset)[1](ones)[0]
    wrong = jax.vjp(broken, x, scale, offset)[1](ones)[0]
    first_term = per_feature(scale / jnp.sqrt(jnp.var(x, axis=(0, 1)) + 1e-5), x)   # g / σ
    assert np.max(np.abs(right)) <= 1e-14 * np.max(np.abs(first_term))
    assert np.max(np.abs(wrong - right)) <= 1e-14 * np.max(np.abs(first_term))
    with pytest.raises(RuleMismatch, match=r"gradient of argument 0 \(x\) differs"):
        check_rule(broken, reference.batch_norm, (4, 3, 2), (2,), (2,))


def test_batch_norm_update_on_numbers():
    x = np.asarray([[[1.0, -2.0], [2.0, 0.5]], [[4.0, 3.0], [-3.0, 1.0]]])   # n = 4 per channel
    mean, var = np.asarray([0.5, -1.0]), np.asarray([2.0, 0.25])
    for momentum in (0.9, 0.75):
        new_mean, new_var = reference.batch_norm_update(jnp.asarray(x), jnp.asarray(mean),
                                                        jnp.asarray(var), momentum=momentum)
        values = x.reshape(4, 2)
        np.testing.assert_allclose(new_mean, momentum * mean
                                   + (1 - momentum) * values.mean(axis=0), rtol=1e-14)
        np.testing.assert_allclose(new_var, momentum * var
                                   + (1 - momentum) * values.var(axis=0, ddof=1), rtol=1e-14)
    # Channel 0 by hand: mean 1, squared deviations 0 + 1 + 9 + 16 = 26, unbiased 26 / 3.
    new_mean, new_var = reference.batch_norm_update(jnp.asarray(x), jnp.asarray(mean),
                                                    jnp.asarray(var))
    assert abs(float(new_mean[0]) - (0.9 * 0.5 + 0.1 * 1.0)) <= 1e-14
    assert abs(float(new_var[0]) - (0.9 * 2.0 + 0.1 * 26 / 3)) <= 1e-14


def test_batch_norm_update_with_one_value_per_channel():
    mean, var = jnp.asarray([1.0, 2.0]), jnp.asarray([3.0, 4.0])
    new_mean, new_var = reference.batch_norm_update(jnp.asarray([[5.0, -1.0]]), mean, var)
    np.testing.assert_allclose(new_mean, [0.9 * 1 + 0.5, 0.9 * 2 - 0.1], rtol=1e-14)
    np.testing.assert_allclose(new_var, [0.9 * 3, 0.9 * 4], rtol=1e-14)   # batch variance 0


def test_batch_norm_inference_on_numbers():
    x = np.asarray([[[1.0, -2.0, 0.5]], [[4.0, 3.0, -1.0]]])
    scale, offset = np.asarray([2.0, -0.5, 1.0]), np.asarray([0.3, 1.0, 0.0])
    mean, var = np.asarray([0.5, -1.0, 0.0]), np.asarray([2.0, 0.25, 1.0])
    y = reference.batch_norm_inference(*map(jnp.asarray, (x, scale, offset, mean, var)),
                                       eps=1e-3)
    assert relative_error(y, (x - mean) / np.sqrt(var + 1e-3) * scale + offset) <= 1e-15


def test_batch_norm_inference_with_the_batch_statistics_is_the_training_forward():
    x, scale, offset = _values((3, 4, 2, 3)), _values(3, 1), _values(3, 2)
    axes = (0, 1, 2)
    y = reference.batch_norm_inference(x, scale, offset, jnp.mean(x, axis=axes),
                                       jnp.var(x, axis=axes), eps=0.01)
    assert relative_error(y, layers.batch_norm(x, scale, offset, eps=0.01)) <= 1e-14


# ------------------------------------------------------------------ dropout

KEYS = {"raw": jax.random.PRNGKey, "typed": jax.random.key}


@pytest.mark.parametrize("shape, rate, kind, positional", [
    ((8, 5), 0.3, "raw", False), ((2, 6, 3), 0.5, "typed", True),
    ((2, 4, 4, 2), 0.1, "raw", True), ((1, 3, 3, 3, 2), 0.7, "typed", False)],
    ids=["flat", "1d", "2d", "3d"])
def test_dropout_rule(shape, rate, kind, positional):
    key = KEYS[kind](3)
    args, keywords = ((shape, key), {}) if positional else ((shape,), {"key": key})
    report = check_rule(layers.dropout, reference.dropout, *args, rate=rate, **keywords)
    assert report.arguments == ("0 (x)",)
    assert report.residual_bytes == np.prod(shape)   # the bool mask


def test_dropout_uses_one_mask_forward_and_backward():
    rate, key = 0.4, jax.random.key(7)
    x, dy = 1.0 + jnp.abs(_values((6, 5, 4))), _values((6, 5, 4), 1)   # x has no zeros
    y, pullback = jax.vjp(lambda v: layers.dropout(v, rate, key), x)
    kept = np.asarray(y) != 0
    assert 0 < kept.mean() < 1
    np.testing.assert_array_equal(kept, keep_mask(key, rate, x.shape))
    np.testing.assert_array_equal(y, np.where(kept, x / (1 - rate), 0.0))
    np.testing.assert_array_equal(pullback(dy)[0], np.where(kept, dy / (1 - rate), 0.0))
    np.testing.assert_array_equal(reference.dropout(x, rate, key), y)


def test_dropout_keeps_about_one_minus_rate():
    y = layers.dropout(jnp.ones((200, 500), jnp.float32), 0.3, jax.random.key(0))
    kept = float(jnp.mean(y != 0))
    assert abs(kept - 0.7) < 0.01                    # 7 standard deviations of 1e5 draws
    assert abs(float(jnp.mean(y)) - 1.0) < 0.015     # inverted: the expectation is x


def test_dropout_mask_follows_the_key():
    x = jnp.ones((40, 30), F64)
    masks = {name: np.asarray(layers.dropout(x, 0.5, key)) != 0 for name, key in [
        ("raw 0", jax.random.PRNGKey(0)), ("typed 0", jax.random.key(0)),
        ("typed 1", jax.random.key(1))]}
    np.testing.assert_array_equal(masks["raw 0"], masks["typed 0"])
    assert (masks["typed 0"] != masks["typed 1"]).mean() > 0.3
    same = layers.dropout(x.astype(jnp.float32), 0.5, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(same) != 0, masks["typed 0"])   # any dtype


def test_dropout_with_rate_zero_is_the_identity():
    x, dy, key = _values((3, 4)), _values((3, 4), 1), jax.random.key(0)
    for dropout in (layers.dropout, reference.dropout):
        assert dropout(x, 0, key) is x and dropout(x, 0.0, key) is x
        np.testing.assert_array_equal(jax.vjp(lambda v: dropout(v, 0, key), x)[1](dy)[0], dy)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call, message", [
    (lambda: layers.batch_norm(jnp.ones((2, 3)), jnp.ones(4), jnp.zeros(3)),
     r"batch_norm: expected scale of shape \(3,\) for x of shape \(2, 3\), got \(4,\)$"),
    (lambda: layers.batch_norm(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros((1, 3))),
     r"batch_norm: expected offset of shape \(3,\)"),
    (lambda: layers.batch_norm(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros(3), eps=0.0),
     r"batch_norm: eps must be a number > 0 \(static\), got 0.0$"),
    (lambda: layers.batch_norm(jnp.ones(3), jnp.ones(3), jnp.zeros(3)),
     r"batch_norm: x must have at least 2 axes, got shape \(3,\)$"),
    (lambda: layers.batch_norm(jnp.ones((2, 3), jnp.int32), jnp.ones(3), jnp.zeros(3)),
     "batch_norm: x must have a floating-point dtype, got int32"),
    (lambda: reference.batch_norm_update(jnp.ones((2, 3)), jnp.zeros(3), jnp.ones(3),
                                         momentum=1.5),
     r"batch_norm_update: momentum must be a number in \[0, 1\], got 1.5$"),
    (lambda: reference.batch_norm_inference(jnp.ones((2, 3)), jnp.ones(3), jnp.zeros(3),
                                            jnp.zeros(2), jnp.ones(3)),
     r"batch_norm_inference: expected mean of shape \(3,\)"),
    (lambda: layers.dropout(jnp.ones(3), 1.0, jax.random.key(0)),
     r"dropout: rate must be a number in \[0, 1\), got 1.0$"),
    (lambda: reference.dropout(jnp.ones(3), -0.1, jax.random.key(0)),
     r"dropout: rate must be a number in \[0, 1\), got -0.1$"),
    (lambda: layers.dropout(jnp.ones(3), 0.5, jnp.zeros(2)),
     r"dropout: key must be one PRNG key \(jax.random.key or jax.random.PRNGKey\), got "
     r"dtype float64, shape \(2,\)$"),
])
def test_bad_input_is_one_clear_line(call, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        call()


# ------------------------------------------------------------------ PyTorch twins

def test_torch_twins():
    """Built on a stand-in for `torch.nn` that records which module and arguments."""
    torch = types.SimpleNamespace(nn=types.SimpleNamespace(**{
        name: (lambda name: lambda *a, **k: (name, a, k))(name)
        for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Dropout")}))
    for shape, module in [((5,), "BatchNorm1d"), ((7, 5), "BatchNorm1d"),
                          ((4, 4, 5), "BatchNorm2d"), ((2, 3, 4, 5), "BatchNorm3d")]:
        name, args, keywords = torch_twins.batch_norm(torch, shape, eps=1e-3, momentum=0.9)
        assert (name, args, keywords["eps"]) == (module, (5,), 1e-3)
        assert abs(keywords["momentum"] - 0.1) < 1e-15
    assert torch_twins.dropout(torch, (3, 3, 2), rate=0.25) == ("Dropout", (0.25,), {})
