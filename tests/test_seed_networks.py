"""The seeds' whole networks: deltas computed by the seeds' own recipes, in NumPy loops,
against `jax.grad` through the hand-derived rules.

Seed 002, the Q&A tracing a small CNN's deltas: 28x28 -> conv 3@5x5 -> 3x24x24 -> max pool
2x2 -> 3x12x12 -> 432 -> dense 10, sigmoid, quadratic loss; the kernel and bias gradients from
the upsampled delta (jaxbp/layers/DERIVATIONS.md §7 lists the chain). Seed 000, the Q&A
deriving a 1-D conv layer's delta: the delta of conv layer c1 from the delta of conv layer c2
in a network of two conv and two hidden layers (DERIVATIONS.md §2.2).
"""
import jax
import jax.numpy as jnp
import numpy as np

from gradcheck import random_inputs, relative_error
from jaxbp import layers, losses

F64 = jnp.float64


def _sigmoid_prime(z):
    s = 1 / (1 + np.exp(-z))
    return s * (1 - s)


def _valid_correlation(x, w):
    """y[n, i, j, o] = sum_{m, k, c} x[n, i + m, j + k, c] w[m, k, c, o] (seed 002's forward,
    DERIVATIONS.md §2.1)."""
    kh, kw = w.shape[:2]
    out = np.zeros((x.shape[0], x.shape[1] - kh + 1, x.shape[2] - kw + 1, w.shape[3]))
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = np.einsum("nmkc,mkco->no", x[:, i:i + kh, j:j + kw], w)
    return out


def _seed002_network(params, x, target):
    w_c, b_c, w_fc, b_fc = params
    z_c = layers.conv(x, w_c, b_c)
    pooled = layers.max_pool(layers.sigmoid(z_c), 2)
    a = layers.sigmoid(layers.dense(layers.flatten(pooled), w_fc, b_fc))
    return losses.quadratic(a, target), (z_c, pooled, a)


def test_seed002_shapes_and_gradients_follow_the_seed_recipe():
    batch = 2
    x, w_c, b_c, w_fc, b_fc = random_inputs(
        2, [(batch, 28, 28, 1), (5, 5, 1, 3), (3,), (432, 10), (10,)], F64)
    target = jax.nn.one_hot(jnp.array([3, 7]), 10, dtype=F64)
    params = (w_c, b_c, w_fc, b_fc)

    (_, (z_c, pooled, a)), grads = jax.value_and_grad(_seed002_network, has_aux=True)(
        params, x, target)
    assert z_c.shape == (batch, 24, 24, 3) and pooled.shape == (batch, 12, 12, 3)
    assert a.shape == (batch, 10)
    # The seed's forward: x[i, j] = sum_{m, n} w[m, n] o[i + m, j + n] + b.
    expected_z = _valid_correlation(np.asarray(x), np.asarray(w_c)) + np.asarray(b_c)
    assert relative_error(z_c, expected_z) <= 1e-12

    # The seed's recipe, step by step. Eq. (1): the output delta (the loss averages the batch).
    z_fc = np.asarray(pooled).reshape(batch, 432) @ np.asarray(w_fc) + np.asarray(b_fc)
    delta_fc = (np.asarray(a) - np.asarray(target)) * _sigmoid_prime(z_fc) / batch
    # Eq. (2) through the flatten: 432 -> 3x12x12.
    delta_mp = (delta_fc @ np.asarray(w_fc).T).reshape(batch, 12, 12, 3)
    # Upsample through the max pool to each window's winner, times sigma'(z) of the conv.
    s_c = 1 / (1 + np.exp(-np.asarray(z_c)))
    delta_c = np.zeros_like(s_c)
    for n in range(batch):
        for i in range(12):
            for j in range(12):
                for c in range(3):
                    window = s_c[n, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c]
                    di, dj = np.unravel_index(np.argmax(window), (2, 2))
                    delta_c[n, 2 * i + di, 2 * j + dj, c] = delta_mp[n, i, j, c]
    delta_c *= s_c * (1 - s_c)
    # Kernel: dC/dw[m, k] = sum_{i, j} delta[i, j] o[i + m, j + k]; bias: one sum per map
    # (DERIVATIONS.md §2.4, §2.5).
    expected_w = np.zeros((5, 5, 1, 3))
    for m in range(5):
        for k in range(5):
            expected_w[m, k, 0] = np.einsum("nij,nijc->c", np.asarray(x)[:, m:m + 24, k:k + 24, 0],
                                            delta_c)
    expected_b = delta_c.sum(axis=(0, 1, 2))

    g_w_c, g_b_c, g_w_fc, g_b_fc = grads
    assert relative_error(g_b_c, expected_b) <= 1e-10
    assert relative_error(g_w_c, expected_w) <= 1e-10
    assert relative_error(g_w_fc, np.asarray(pooled).reshape(batch, 432).T @ delta_fc) <= 1e-10
    assert relative_error(g_b_fc, delta_fc.sum(axis=0)) <= 1e-10


def _seed000_tail(z1, params, target):
    """Everything after conv layer c1's pre-activation z1: c2, two hidden layers, the loss."""
    w2, b2, w_h1, b_h1, w_h2, b_h2 = params
    z2 = layers.conv(layers.sigmoid(z1), w2, b2)
    return _seed000_head(z2, (w_h1, b_h1, w_h2, b_h2), target)


def _seed000_head(z2, params, target):
    """Everything after conv layer c2's pre-activation z2."""
    w_h1, b_h1, w_h2, b_h2 = params
    h1 = layers.sigmoid(layers.dense(layers.flatten(layers.sigmoid(z2)), w_h1, b_h1))
    return losses.quadratic(layers.sigmoid(layers.dense(h1, w_h2, b_h2)), target)


def test_seed000_conv_delta_from_the_next_conv_layer():
    x, w1, b1, w2, b2, w_h1, b_h1, w_h2, b_h2 = random_inputs(
        0, [(2, 9, 9, 1), (3, 3, 1, 2), (2,), (3, 3, 2, 3), (3,), (75, 6), (6,), (6, 4), (4,)], F64)
    target = jax.nn.one_hot(jnp.array([1, 2]), 4, dtype=F64)
    z1 = layers.conv(x, w1, b1)
    z2 = layers.conv(layers.sigmoid(z1), w2, b2)
    head = (w_h1, b_h1, w_h2, b_h2)

    delta2 = np.asarray(jax.grad(_seed000_head)(z2, head, target))
    delta1 = jax.grad(_seed000_tail)(z1, (w2, b2, *head), target)

    # Seed 000: delta(c1)_i = sum_a delta(c2)_{i-a} w_a * f'(z1_i), over both spatial axes and
    # the channels of c2 -- the full correlation with the rotated kernel, written as loops
    # (DERIVATIONS.md §2.2).
    w2 = np.asarray(w2)
    expected = np.zeros(z1.shape)
    for i in range(z1.shape[1]):
        for j in range(z1.shape[2]):
            for a in range(3):
                for b in range(3):
                    if 0 <= i - a < delta2.shape[1] and 0 <= j - b < delta2.shape[2]:
                        expected[:, i, j, :] += delta2[:, i - a, j - b, :] @ w2[a, b].T
    expected *= _sigmoid_prime(np.asarray(z1))
    assert relative_error(delta1, expected) <= 1e-10
