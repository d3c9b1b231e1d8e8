"""jaxbp.testing.check_rule: every built-in rule passes; broken rules of many kinds are caught.

Each broken rule is a small custom_vjp written here, next to the check it must fail.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbp import layers, losses, reference
from jaxbp.testing import (CheckOptions, RuleMismatch, check_rule, relative_error,
                           residual_bytes, tolerance)

LABELS = np.array([0, 3, 1, 4], np.int32)

# id -> (hand, reference, positional arguments, hyperparameters); small drawn shapes.
BUILT_IN = {
    # 16 outputs from 1 channel: the per-tap kernel gradient; and no bias.
    "conv1d_no_bias": (layers.conv1d, reference.conv1d, [(2, 9, 1), (3, 1, 16), None], {}),
    "conv2d": (layers.conv2d, reference.conv2d, [(2, 6, 6, 2), (3, 3, 2, 3), (3,)], {}),
    "conv3d": (layers.conv3d, reference.conv3d, [(1, 4, 4, 4, 2), (2, 2, 2, 2, 3), (3,)], {}),
    "conv_strided_padded_dilated_grouped": (
        layers.conv, reference.conv, [(2, 7, 7, 4), (3, 3, 2, 6), (6,)],
        dict(stride=2, padding=((1, 2), (2, 1)), dilation=(1, 2), groups=2)),
    "max_pool_tiling": (layers.max_pool, reference.max_pool, [(2, 6, 6, 3)], dict(window=2)),
    "max_pool_overlapping": (layers.max_pool, reference.max_pool, [(2, 7, 7, 2)],
                             dict(window=3, stride=2, padding="SAME")),
    "avg_pool_padded": (layers.avg_pool, reference.avg_pool, [(2, 7, 6, 2)],
                        dict(window=(3, 2), stride=2, padding=((1, 1), (0, 1)))),
    "channel_max": (layers.channel_max, reference.channel_max, [(2, 3, 6)],
                    dict(group_size=3)),
    "dense": (layers.dense, reference.dense, [(4, 5), (5, 3), (3,)], {}),
    "dense_no_bias": (layers.dense, reference.dense, [(4, 5), (5, 3), None], {}),
    "flatten": (layers.flatten, reference.flatten, [(2, 3, 4, 2)], {}),
    "sigmoid": (layers.sigmoid, reference.sigmoid, [(3, 5)], {}),
    "tanh": (layers.tanh, reference.tanh, [(3, 5)], {}),
    "relu": (layers.relu, reference.relu, [(4, 6)], {}),
    "leaky_relu": (layers.leaky_relu, reference.leaky_relu, [(4, 6)],
                   dict(negative_slope=0.1)),
    "softmax": (layers.softmax, reference.softmax, [(3, 5)], {}),
    "layer_norm": (layers.layer_norm, reference.layer_norm, [(3, 4), (4,), (4,)], {}),
    "batch_norm": (layers.batch_norm, reference.batch_norm, [(3, 2, 4), (4,), (4,)], {}),
    "quadratic": (losses.quadratic, reference.quadratic, [(4, 3), (4, 3)], {}),
    "softmax_cross_entropy": (losses.softmax_cross_entropy, reference.softmax_cross_entropy,
                              [(4, 5), LABELS], {}),
}


@pytest.mark.parametrize("case", list(BUILT_IN))
def test_built_in_rule_passes(case):
    hand, ref, args, hyperparameters = BUILT_IN[case]
    report = check_rule(hand, ref, *args, **hyperparameters)
    differentiable = [a for a in args if a is not None and not isinstance(a, np.ndarray)]
    assert len(report.arguments) == len(report.vjp_errors) == len(differentiable)
    checked = [report.forward_error, *report.vjp_errors, *report.second_order_errors,
               report.jit_error, report.vmap_error]
    assert max(checked) <= report.tolerance == 1e-10
    assert max(report.fd_errors) <= 1e-6


# ------------------------------------------------------------------ broken rules

def _rule(forward, fwd, bwd):
    """A custom_vjp of `forward` with the given fwd and bwd."""
    rule = jax.custom_vjp(forward)
    rule.defvjp(fwd, bwd)
    return rule


def linear(x, w):
    return x @ w


def _linear_fwd(x, w):
    return x @ w, (x, w)


def test_catches_a_wrong_factor():
    wrong = _rule(linear, _linear_fwd, lambda r, g: (g @ r[1].T, 1.01 * (r[0].T @ g)))
    with pytest.raises(RuleMismatch, match=r"^linear: gradient of argument 1 \(w\) differs "
                                           r"from the reference's for cotangent 1 of 3"):
        check_rule(wrong, reference.dense, (4, 5), (5, 3))


def _normalise(x):
    """Layer-norm-style (x - mean) / std over the last axis, no epsilon."""
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred / jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True))


def _normalise_fwd(x):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True))
    return centred / std, std


def _normalise_bwd_without_projection(std, g):
    # The full rule is (g - mean(g) - x̂ mean(g x̂)) / std; the x̂ mean(g x̂) term is lost.
    return ((g - jnp.mean(g, axis=-1, keepdims=True)) / std,)


def test_catches_a_lost_term_that_an_all_ones_cotangent_hides():
    broken = _rule(_normalise, _normalise_fwd, _normalise_bwd_without_projection)
    x = np.random.default_rng(1).standard_normal((3, 5))
    # With g = 1 both g - mean(g) and mean(g x̂) = mean(x̂) vanish: the two rules agree.
    ones_vjp = jax.jit(lambda fn, x: jax.vjp(fn, x)[1](jnp.ones_like(x))[0], static_argnums=0)
    np.testing.assert_allclose(ones_vjp(broken, x), ones_vjp(_normalise, x), atol=1e-12)
    with pytest.raises(RuleMismatch, match=r"gradient of argument 0 \(x\)"):
        check_rule(broken, _normalise, (3, 5))


WINDOW, STRIDE = 3, 2


def _pool_1d(x):
    """Average over windows of 3 with stride 2 along axis 1 of `(batch, length, channels)`."""
    return reference.avg_pool(x, WINDOW, stride=STRIDE)


def _spread_1d(dy, length: int, stride: int):
    """Each window's delta / 3 to its 3 inputs, windows starting `stride` apart."""
    dx = jnp.zeros((dy.shape[0], length, dy.shape[2]), dy.dtype)
    for offset in range(WINDOW):
        dx = dx.at[:, offset:offset + stride * (dy.shape[1] - 1) + 1:stride].add(dy / WINDOW)
    return dx


def test_spread_1d_with_the_right_stride_passes():
    right = _rule(_pool_1d, lambda x: (_pool_1d(x), x.shape[1]),
                  lambda length, g: (_spread_1d(g, length, STRIDE),))
    check_rule(right, _pool_1d, (2, 9, 2), options=CheckOptions(second_order=False,
                                                                transforms=False))


def test_catches_a_wrong_stride():
    # The backward spreads each window's delta as if the windows were 1 apart, not 2.
    wrong = _rule(_pool_1d, lambda x: (_pool_1d(x), x.shape[1]),
                  lambda length, g: (_spread_1d(g, length, 1),))
    with pytest.raises(RuleMismatch, match=r"gradient of argument 0 \(x\)"):
        check_rule(wrong, _pool_1d, (2, 9, 2))


def test_catches_a_blocked_second_order():
    def sigmoid_fwd(x):
        s = jax.nn.sigmoid(x)
        return s, s

    def blocked_bwd(s, g):
        s = jax.lax.stop_gradient(s)
        return (g * s * (1 - s),)

    blocked = _rule(jax.nn.sigmoid, sigmoid_fwd, blocked_bwd)
    first_order = CheckOptions(second_order=False)
    assert max(check_rule(blocked, reference.sigmoid, (3, 4), options=first_order).vjp_errors) \
        <= 1e-10
    with pytest.raises(RuleMismatch, match=r"second order \(grad of grad\) differs: the "
                                           r"derivative of the gradient of argument 0 \(x\)"):
        check_rule(blocked, reference.sigmoid, (3, 4))


def test_catches_a_plain_function():
    with pytest.raises(RuleMismatch, match=r"^relu: no custom_vjp in the traced program"):
        check_rule(reference.relu, reference.relu, (3, 4))


def test_catches_a_rule_wrong_only_for_negative_inputs():
    def relu(x):
        return jnp.where(x > 0, x, 0.0)

    wrong = _rule(relu, lambda x: (relu(x), x != 0), lambda mask, g: (jnp.where(mask, g, 0.0),))
    with pytest.raises(RuleMismatch, match=r"gradient of argument 0 \(x\)"):
        check_rule(wrong, reference.relu, (4, 6))


def test_catches_a_wrong_forward():
    def slightly_leaky_tanh(x):
        return jnp.tanh(x) + 1e-3 * x

    wrong = _rule(slightly_leaky_tanh, lambda x: (jnp.tanh(x), jnp.tanh(x)),
                  lambda t, g: (g * (1 - t * t),))
    with pytest.raises(RuleMismatch, match=r"^slightly_leaky_tanh: forward differs from the "
                                           r"reference: relative error"):
        check_rule(wrong, reference.tanh, (3, 4))


def test_catches_seed_001_softmax_slip():
    def fwd(x):
        s = reference.softmax(x)
        return s, s

    diagonal = _rule(reference.softmax, fwd, lambda s, g: (g * s * (1 - s),))
    with pytest.raises(RuleMismatch, match=r"gradient of argument 0 \(x\)"):
        check_rule(diagonal, reference.softmax, (3, 5))


def test_finite_differences_catch_a_mistake_shared_with_the_reference():
    # x * stop_gradient(x): JAX differentiates it as g * x, its true derivative is 2 g x. A
    # rule reproducing the reference's mistake passes the VJP check; only the second oracle sees.
    def square(x):
        return x * jax.lax.stop_gradient(x)

    same_mistake = _rule(square, lambda x: (square(x), x), lambda x, g: (g * x,))
    with pytest.raises(RuleMismatch, match=r"finite differences disagree with the gradient of "
                                           r"argument 0 \(x\) along direction 1 of 2"):
        check_rule(same_mistake, square, (3, 4))


def _tanh_rule(derivative):
    return _rule(jnp.tanh, lambda x: (jnp.tanh(x), jnp.tanh(x)),
                 lambda t, g: (derivative(g * (1 - t * t)),))


def test_catches_a_rule_that_fails_under_jit():
    # NumPy on the delta needs concrete values: fine op by op, not while traced under jit.
    with pytest.raises(RuleMismatch, match=r"^tanh: under jit, the rule raised "
                                           r"TracerArrayConversionError"):
        check_rule(_tanh_rule(lambda d: jnp.asarray(np.asarray(d))), reference.tanh, (3, 4))


def test_catches_a_rule_that_fails_under_vmap():
    # A callback without a vmap_method runs under jit and is not differentiated, but has no
    # batching rule.
    def callback(d):
        return jax.pure_callback(np.asarray, jax.ShapeDtypeStruct(d.shape, d.dtype), d)

    with pytest.raises(RuleMismatch, match=r"^tanh: under vmap, the rule raised "
                                           r"NotImplementedError"):
        check_rule(_tanh_rule(callback), reference.tanh, (3, 4),
                   options=CheckOptions(second_order=False))


# ------------------------------------------------------------------ keys, positional hyperparameters

@pytest.mark.parametrize("key", [jax.random.PRNGKey(0), jax.random.key(0)], ids=["raw", "typed"])
def test_a_key_passes_through_and_a_hyperparameter_keeps_its_place(key):
    # dropout(x, rate, key) with the key positional and rate a keyword: rate goes in its own
    # place; the key (uint32 or typed) is passed as given, never drawn, differentiated or
    # mapped under vmap (a typed key cannot even be stacked).
    report = check_rule(layers.dropout, reference.dropout, (8, 5), key, rate=0.3)
    assert report.arguments == ("0 (x)",) and report.vmap_error == 0.0
    assert check_rule(layers.dropout, reference.dropout, (8, 5), rate=0.3, key=key) == report
    with pytest.raises(ValueError, match=r"argnums \(1,\): argument 1 \(key\) is "):
        check_rule(layers.dropout, reference.dropout, (8, 5), key, rate=0.3,
                   options=CheckOptions(argnums=(1,)))


def test_a_rule_that_draws_with_the_wrong_key_is_caught():
    # The twin draws its mask from the key it is given; a rule ignoring it cannot agree.
    def fixed_mask(x, rate, key):
        return layers.dropout(x, rate, jax.random.key(1))

    with pytest.raises(RuleMismatch, match=r"^fixed_mask: forward differs"):
        check_rule(fixed_mask, reference.dropout, (8, 5), jax.random.key(0), rate=0.5)


# ------------------------------------------------------------------ the report

def test_residual_bytes_of_relu():
    report = check_rule(layers.relu, reference.relu, (4, 6))
    assert report.residual_bytes == 4 * 6          # the bool mask, one byte per element
    assert report.reference_residual_bytes != report.residual_bytes
    x = jnp.zeros((4, 6))
    assert residual_bytes(layers.relu, x) == 24
    assert residual_bytes(layers.dense, x, jnp.zeros((6, 2))) == 0   # saves its inputs only


def test_report_str_is_a_table():
    text = str(check_rule(layers.dense, reference.dense, (4, 5), (5, 3), (3,)))
    lines = text.splitlines()
    assert lines[0] == "dense: float64, relative tolerance 1e-10"
    assert lines[1].split() == ["gradient", "of", "0", "(x)", "1", "(w)", "2", "(b)"]
    assert [line.split()[0] for line in lines[2:5]] == ["vjp", "finite", "second"]
    assert "residuals: 0 bytes (reference 0 bytes)" in text


def test_float32_runs_without_finite_differences():
    report = check_rule(layers.tanh, reference.tanh, (3, 5),
                        options=CheckOptions(dtype="float32"))
    assert report.dtype == "float32" and report.tolerance == tolerance("float32") == 1e-4
    assert report.fd_errors is None
    assert "finite differences skipped: meaningless in float32" in str(report)


def test_x64_is_off_again_after_the_call():
    # conftest.py turns x64 on for the whole session, so a fresh interpreter checks this.
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jaxbp import layers, reference
        from jaxbp.testing import CheckOptions, check_rule
        assert not jax.config.jax_enable_x64
        report = check_rule(layers.tanh, reference.tanh, (2, 3),
                            options=CheckOptions(second_order=False, transforms=False))
        assert report.dtype == "float64" and report.fd_errors is not None
        assert not jax.config.jax_enable_x64 and jnp.zeros(1).dtype == jnp.float32
    """)
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_bad_usage_is_a_clear_error():
    int_shape = jax.ShapeDtypeStruct((4,), jnp.int32)
    with pytest.raises(ValueError, match=r"argument 1 \(labels\): a shape was given with "
                                         r"dtype int32, but only floating arguments are drawn"):
        check_rule(losses.softmax_cross_entropy, reference.softmax_cross_entropy, (4, 5),
                   int_shape)
    with pytest.raises(ValueError, match=r"argument 1 \(labels\) is int32, not floating"):
        check_rule(losses.softmax_cross_entropy, reference.softmax_cross_entropy, (4, 5),
                   LABELS, options=CheckOptions(argnums=(0, 1)))
    with pytest.raises(TypeError, match=r"argument 1 \(negative_slope\): expected an array"):
        check_rule(layers.leaky_relu, reference.leaky_relu, (4, 5), 0.1)
    with pytest.raises(ValueError, match=r"no tolerance for dtype float16"):
        check_rule(layers.tanh, reference.tanh, (3,), options=CheckOptions(dtype="float16"))


def test_relative_error():
    assert relative_error([1.0, -2.0], [1.0, -4.0]) == 0.5
    assert relative_error([0.0, 3e-3], [0.0, 0.0]) == 3e-3     # absolute where all zero
    assert np.isnan(relative_error([np.nan], [1.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(np.zeros(2), np.zeros(3))
