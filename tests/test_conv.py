"""The hand-derived convolution backward (jaxbp.layers.conv) against jax.grad of its plain twin.

Section numbers (§) are those of jaxbp/layers/DERIVATIONS.md; the seeds are the source texts
it derives from (each named by what it is where it is cited)."""
import functools
import importlib
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gradcheck import assert_matches_reference, random_inputs
from jaxbp import fast
from jaxbp.testing import check_rule

hand = importlib.import_module("jaxbp.layers.conv")
plain = importlib.import_module("jaxbp.reference.conv")


# ---------------------------------------------------------------- generated grid

CHANNELS = [  # (groups, in_ch, out_ch)
    (1, 1, 1), (1, 1, 3), (1, 3, 1), (1, 2, 3), (2, 2, 2), (2, 4, 6), (3, 3, 6), (2, 6, 4)]


def _case(rng, rank, stride, padding_kind, dilation):
    kernel = tuple(rng.choice((1, 2, 3)) for _ in range(rank))
    windows = [(k - 1) * dilation + 1 for k in kernel]
    if padding_kind == "pairs":
        # axis 0 asymmetric; a low pad of up to 3 may exceed the window (negative bwd padding)
        padding = tuple((rng.randint(0, 3), rng.randint(0, 2)) for _ in range(rank))
        padding = ((padding[0][0], padding[0][0] + 1),) + padding[1:]
    else:
        padding = padding_kind
    spatial = tuple(w + rng.randint(0, 4) for w in windows)
    groups, in_ch, out_ch = rng.choice(CHANNELS)
    return dict(batch=rng.choice((1, 2)), spatial=spatial, kernel=kernel, in_ch=in_ch,
                out_ch=out_ch, bias=rng.random() < 0.6,
                kwargs=dict(stride=stride, padding=padding, dilation=dilation, groups=groups))


def _grid():
    """Every rank x stride x padding kind; dilation 1 and 2 for ranks 1, 2, either for rank 3."""
    rng = random.Random(0)
    return [_case(rng, rank, stride, padding_kind, dilation)
            for rank in (1, 2, 3) for stride in (1, 2, 3)
            for padding_kind in ("VALID", "SAME", "pairs")
            for dilation in ((1, 2) if rank < 3 else (rng.choice((1, 2)),))]


GRID = _grid()


def _case_id(case):
    kw = case["kwargs"]
    pad = kw["padding"] if isinstance(kw["padding"], str) else "P" + "".join(
        f"{lo}{hi}" for lo, hi in kw["padding"])
    return (f"n{case['batch']}-x{'x'.join(map(str, case['spatial']))}"
            f"-k{'x'.join(map(str, case['kernel']))}-c{case['in_ch']}to{case['out_ch']}"
            f"-s{kw['stride']}-{pad}-d{kw['dilation']}-g{kw['groups']}"
            f"{'-bias' if case['bias'] else ''}")


def _unreached_rows(case):
    """Per axis, how many high rows of the padded input the stride never reaches."""
    kw = case["kwargs"]
    pads = plain.conv_geometry("conv", None, np.zeros((1, *case["spatial"], 1)),
                               np.zeros((*case["kernel"], 1, 1)), None, **{**kw, "groups": 1}).pads
    return [(n + lo + hi - (k - 1) * kw["dilation"] - 1) % kw["stride"]
            for n, k, (lo, hi) in zip(case["spatial"], case["kernel"], pads)]


def test_grid_covers_the_required_features():
    def having(pred):
        return sum(1 for c in GRID if pred(c))

    assert 40 <= len(GRID) <= 80
    assert having(lambda c: c["batch"] == 1) and having(lambda c: c["batch"] > 1)
    assert having(lambda c: c["in_ch"] == 1) and having(lambda c: c["out_ch"] == 1)
    assert having(lambda c: c["kwargs"]["groups"] > 1) >= 9
    assert having(lambda c: c["bias"]) and having(lambda c: not c["bias"])
    assert having(lambda c: any(_unreached_rows(c))) >= 10, "strides not dividing the size"
    assert having(lambda c: any(n % 2 for n in c["spatial"]))
    assert having(lambda c: not isinstance(c["kwargs"]["padding"], str) and any(
        lo > (k - 1) * c["kwargs"]["dilation"]
        for (lo, _), k in zip(c["kwargs"]["padding"], c["kernel"]))), "pad wider than window"


def _grid_params():
    """Every case in float64; every fourth also in float32 (compile time is the budget)."""
    params = []
    for i, case in enumerate(GRID):
        params.append(pytest.param(i, case, jnp.float64, id=_case_id(case) + "-f64"))
        if i % 4 == 0:
            params.append(pytest.param(i, case, jnp.float32, id=_case_id(case) + "-f32"))
    return params


def _both(kwargs):
    """The hand conv and its twin with `kwargs` bound, jitted: compiling the forward once is
    much cheaper than dispatching the per-tap products one by one (test_jit and the seeds'
    examples run the rule unjitted)."""
    return (jax.jit(functools.partial(hand.conv, **kwargs)),
            jax.jit(functools.partial(plain.conv, **kwargs)))


@pytest.mark.parametrize("seed,case,dtype", _grid_params())
def test_gradients_match_reference(seed, case, dtype):
    w_shape = (*case["kernel"], case["in_ch"] // case["kwargs"]["groups"], case["out_ch"])
    shapes = [(case["batch"], *case["spatial"], case["in_ch"]), w_shape, (case["out_ch"],)]
    x, w, b = random_inputs(seed, shapes, dtype)
    args, argnums = ((x, w, b), (0, 1, 2)) if case["bias"] else ((x, w), (0, 1))
    assert_matches_reference(*_both(case["kwargs"]), args, argnums)


# ---------------------------------------------------------------- worked examples from the seeds

def _vjp(fn, args, cotangent):
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(jnp.asarray(cotangent, out.dtype))


def test_seed_004_kernel_gradient_entry_by_entry():
    """DERIVATIONS.md §2.4; seed 004, the Q&A working the filter gradient by hand: 3x3 input V,
    2x2 kernel W, output G: dE/dW1 = dG1 V1 + dG2 V2 + dG3 V4 + dG4 V5, etc."""
    V1, V2, V3, V4, V5, V6, V7, V8, V9 = 1, 2, 3, 4, 5, 6, 7, 8, 9
    W1, W2, W3, W4 = 2, -1, 0, 3
    dG1, dG2, dG3, dG4 = 1, -2, 3, 1
    x = jnp.asarray([[V1, V2, V3], [V4, V5, V6], [V7, V8, V9]], jnp.float64).reshape(1, 3, 3, 1)
    w = jnp.asarray([[W1, W2], [W3, W4]], jnp.float64).reshape(2, 2, 1, 1)
    b = jnp.asarray([0.5])
    dG = np.reshape([[dG1, dG2], [dG3, dG4]], (1, 2, 2, 1))
    G, (_, dW, db) = _vjp(hand.conv2d, (x, w, b), dG)

    assert G.ravel().tolist() == [V1 * W1 + V2 * W2 + V4 * W3 + V5 * W4 + 0.5,
                                  V2 * W1 + V3 * W2 + V5 * W3 + V6 * W4 + 0.5,
                                  V4 * W1 + V5 * W2 + V7 * W3 + V8 * W4 + 0.5,
                                  V5 * W1 + V6 * W2 + V8 * W3 + V9 * W4 + 0.5]
    dW1 = dG1 * V1 + dG2 * V2 + dG3 * V4 + dG4 * V5
    dW2 = dG1 * V2 + dG2 * V3 + dG3 * V5 + dG4 * V6
    dW3 = dG1 * V4 + dG2 * V5 + dG3 * V7 + dG4 * V8
    dW4 = dG1 * V5 + dG2 * V6 + dG3 * V8 + dG4 * V9
    assert (dW1, dW2, dW3, dW4) == (14, 17, 23, 26)
    assert dW.reshape(2, 2).tolist() == [[dW1, dW2], [dW3, dW4]]
    assert db.tolist() == [dG1 + dG2 + dG3 + dG4]


def _numpy_input_delta(delta, kernel, stride, in_shape):
    """DERIVATIONS.md §2.2-§2.3 (seed 003, the rotated-kernel post), independently in numpy:
    spread the delta by the stride, zero-pad it by k - 1 all round and slide the
    180-degree-rotated kernel over it; input rows past the last window stay 0."""
    spread = np.zeros([(n - 1) * stride + 1 for n in delta.shape])
    spread[::stride, ::stride] = delta
    kh, kw = kernel.shape
    padded = np.pad(spread, ((kh - 1, kh - 1), (kw - 1, kw - 1)))
    rotated = kernel[::-1, ::-1]
    full = np.zeros((padded.shape[0] - kh + 1, padded.shape[1] - kw + 1))
    for i in range(full.shape[0]):
        for j in range(full.shape[1]):
            full[i, j] = np.sum(padded[i:i + kh, j:j + kw] * rotated)
    result = np.zeros(in_shape)
    result[:full.shape[0], :full.shape[1]] = full
    return result


KERNEL_2x3 = np.array([[1, -2, 3], [0, 4, -1]])


@pytest.mark.parametrize("in_shape,stride,input_delta", [
    ((4, 5), 1, "plain"), ((4, 5), 1, "band"), ((5, 6), 1, "plain"), ((5, 6), 1, "band"),
    ((7, 8), 2, "plain"), ((7, 9), 3, "plain")])
def test_seed_003_input_delta_is_full_correlation_with_rotated_kernel(in_shape, stride,
                                                                      input_delta):
    """DERIVATIONS.md §2.2-§2.3; seed 003, the rotated-kernel post, with its stride: by each
    input-delta formulation that applies."""
    out_shape = [(n - k) // stride + 1 for n, k in zip(in_shape, KERNEL_2x3.shape)]
    delta = np.random.default_rng(stride).integers(-5, 6, size=out_shape)
    x = jnp.ones((1, *in_shape, 1), jnp.float64)
    w = jnp.asarray(KERNEL_2x3, jnp.float64).reshape(2, 3, 1, 1)
    with fast.use({"conv.input_delta": input_delta}):
        _, (dx, _) = _vjp(jax.jit(functools.partial(hand.conv2d, stride=stride)), (x, w),
                          delta.reshape(1, *out_shape, 1))
    dx = np.asarray(dx).reshape(in_shape)
    np.testing.assert_array_equal(dx, _numpy_input_delta(delta, KERNEL_2x3, stride, in_shape))
    reached = [(o - 1) * stride + k for o, k in zip(out_shape, KERNEL_2x3.shape)]
    assert not np.any(dx[reached[0]:]) and not np.any(dx[:, reached[1]:])


def test_seed_000_one_dimensional_delta_is_sum_of_shifted_weighted_deltas():
    """DERIVATIONS.md §2.2; seed 000, the Q&A deriving a 1-D convolutional layer's delta:
    delta(l-1)_i = sum_a delta(l)_{i-a} w_a, i.e. numpy's (flipping) full convolution."""
    w, delta = np.array([2, -1, 3]), np.array([1, 4, -2, 5, 3])
    kernel = jnp.asarray(w, jnp.float64).reshape(3, 1, 1)
    _, (dx, _) = _vjp(hand.conv1d, (jnp.ones((1, 7, 1)), kernel), delta.reshape(1, 5, 1))
    by_sum = [sum(delta[i - a] * w[a] for a in range(3) if 0 <= i - a < 5) for i in range(7)]
    assert dx.ravel().tolist() == by_sum == np.convolve(delta, w).tolist()


def test_seed_003_depth_question_gradient_per_input_channel():
    """DERIVATIONS.md §2.3; seed 003's question on inputs of depth > 1: an input of depth 3 and
    two kernels of depth 3: each input channel gets the sum over the output channels of the
    full correlation of that output's delta with its own kernel slice."""
    rng = np.random.default_rng(3)
    w = rng.integers(-3, 4, size=(2, 3, 3, 2))
    delta = rng.integers(-3, 4, size=(1, 4, 3, 2))
    x = jnp.ones((1, 5, 5, 3), jnp.float64)
    _, (dx, _) = _vjp(hand.conv2d, (x, jnp.asarray(w, jnp.float64)), delta)
    for c in range(3):
        expected = sum(_numpy_input_delta(delta[0, :, :, o], w[:, :, c, o], 1, (5, 5))
                       for o in range(2))
        np.testing.assert_array_equal(np.asarray(dx[0, :, :, c]), expected)


# ---------------------------------------------------------------- the hand rule is what runs

STRIDED = dict(stride=(2, 1), padding=((1, 0), (0, 2)), dilation=(1, 2), groups=2)


def _strided_args(dtype=jnp.float64, batch=2):
    return random_inputs(7, [(batch, 6, 5, 4), (2, 2, 2, 6), (6,)], dtype)


def test_forward_is_a_custom_vjp_call():
    jaxpr = jax.make_jaxpr(functools.partial(hand.conv, **STRIDED))(*_strided_args())
    assert "custom_vjp_call" in str(jaxpr)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(functools.partial(plain.conv, **STRIDED))(
        *_strided_args()))


def test_residuals_are_x_and_w_only():
    x, w, b = _strided_args()
    pullback = jax.vjp(functools.partial(hand.conv, **STRIDED), x, w, b)[1]
    saved = jax.tree_util.tree_leaves(pullback)
    assert len(saved) == 2
    np.testing.assert_array_equal(saved[0], x)
    np.testing.assert_array_equal(saved[1], w)


def _scaled_gradient(argnum):
    """hand.conv with the gradient of argument `argnum` 1.01 times too large: a rule that is
    wrong on purpose, built from the public layer."""
    @jax.custom_vjp
    def wrong(x, w, b):
        return hand.conv(x, w, b, **STRIDED)

    def wrong_fwd(x, w, b):
        return jax.vjp(functools.partial(hand.conv, **STRIDED), x, w, b)

    def wrong_bwd(pullback, dy):
        grads = list(pullback(dy))
        grads[argnum] = 1.01 * grads[argnum]
        return tuple(grads)

    wrong.defvjp(wrong_fwd, wrong_bwd)
    return wrong


@pytest.mark.parametrize("argnum", [0, 1, 2])
def test_a_wrong_gradient_fails_the_comparison(argnum):
    with pytest.raises(AssertionError, match=f"gradient of argument {argnum}"):
        assert_matches_reference(_scaled_gradient(argnum),
                                 functools.partial(plain.conv, **STRIDED), _strided_args(),
                                 (0, 1, 2))


# ---------------------------------------------------------------- formulations (jaxbp.fast)

def _chosen(slot, x_shape, w_shape, stride=1, padding="VALID", dilation=1, groups=1):
    """The formulation jaxbp.fast selects for `slot` of conv(x, w, **kwargs)."""
    geometry = plain.conv_geometry("conv", None, np.zeros(x_shape), np.zeros(w_shape), None,
                                   stride, padding, dilation, groups)
    return fast.chosen(slot, x_shape, w_shape, geometry)


def _plan(x_shape, w_shape, **kwargs):
    return {slot: _chosen(f"conv.{slot}", x_shape, w_shape, **kwargs)
            for slot in ("forward", "input_delta", "kernel_grad", "bias_grad")}


def _assert_forced_matches_reference(choices, x_shape, w_shape, kwargs, seed=5, bias=True):
    x, w, b = random_inputs(seed, [x_shape, w_shape, (w_shape[-1],)], jnp.float64)
    args, argnums = ((x, w, b), (0, 1, 2)) if bias else ((x, w), (0, 1))
    with fast.use(choices):
        assert_matches_reference(*_both(kwargs), args, argnums)


# The per-tap forward, forced on several shapes: the first layers of
# configs/seed002.yaml, wide.yaml and lenet5_classic.yaml at batch 2 (what they select there),
# strided/dilated/padded 1-D to 3-D cases, and 4 input channels, where nothing selects them
# but they still compute the rule.  (x shape, w shape, kwargs, forced formulations)
TAPS = "taps"
TAPS_CASES = [
    ((2, 28, 28, 1), (5, 5, 1, 3), {}, dict(forward=TAPS, bias_grad="rows")),
    ((2, 28, 28, 1), (3, 3, 1, 32), dict(padding="SAME"), dict(forward=TAPS)),
    ((2, 28, 28, 1), (5, 5, 1, 6), dict(padding="SAME"), dict(forward=TAPS)),
    ((2, 9, 3), (3, 3, 4), dict(stride=2, padding=((2, 1),), dilation=2),
     dict(forward=TAPS)),
    ((2, 9, 3), (3, 3, 16), dict(stride=3, padding=((0, 2),), dilation=2),
     dict(forward=TAPS, bias_grad="rows")),
    ((1, 7, 6, 2), (2, 3, 2, 3), dict(stride=(2, 1), padding=((0, 3), (1, 1)), dilation=(1, 2)),
     dict(forward=TAPS)),
    ((1, 7, 6, 2), (2, 3, 2, 17), dict(stride=(2, 3), padding=((3, 0), (1, 1)), dilation=(2, 1)),
     dict(forward=TAPS)),
    ((1, 4, 5, 3, 1), (2, 1, 2, 1, 2), dict(stride=(1, 2, 2), padding="SAME"),
     dict(forward=TAPS)),
    ((2, 4, 5, 3, 3), (2, 2, 2, 3, 16), dict(stride=(2, 1, 1), padding="SAME", dilation=2),
     dict(forward=TAPS)),
    ((1, 6, 6, 4), (3, 3, 4, 4), dict(padding="SAME"),
     dict(forward=TAPS, bias_grad="rows")),
    ((1, 6, 6, 4), (3, 3, 4, 4), dict(stride=2), dict(forward=TAPS, bias_grad="plain")),
]


def _shapes_id(case):
    return ("x" + "x".join(map(str, case[0])) + "-w" + "x".join(map(str, case[1])) + "-"
            + "-".join(case[3].values()))


def test_the_tap_forward_is_forced_on_every_rank():
    assert {len(x) - 2 for x, _, _, forced in TAPS_CASES if forced["forward"] == TAPS} == {
        1, 2, 3}


@pytest.mark.parametrize("x_shape,w_shape,kwargs,forced", TAPS_CASES,
                         ids=[_shapes_id(c) for c in TAPS_CASES])
def test_forced_tap_forward_matches_reference(x_shape, w_shape, kwargs, forced):
    """y = sum_k x_pad[o * s + k * d] @ w[k] + b (DERIVATIONS.md §2.1), tap by tap, and the
    rule's gradients with it, against jax.grad of XLA's convolution."""
    choices = {f"conv.{slot}": name for slot, name in forced.items()}
    _assert_forced_matches_reference(choices, x_shape, w_shape, kwargs)


# Shapes where the banded input delta applies (stride 1, dilation 1, groups 1): classic
# LeNet-5's second layer at batch 2, 1-D to 3-D, "same", and explicit pads wider than the
# window or cropping the high end; the last two cost more than the threshold (not selected).
BAND_CASES = [
    ((2, 14, 14, 6), (5, 5, 6, 16), {}),
    ((2, 9, 3), (4, 3, 5), dict(padding="SAME")),
    ((2, 8, 2), (3, 2, 3), dict(padding=((4, 0),))),
    ((1, 7, 6, 2), (3, 2, 2, 3), dict(padding=((3, 1), (0, 2)))),
    ((2, 6, 5, 1), (2, 3, 1, 4), dict(padding="SAME")),
    ((1, 4, 5, 3, 2), (2, 3, 2, 2, 3), dict(padding=((1, 0), (0, 2), (1, 1)))),
    ((1, 10, 10, 12), (3, 3, 12, 16), {}),
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs", BAND_CASES,
                         ids=[_shapes_id((*c, {})) for c in BAND_CASES])
def test_forced_band_input_delta_matches_reference(x_shape, w_shape, kwargs):
    """The full correlation of dy with the rotated kernel (DERIVATIONS.md §2.2; seed 003, the
    rotated-kernel post), one banded matrix per kernel row."""
    _assert_forced_matches_reference({"conv.input_delta": "band"}, x_shape, w_shape, kwargs,
                                     seed=6)


# The padded forward (input channels zero-padded to a multiple of 8) forced on every rank, with
# strides, dilations, pads, and channels already a multiple of 8 (nothing to pad).
PADDED_CASES = [
    ((2, 14, 14, 6), (5, 5, 6, 16), {}),
    ((2, 9, 5), (3, 5, 4), dict(stride=2, padding=((2, 1),), dilation=2)),
    ((1, 7, 6, 7), (2, 3, 7, 3), dict(stride=(2, 1), padding=((0, 3), (1, 1)), dilation=(1, 2))),
    ((1, 4, 5, 3, 4), (2, 1, 2, 4, 2), dict(stride=(1, 2, 2), padding="SAME")),
    ((1, 6, 6, 8), (3, 3, 8, 4), dict(padding="SAME")),
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs", PADDED_CASES,
                         ids=[_shapes_id((*c, {})) for c in PADDED_CASES])
def test_forced_padded_forward_matches_reference(x_shape, w_shape, kwargs):
    """y = sum_{k, c} x_pad[o * s + k * d, c] w[k, c] + b (DERIVATIONS.md §2.1) with zero
    channels added to x and zero rows to w: the added terms are 0, the rule unchanged."""
    _assert_forced_matches_reference({"conv.forward": "padded"}, x_shape, w_shape, kwargs,
                                     seed=8)


@pytest.mark.parametrize("x_shape,w_shape,kwargs,forward", [
    ((1, 14, 14, 6), (5, 5, 6, 16), {}, "padded"),     # classic LeNet-5's second layer
    ((1, 14, 14, 4), (3, 3, 4, 32), {}, "padded"),
    ((1, 14, 14, 7), (3, 3, 7, 16), dict(stride=2), "padded"),
    ((1, 12, 12, 6), (5, 5, 6, 12), {}, "plain"),      # seed000's second layer: 12 outputs
    ((1, 14, 14, 8), (3, 3, 8, 16), {}, "plain"),      # already a multiple of 8
    ((1, 14, 14, 6), (3, 3, 3, 16), dict(groups=2), "plain"),
])
def test_padded_forward_is_chosen_for_4_to_7_inputs_and_16_outputs(x_shape, w_shape, kwargs,
                                                                   forward):
    assert _chosen("conv.forward", x_shape, w_shape, **kwargs) == forward


# The banded kernel gradient forced on every rank, with strides, dilations and pads (its
# width mask takes them; the leading axes are strided slices), several input channels and
# unreached high rows; the first two are seed002's and lenet5_classic's first layers.
KERNEL_BAND_CASES = [
    ((2, 28, 28, 1), (5, 5, 1, 3), {}),
    ((2, 28, 28, 1), (5, 5, 1, 6), dict(padding="SAME")),
    ((2, 9, 3), (3, 3, 4), dict(stride=2, padding=((2, 1),), dilation=2)),
    ((3, 8, 2), (3, 2, 5), {}),
    ((1, 7, 6, 2), (2, 3, 2, 3), dict(stride=(2, 1), padding=((0, 3), (1, 1)), dilation=(1, 2))),
    ((1, 7, 8, 3), (3, 2, 3, 4), dict(stride=(1, 3), padding=((1, 1), (2, 0)), dilation=(2, 2))),
    ((1, 4, 5, 3, 1), (2, 1, 2, 1, 2), dict(stride=(1, 2, 2), padding="SAME")),
    ((2, 4, 5, 6, 2), (2, 2, 3, 2, 3), dict(stride=(2, 1, 2), padding="SAME", dilation=(1, 2, 1))),
    ((1, 6, 6, 5), (3, 3, 5, 12), dict(padding="SAME")),
]


@pytest.mark.parametrize("x_shape,w_shape,kwargs", KERNEL_BAND_CASES,
                         ids=[_shapes_id((*c, {})) for c in KERNEL_BAND_CASES])
def test_forced_band_kernel_grad_matches_reference(x_shape, w_shape, kwargs):
    """dw[k] = sum_{n, o} x_pad[o * s + k * d]^T dy[o] (DERIVATIONS.md §2.4; seed 004, the
    filter gradient worked by hand) as every input row against every delta row, the pairs
    at a kernel tap's width offset kept."""
    _assert_forced_matches_reference({"conv.kernel_grad": "band"}, x_shape, w_shape, kwargs,
                                     seed=7)


@pytest.mark.parametrize("x_shape,w_shape,kwargs,kernel_grad", [
    ((1, 28, 28, 1), (5, 5, 1, 8), {}, "band"),
    ((1, 28, 28, 3), (3, 3, 3, 3), dict(padding="SAME"), "band"),   # width 30 = 10 * 3
    ((1, 28, 28, 1), (5, 5, 1, 9), {}, "plain"),                    # 9 outputs
    ((1, 28, 28, 4), (5, 5, 4, 3), {}, "plain"),                    # 4 inputs
    ((1, 31, 31, 1), (3, 3, 1, 3), {}, "plain"),                    # width 31 > 10 * 3
    ((1, 28, 28, 1), (5, 5, 1, 3), dict(stride=2, dilation=2), "band"),
    ((1, 28, 28, 2), (5, 5, 1, 4), dict(groups=2), "plain"),
])
def test_band_kernel_grad_is_chosen_for_thin_inputs_and_outputs(x_shape, w_shape, kwargs,
                                                                 kernel_grad):
    assert _chosen("conv.kernel_grad", x_shape, w_shape, **kwargs) == kernel_grad


@pytest.mark.parametrize("x_shape,w_shape,groups,forward", [
    ((1, 6, 6, 3), (3, 3, 3, 4), 1, "taps"),
    ((1, 6, 6, 4), (3, 3, 4, 4), 1, "plain"),
    ((1, 6, 6, 2), (3, 3, 1, 4), 2, "plain"),
])
def test_forward_formulation_is_chosen_by_input_channels(x_shape, w_shape, groups, forward):
    assert _chosen("conv.forward", x_shape, w_shape, groups=groups) == forward


@pytest.mark.parametrize("w_shape", [
    (3, 3, 2, 17),
    (5, 5, 1, 6),      # lenet5_classic's first layer
    (3, 3, 1, 32),     # wide's, lenet5's and resnet's
    (3, 1, 2),         # 1-D
    (5, 1, 25),        # 1-D, mnist1d_cnn's first layer
    (2, 1, 2, 1, 4),   # 3-D
])
def test_thin_forward_is_taps_whatever_the_outputs(w_shape):
    x_shape = (1, *([6] * (len(w_shape) - 2)), w_shape[-2])
    assert _chosen("conv.forward", x_shape, w_shape) == "taps"


@pytest.mark.parametrize("in_ch,out_ch", [(1, 9), (2, 16), (1, 32), (4, 16)])
def test_kernel_grad_of_more_than_8_outputs_is_xlas(in_ch, out_ch):
    """From 9 outputs the band multiplies too many pairs, and XLA's correlation beats the
    stacked tap windows in the step (experiments/results/README.md, "Convolution: per-tap
    kernel gradient")."""
    assert _chosen("conv.kernel_grad", (1, 6, 6, in_ch), (3, 3, in_ch, out_ch),
                   stride=2) == "plain"


@pytest.mark.parametrize("x_shape,w_shape,kwargs,input_delta", [
    ((1, 14, 14, 6), (5, 5, 6, 16), {}, "band"),                   # cost 6 * 1.43 = 8.6
    ((1, 20, 20, 6), (5, 5, 6, 16), {}, "band"),                   # 6 * 2.56 = 15.4
    ((1, 14, 14, 6), (5, 5, 6, 16), dict(padding="SAME"), "plain"),  # 6 * 2.8 = 16.8
    ((1, 10, 10, 12), (3, 3, 12, 16), {}, "plain"),                # 12 * 2.13 = 25.6
    ((1, 14, 14, 6), (5, 5, 6, 16), dict(stride=2), "plain"),
    ((1, 14, 14, 6), (5, 5, 6, 16), dict(dilation=2), "plain"),
    ((1, 14, 14, 6), (5, 5, 3, 16), dict(groups=2), "plain"),
])
def test_band_input_delta_is_chosen_by_its_cost(x_shape, w_shape, kwargs, input_delta):
    assert _chosen("conv.input_delta", x_shape, w_shape, **kwargs) == input_delta


@pytest.mark.parametrize("x_shape,w_shape,kwargs,plan", [
    ((128, 28, 28, 1), (5, 5, 1, 3), {},                      # seed002's conv 3@5x5
     dict(forward="taps", input_delta="band", kernel_grad="band", bias_grad="rows")),
    ((128, 28, 28, 1), (5, 5, 1, 6), dict(padding="SAME"),    # lenet5_classic, layer 1
     dict(forward="taps", input_delta="band", kernel_grad="band", bias_grad="rows")),
    ((128, 14, 14, 6), (5, 5, 6, 16), {},                     # lenet5_classic, layer 2
     dict(forward="padded", input_delta="band", kernel_grad="plain", bias_grad="rows")),
    ((128, 28, 28, 1), (3, 3, 1, 32), dict(padding="SAME"),   # lenet5 and wide, layer 1
     dict(forward="taps", input_delta="band", kernel_grad="plain", bias_grad="rows")),
    ((128, 14, 14, 32), (3, 3, 32, 64), dict(padding="SAME"),  # lenet5, layer 2
     dict(forward="plain", input_delta="plain", kernel_grad="plain", bias_grad="plain")),
])
def test_the_measured_models_get_their_formulations(x_shape, w_shape, kwargs, plan):
    """The shapes experiments/results/README.md measured, and what they select."""
    assert _plan(x_shape, w_shape, **kwargs) == plan


@pytest.mark.parametrize("shape", [(3, 5, 7, 2), (4, 8, 8, 6), (2, 3, 64), (1, 5, 70), (13, 1, 4)])
@pytest.mark.parametrize("name", ["plain", "rows"])
def test_bias_grad_sums_every_position(shape, name):
    """db = sum of dy over batch and positions (DERIVATIONS.md §2.5), by either formulation:
    rows of several positions side by side (or one, when the count has no fitting divisor)."""
    x_shape, w_shape = (*shape[:-1], 1), (*[1] * (len(shape) - 2), 1, shape[-1])
    x, w, b, dy = random_inputs(10, [x_shape, w_shape, (shape[-1],), shape], jnp.float64)
    with fast.use({"conv.bias_grad": name}):
        db = jax.jit(lambda b: jax.vjp(lambda c: hand.conv(x, w, c), b)[1](dy)[0])(b)
    np.testing.assert_allclose(db, np.asarray(dy).reshape(-1, shape[-1]).sum(0), rtol=1e-13)
    assert _chosen("conv.bias_grad", x_shape, w_shape) == ("rows" if shape[-1] <= 32
                                                           else "plain")


def test_tuning_off_chooses_the_plain_rule(monkeypatch):
    """JAXBP_TUNING=0: XLA's convolutions for every slot, unless one is forced."""
    monkeypatch.setenv("JAXBP_TUNING", "0")
    assert set(_plan((128, 28, 28, 1), (3, 3, 1, 32), padding="SAME").values()) == {"plain"}
    x, w = random_inputs(1, [(1, 6, 6, 1), (3, 3, 1, 2)], jnp.float64)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(hand.conv(x, w)), (0, 1)))(x, w))
    assert jaxpr.count("conv_general_dilated") == 3 and "platform_index" not in jaxpr
    assert_matches_reference(*_both({}), (x, w), (0, 1))
    with fast.use({"conv.forward": "taps"}):
        assert _chosen("conv.forward", (1, 6, 6, 1), (3, 3, 1, 2)) == "taps"
        assert "conv_general_dilated" not in str(jax.make_jaxpr(hand.conv)(x, w))


def test_the_stored_tap_sum_keeps_infinities():
    """The taps forward stores its sum through a reduction that returns it bit for bit: an
    infinite input gives infinite outputs (as XLA's convolution does), not NaN."""
    x = np.zeros((1, 6, 6, 1))
    x[0, 2, 3, 0] = np.inf
    w = np.abs(np.asarray(random_inputs(2, [(3, 3, 1, 2)], jnp.float64)[0])) + 0.5
    x, w = jnp.asarray(x), jnp.asarray(w)
    with fast.use({"conv.forward": "taps"}):
        y = jax.jit(hand.conv)(x, w)
    np.testing.assert_array_equal(y, plain.conv(x, w))
    assert np.isposinf(y).sum() == 2 * 9 and not np.isnan(y).any()


# ---------------------------------------------------------------- transformations

def test_jit():
    assert_matches_reference(jax.jit(functools.partial(hand.conv, **STRIDED)),
                             functools.partial(plain.conv, **STRIDED), _strided_args(), (0, 1, 2))


@pytest.mark.parametrize("in_axes", [(0, None, None), (0, 0, 0)], ids=["x", "x-w-b"])
def test_grad_of_vmap(in_axes):
    """vmap over a leading axis of x (and of the kernel and bias, one per example)."""
    x, w, b = _strided_args(batch=1)
    x, w, b = [jnp.stack([a, 2 * a - 1]) if ax == 0 else a for a, ax in zip((x, w, b), in_axes)]
    assert_matches_reference(jax.vmap(functools.partial(hand.conv, **STRIDED), in_axes),
                             jax.vmap(functools.partial(plain.conv, **STRIDED), in_axes),
                             (x, w, b), (0, 1, 2))


@pytest.mark.parametrize("kwargs,shapes", [
    (STRIDED, None), ({}, [(2, 6, 5, 2), (3, 2, 2, 4), (4,)])], ids=["strided", "band"])
def test_full_check_rule_grad_of_grad_jit_vmap(kwargs, shapes):
    """`check_rule` in full: the hand backward differentiated again (each of dx, dw, db with
    respect to x, w and b), finite differences, jit and vmap."""
    args = _strided_args() if shapes is None else random_inputs(12, shapes, jnp.float64)
    report = check_rule(hand.conv, plain.conv, *args, **kwargs)
    assert len(report.second_order_errors) == 3


@pytest.mark.parametrize("shapes,kwargs", [
    ([(2, 7, 2), (3, 2, 2), (2,)], dict(stride=3, padding=((2, 1),), dilation=2)),
    ([(1, 5, 4, 4), (2, 2, 2, 4), (4,)], dict(stride=2, padding="SAME", groups=2)),
    ([(1, 4, 3, 5, 1), (2, 1, 2, 1, 2), (2,)], dict(stride=(1, 2, 2), padding=((0, 1),) * 3)),
], ids=["1d", "2d", "3d"])
def test_finite_differences_orders_1_and_2(shapes, kwargs):
    check_grads(jax.jit(functools.partial(hand.conv, **kwargs)),
                tuple(random_inputs(11, shapes, jnp.float64)), order=2, modes=["rev"])


# ---------------------------------------------------------------- fixed-rank wrappers

@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fixed_rank_wrappers(rank):
    fixed = getattr(hand, f"conv{rank}d")
    x, w = random_inputs(rank, [(2,) + (4,) * rank + (2,), (2,) * rank + (2, 3)], jnp.float64)
    np.testing.assert_array_equal(fixed(x, w, stride=2), hand.conv(x, w, stride=2))
    assert_matches_reference(fixed, getattr(plain, f"conv{rank}d"), (x, w), (0, 1))
    other = jnp.zeros((2,) + (4,) * (rank % 3 + 1) + (2,))
    for module in (hand, plain):
        with pytest.raises(ValueError, match=rf"^conv{rank}d: .*{rank} to {rank} spatial axes"):
            getattr(module, f"conv{rank}d")(other, w)


# ---------------------------------------------------------------- bad input

BAD = [  # (x shape, w shape, b shape or None, kwargs, message fragment)
    ((3, 4), (2, 4, 1), None, {}, r"1 to 3 spatial axes, got shape \(3, 4\)"),
    ((1, 2, 2, 2, 2, 1), (1, 1, 1, 1, 1, 1), None, {}, r"1 to 3 spatial axes"),
    ((1, 5, 2), (2, 2), None, {}, r"kernel of shape .* 1 spatial axes .* got shape \(2, 2\)"),
    ((1, 5, 5, 2), (2, 2, 2), None, {}, r"with 2 spatial axes for x of shape \(1, 5, 5, 2\)"),
    ((1, 5, 3), (2, 4, 1), None, {}, r"expects 4 input channels .* x of shape \(1, 5, 3\) has 3"),
    ((1, 5, 4), (2, 2, 1), None, {}, r"expects 2 input channels"),
    ((1, 5, 4), (2, 2, 3), None, dict(groups=2), r"groups=2 must divide .* output channels \(3\)"),
    ((1, 5, 3), (2, 1, 4), None, dict(groups=2), r"groups=2 must divide .* input channels \(3\)"),
    ((1, 5, 4), (2, 4, 1), None, dict(groups=0), r"groups must be an int >= 1, got 0"),
    ((1, 5, 4), (2, 2, 2), None, dict(groups=2.0), r"groups must be an int >= 1, got 2.0"),
    ((1, 5, 2), (2, 2, 4), (3,), {}, r"bias of shape \(4,\) .* got \(3,\)"),
    ((1, 5, 2), (2, 2, 4), (1, 4), {}, r"bias of shape \(4,\) .* got \(1, 4\)"),
    ((1, 5, 2), (0, 2, 4), None, {}, r"kernel spatial sizes must be >= 1"),
    ((1, 3, 1), (5, 1, 1), None, {}, r"window of size \(5,\) .* spatial size \(3,\)"),
    ((1, 3, 1), (2, 1, 1), None, dict(dilation=3), r"window of size \(4,\) \(after dilation\)"),
    ((1, 5, 1), (2, 1, 1), None, dict(stride=0), r"stride must be >= 1"),
    ((1, 5, 1), (2, 1, 1), None, dict(dilation=-1), r"dilation must be >= 1"),
    ((1, 5, 5, 1), (2, 2, 1, 1), None, dict(stride=(1, 2, 1)), r"stride must be .* tuple of 2"),
    ((1, 5, 1), (2, 1, 1), None, dict(padding="FULL"), r"padding must be .*got 'FULL'"),
    ((1, 5, 5, 1), (2, 2, 1, 1), None, dict(padding=((1, 1),)), r"padding must be .* 2 \(low"),
    ((1, 5, 1), (2, 1, 1), None, dict(padding=((-1, 0),)), r"pairs of ints >= 0"),
]


@pytest.mark.parametrize("module", [hand, plain], ids=["hand", "reference"])
@pytest.mark.parametrize("x_shape,w_shape,b_shape,kwargs,message", BAD,
                         ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_rejected_before_xla(module, x_shape, w_shape, b_shape, kwargs, message):
    b = None if b_shape is None else np.zeros(b_shape)
    with pytest.raises(ValueError, match=rf"^conv: .*{message}"):
        module.conv(np.zeros(x_shape), np.zeros(w_shape), b, **kwargs)
